"""The training loop, shared by every stage. What differs between stages is the `TrainTask`:
where micro-batches come from, the loss, and the validation metrics.

One optimizer step = `accum` micro-batches per process, so that
    global_batch_size = micro_batch_size * accum * world_size.
Micro-batch number g (counted over all processes since step 0) is a pure function of (seed, g):
resuming needs only the step, and a 2-process run sees exactly the batches of a 1-process run.
Dropout is re-seeded from (seed, g) before every micro-batch for the same reason.

The hot loop does not wait on the device: the loss is summed on the device and read only at log,
eval and save steps (`.item()` there). A non-finite loss is caught at the next of those steps,
before any checkpoint is written after it.
"""

from __future__ import annotations

import contextlib
import math
import os
import json
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from rich.console import Console

from llmstages import __version__
from llmstages.checkpoint import load_train_state, save_checkpoint
from llmstages.config import Recipe, dump_yaml, read_yaml, recipe_diff, to_dict
from llmstages.distributed import DistContext, init_distributed
from llmstages.errors import StopTraining, UserError
from llmstages.model import GPT, flops_per_token, num_params
from llmstages.optim import build_optimizer, lr_at
from llmstages.runlog import RunLog, TrainProgress, summary_table
from llmstages.runtime import autocast, peak_flops, peak_rss_mb, resolve_device, resolve_precision
from llmstages.store import Store, now_iso
from llmstages.tokenizer import Tokenizer

Batch = dict  # str -> tensor, plus "n_tokens": int (tokens in the batch, padding excluded)


@dataclass
class TrainTask:
    """The varying piece of a stage."""

    kind: str  # "pretrain" | "classify" | "instruct": recorded as the checkpoint's task
    batch: Callable[[int], Batch]  # global micro-batch index -> a CPU batch
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # mean loss of one micro-batch (scalar tensor)
    evaluate: Callable[[nn.Module], dict[str, float]]  # validation metrics, e.g. {"val_loss": 3.1}
    data_fingerprint: str
    examples_per_epoch: int | None = None  # for train.epochs
    meta: dict = field(default_factory=dict)  # added to every checkpoint's meta.json (labels, template...)
    on_eval: Callable[[nn.Module], dict] | None = None  # extra at each eval (e.g. sample generations)


class TrainingDiverged(UserError):
    exit_code = 1


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, commit a checkpoint, exit. Second Ctrl-C: exit at once."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            sys.stderr.write("\nsecond interrupt: exiting now, without a checkpoint\n")
            os._exit(130)
        self.signum = signum
        sys.stderr.write("\nstopping after this step (a checkpoint will be committed); Ctrl-C again to quit now\n")


@dataclass
class TrainResult:
    run: str
    step: int
    checkpoint: Path | None
    metrics: dict
    best: dict | None
    seconds: float
    tokens: int
    tokens_per_s: float
    stopped_early: bool = False


def steps_for(recipe: Recipe, task: TrainTask) -> int:
    cfg = recipe.train
    if cfg.epochs > 0:
        if not task.examples_per_epoch:
            raise UserError("train.epochs is set but this task has no fixed epoch size",
                            hint="use train.max_steps instead")
        return max(1, math.ceil(cfg.epochs * task.examples_per_epoch / cfg.global_batch_size))
    return cfg.max_steps


def _accumulation(recipe: Recipe, world: int) -> int:
    cfg = recipe.train
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size={cfg.micro_batch_size} x {world} processes",
                        hint="make it a multiple, or change the number of processes")
    return cfg.global_batch_size // per_step


def _to_device(batch: Batch, device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "val_loss" else new > old


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, info


def _set_rng_state(tensors: dict, info: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, state, gauss = info["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# Recipe fields that fix the shapes of the weights or the optimizer state: a checkpoint cannot be
# resumed with other values, --allow-change or not.
FIXED_ON_RESUME = ("model.size", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
                   "model.vocab_size", "model.bias", "finetune.trainable", "finetune.lora_rank",
                   "finetune.lora_targets")


def _check_resume(run_dir: Path, recipe: Recipe, allow_change: bool, latest: Path, data_fingerprint: str,
                  tokenizer: Tokenizer) -> None:
    """Refuse a resume that would not continue the same run: another recipe (unless allowed), other
    shapes, another tokenizer (never allowed), or other training data (unless allowed)."""
    saved = run_dir / "recipe.yaml"
    diffs = recipe_diff(read_yaml(saved), to_dict(recipe)) if saved.exists() else []
    lines = "\n".join(f"    {path}: {old!r} -> {new!r}" for path, old, new in diffs)
    fixed = [path for path, _, _ in diffs if path in FIXED_ON_RESUME]
    if fixed:
        raise UserError(f"{run_dir.name} cannot be resumed with another {', '.join(fixed)}:\n{lines}",
                        hint="these fix the shapes of the saved weights; start a new run with run=NEW_NAME")
    if diffs and not allow_change:
        raise UserError(f"the recipe differs from the one {run_dir.name} was started with:\n{lines}",
                        hint="resume with the same recipe, or pass --allow-change to continue with the new one")
    meta = json.loads((latest / "meta.json").read_text())
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise UserError(f"{latest.name} of {run_dir.name} was trained with another tokenizer than the one now "
                        f"prepared (fingerprint {meta['tokenizer_fingerprint'][:12]} vs {tokenizer.fingerprint[:12]})",
                        hint="the data changed since the run started: start a new run with run=NEW_NAME")
    if meta.get("data_fingerprint") not in (None, data_fingerprint) and not allow_change:
        raise UserError(f"the training data differs from the data {run_dir.name} was started with "
                        f"(dataset {meta['data_fingerprint'][:12]} vs {data_fingerprint[:12]})",
                        hint="resume on the same files, or pass --allow-change to continue on the new data")


def check_run_start(store: Store, run: str, resume: bool) -> None:
    """A resume needs a checkpoint; a fresh start must not mix with an existing run's checkpoints.
    Stages call this before they prepare data, so a refused start writes nothing (`_train` checks again)."""
    if resume and store.latest(run) is None:
        raise UserError(f"run {run!r} has no checkpoint to resume from",
                        hint=f"start it without --resume (store: {store.root})")
    if not resume and store.checkpoints(run):
        raise UserError(f"run {run!r} already has checkpoints in {store.run_dir(run)}",
                        hint="continue it with --resume, or start a new run with run=NEW_NAME")


def train(model: GPT, tokenizer: Tokenizer, recipe: Recipe, task: TrainTask, store: Store, *,
          stage: str, parent: dict | None = None, resume: bool = False, allow_change: bool = False,
          console: Console | None = None) -> TrainResult:
    """Train `model` on `task` as `recipe.train` says, committing checkpoints of run `recipe.run` to `store`."""
    cfg = recipe.train
    dctx, device_name = init_distributed(cfg.device)
    try:
        return _train(model, tokenizer, recipe, task, store, dctx, resolve_device(device_name), stage=stage,
                      parent=parent, resume=resume, allow_change=allow_change, console=console or Console(stderr=True))
    finally:
        dctx.close()


def _train(model: GPT, tokenizer: Tokenizer, recipe: Recipe, task: TrainTask, store: Store, dctx: DistContext,
           device: torch.device, *, stage: str, parent: dict | None, resume: bool, allow_change: bool,
           console: Console) -> TrainResult:
    cfg, run = recipe.train, recipe.run
    run_dir = store.run_dir(run)
    precision = resolve_precision(cfg.precision, device)
    accum = _accumulation(recipe, dctx.world_size)
    max_steps = steps_for(recipe, task)
    log = RunLog(run_dir)

    # --- start or resume ---------------------------------------------------------------------------
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    best, evals_since_best, last_metrics = None, 0, {}
    state_tensors = state_info = None
    if resume:
        latest = store.latest(run)
        if latest is None:
            raise UserError(f"run {run!r} has no checkpoint to resume from",
                            hint=f"start it without --resume (store: {store.root})")
        _check_resume(run_dir, recipe, allow_change, latest, task.data_fingerprint, tokenizer)
        from safetensors.torch import load_file
        model.load_saved_state(load_file(str(latest / "model.safetensors")))
        state_tensors, state_info = load_train_state(latest)
        start_step, tokens_seen = state_info["step"], state_info["tokens_seen"]
        elapsed_before = state_info.get("elapsed", 0.0)
        best, evals_since_best = state_info.get("best"), state_info.get("evals_since_best", 0)
        last_metrics = state_info.get("metrics", {})
    elif store.checkpoints(run):
        raise UserError(f"run {run!r} already has checkpoints in {run_dir}",
                        hint="continue it with --resume, or start a new run with run=NEW_NAME")
    if dctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        store.clean_partial(run)
        # Resume: drop what was logged after the checkpoint. A fresh start in a folder without
        # checkpoints (a run killed before its first one): drop the old run's log entirely.
        log.truncate_after(start_step)
        if not resume:
            log.plot_path.unlink(missing_ok=True)
        if not resume or allow_change:
            (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    dctx.barrier()

    # --- model, optimizer ---------------------------------------------------------------------------
    model.to(device).train()
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg, device)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    if state_tensors is not None:
        optimizer.load_state_dict(state_tensors["optimizer"])
        _set_rng_state(state_tensors, state_info["rng"])
    amp = autocast(device, precision)
    peak = peak_flops(device, precision) if dctx.is_main else float("nan")

    # Figures accumulated on the device between log steps (no host sync in the hot loop).
    loss_sum = state_tensors["loss_sum"].to(device) if state_tensors is not None else torch.zeros((), device=device)
    loss_count = state_info.get("loss_count", 0) if state_info else 0
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

    stop = StopFlag()
    stop.install()
    progress = TrainProgress(console, max_steps, start_step, enabled=dctx.is_main)
    progress.message(f"[bold]{stage}[/bold] run [cyan]{run}[/cyan]: {num_params(raw_model):,} parameters "
                     f"({num_params(raw_model, trainable_only=True):,} trainable), {max_steps} steps of "
                     f"{cfg.global_batch_size} sequences, {precision} on {device}"
                     + (f" x {dctx.world_size} processes" if dctx.enabled else "")
                     + (f", resuming at step {start_step}" if resume else ""))
    window_start, window_tokens = time.perf_counter(), 0
    run_start = time.perf_counter()
    seq_len = raw_model.config.block_size
    last_ckpt = store.latest(run) if dctx.is_main else None
    step = start_step
    stopped_early = False

    def commit(at_step: int, metrics: dict) -> Path | None:
        if dctx.enabled:  # every rank joins: the saved partial loss is the mean over ranks, as a log step takes it
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            loss_sum.div_(dctx.world_size)
        if not dctx.is_main:
            return None
        tensors, rng_info = _rng_state()
        tensors.update(optimizer=optimizer.state_dict(), loss_sum=loss_sum.detach().cpu())
        info = {"step": at_step, "tokens_seen": tokens_seen, "loss_count": loss_count, "best": best,
                "evals_since_best": evals_since_best, "metrics": metrics, "rng": rng_info,
                "elapsed": elapsed_before + time.perf_counter() - run_start, "world_size": dctx.world_size,
                "sampler": {"kind": "indexed", "seed": cfg.seed, "next_micro_batch": at_step * accum * dctx.world_size}}
        meta = {"task": task.kind, "stage": stage, "metrics": metrics, "parent": parent,
                "data_fingerprint": task.data_fingerprint, "tokens_seen": tokens_seen, "created": now_iso(),
                "llmstages_version": __version__, "generate": to_dict(recipe.generate),
                "data_settings": to_dict(recipe.data), **task.meta}
        return save_checkpoint(store, run, at_step, raw_model, tokenizer, meta, (tensors, info))

    try:
        while step < max_steps:
            lr = lr_at(step, cfg, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                index = (step * accum + micro) * dctx.world_size + dctx.rank
                torch.manual_seed(cfg.seed * 1_000_003 + index)  # dropout masks follow the micro-batch, not the rank
                batch = _to_device(task.batch(index), device)
                last = micro == accum - 1
                sync = model.no_sync() if dctx.enabled and not last else contextlib.nullcontext()
                with sync:
                    with amp:
                        loss = task.loss(model, batch)
                    (loss / accum).backward()
                step_loss += loss.detach()
                n_tokens = batch["n_tokens"] * dctx.world_size  # batch shapes match across ranks
                window_tokens += n_tokens
                tokens_seen += n_tokens
                seq_len = batch["input_ids"].shape[1]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss /= accum
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(step_loss), step + 1, bad_step)
            loss_sum += step_loss
            loss_count += 1
            step += 1

            stop_now = dctx.any_true(stop.signum is not None, device)
            is_log = step % cfg.log_every == 0 or step == max_steps
            is_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps
            is_save = (cfg.save_every and step % cfg.save_every == 0) or step == max_steps or stop_now
            if not (is_log or is_eval or is_save):
                continue
            if dctx.enabled:  # a nan on any rank has reached every rank's weights through the gradients
                import torch.distributed as dist
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            if int(bad_step) >= 0:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                raise TrainingDiverged(f"the training loss became non-finite (nan/inf) at step {int(bad_step)}; "
                                       f"stopped, {where}",
                                       hint="lower train.lr, raise train.warmup_steps, or check the data; "
                                            "then resume with --resume --allow-change")
            if is_log:
                if dctx.enabled:
                    import torch.distributed as dist
                    dist.all_reduce(loss_sum)
                    loss_sum /= dctx.world_size
                seconds = time.perf_counter() - window_start
                tps = window_tokens / seconds if seconds > 0 else 0.0
                # tps counts the tokens of every process; peak is one device's
                flops_per_s = flops_per_token(raw_model.config, seq_len) * tps
                mfu = flops_per_s / (peak * dctx.world_size) if peak == peak else None
                record = {"step": step, "loss": float(loss_sum) / loss_count, "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": tokens_seen,
                          "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4) if mfu is not None else None,
                          "time": round(elapsed_before + time.perf_counter() - run_start, 2)}
                if dctx.is_main:
                    log.write(record)
                progress.update(step, {"loss": record["loss"], "lr": lr, "tok/s": round(tps),
                                       "mfu": f"{mfu:.1%}" if mfu is not None else None})
                loss_sum.zero_()
                loss_count, window_tokens, window_start = 0, 0, time.perf_counter()
            improved = False
            if is_eval:
                eval_start = time.perf_counter()
                last_metrics = _evaluate(raw_model, task, amp)
                if task.on_eval is not None and dctx.is_main:
                    last_metrics.update(task.on_eval(raw_model) or {})
                value = last_metrics.get(cfg.best_metric)
                if isinstance(value, (int, float)):
                    improved = _better(cfg.best_metric, value, best["value"] if best else None)
                    if improved:
                        best = {"step": step, "metric": cfg.best_metric, "value": value}
                        evals_since_best = 0
                    else:
                        evals_since_best += 1
                if dctx.is_main:
                    log.write({"step": step, **{k: v for k, v in last_metrics.items() if _loggable(v)}})
                    log.plot(title=run)
                    progress.message(f"eval @ {step}: " + "  ".join(
                        f"{k} {v:.4g}" for k, v in last_metrics.items() if isinstance(v, float)))
                window_start += time.perf_counter() - eval_start  # eval time does not count against tokens/s
            patience_out = cfg.patience and evals_since_best >= cfg.patience
            if is_save or improved or patience_out:
                path = commit(step, last_metrics)
                if dctx.is_main:
                    last_ckpt = path
                    if improved:
                        store.set_best(run, best["step"], best["metric"], best["value"])
                    store.prune(run, cfg.keep_last)
                dctx.barrier()
            if stop_now and step < max_steps:  # a signal during the last step: the run has finished anyway
                progress.close()
                progress.raw(f"stopped at step {step}; checkpoint {last_ckpt}. Resume with:\n  "
                             f"{resume_command(stage, recipe)}")
                raise StopTraining(stop.signum or signal.SIGTERM)
            if patience_out:
                progress.message(f"early stop: {cfg.best_metric} has not improved for {cfg.patience} evaluations")
                stopped_early = True
                break
    finally:
        stop.restore()
        progress.close()

    seconds = elapsed_before + time.perf_counter() - run_start
    return TrainResult(run, step, last_ckpt, last_metrics, best, seconds, tokens_seen,
                       tokens_seen / seconds if seconds > 0 else 0.0, stopped_early)


def _loggable(value) -> bool:
    return isinstance(value, (int, float, str, list, dict)) and not isinstance(value, bool)


@torch.no_grad()
def _evaluate(model: GPT, task: TrainTask, amp) -> dict:
    model.eval()
    try:
        with amp:
            return dict(task.evaluate(model))
    finally:
        model.train()


def resume_command(stage: str, recipe: Recipe) -> str:
    args = shlex.join(a for a in sys.argv[1:] if a not in ("--resume",))  # quoted: pasted into a shell
    return f"llmstages {args} --resume" if args else f"llmstages {stage} {recipe.run} --resume"


def print_summary(console: Console, result: TrainResult, title: str) -> None:
    rows = {"run": result.run, "steps": result.step, "tokens": result.tokens,
            "tokens/s": round(result.tokens_per_s, 1), "time (s)": round(result.seconds, 1),
            "peak memory (MiB)": round(peak_rss_mb(), 1)}
    rows.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if result.best:
        rows[f"best {result.best['metric']}"] = f"{result.best['value']:.4g} @ step {result.best['step']}"
    rows["checkpoint"] = str(result.checkpoint)
    console.print(summary_table(title, rows))
