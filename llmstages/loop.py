"""The training loop, shared by every stage. What differs between stages is the `TrainTask`:
where micro-batches come from, the loss, and the validation metrics.

    train()   joins the process group (torchrun) and runs fit()
    fit()     one loop in nanoGPT's order: lr -> eval/checkpoint -> micro-steps -> clip -> step -> log

Everything that changes between steps is the RunState (runstate.py); checkpoint.py writes and reads
it. The parts that stay fixed for the whole run (model, optimizer, task, store...) travel as a `Run`.

One optimizer step = `accum` micro-batches per process, so that
    global_batch_size = micro_batch_size * accum * world_size   (TrainConfig.accumulation).
Micro-batch number g (counted over all processes since step 0) is a pure function of (seed, g):
resuming needs only the step, and a 2-process run sees exactly the batches of a 1-process run.
Dropout is re-seeded from (seed, g) before every micro-batch for the same reason.

The hot loop does not wait on the device: the loss is summed on the device and read only at log,
eval and save steps. A non-finite loss is caught at the next of those steps, before any checkpoint
is written after it.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console

from llmstages import __version__, spikes
from llmstages.budget import StepPlan
from llmstages.checkpoint import nonfinite, restore_optimizer, save_checkpoint
from llmstages.config import Recipe, to_dict
from llmstages.distributed import DistContext, check_shared_store, init_distributed
from llmstages.errors import StopTraining, UserError
from llmstages.loggers import open_loggers, require_packages
from llmstages.model import GPT, flops_per_token, num_params, set_activation_checkpointing
from llmstages.optim import build_optimizer, set_lr
from llmstages.runlog import RunLog, TrainProgress, summary_table
from llmstages.runstart import start_or_resume
from llmstages.runstate import RunState, restore_rng
from llmstages.runtime import autocast, peak_device_mb, peak_flops, peak_rss_mb, resolve_device, resolve_precision
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
    log_fields: dict = field(default_factory=dict)  # added to every training line of log.jsonl (padding share)
    on_eval: Callable[[nn.Module], dict] | None = None  # extra at each eval (e.g. sample generations)
    spike_floor: float = 0.0  # a step loss at or below this is never a loss spike (spikes.py)
    flops_factor: float = 1.0  # model FLOPs of a step over a plain forward + backward's (MFU)


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
    train_seconds: float = 0.0  # `seconds` without evaluation and checkpoint time (what max_time counts)


@dataclass
class Run:
    """What one training run uses at every step and never changes."""

    recipe: Recipe
    task: TrainTask
    store: Store
    tokenizer: Tokenizer
    dctx: DistContext
    device: torch.device
    stage: str
    parent: dict | None
    model: nn.Module  # what the step calls: `raw_model`, compiled and/or DDP-wrapped
    raw_model: GPT  # what is evaluated and saved
    optimizer: torch.optim.Optimizer
    amp: object  # autocast context (or a null one)
    accum: int
    plan: StepPlan  # the step count: max_steps, or what fits in max_time
    log: RunLog
    progress: TrainProgress
    peak: float  # the FLOP/s MFU is measured against (nan: unknown)


@dataclass
class Window:
    """Throughput since the last log step: tokens over all processes, the start time, the sequence length."""

    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    seq_len: int = 0

    def reset(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()


@dataclass
class Due:
    """What a finished step is a boundary of (nothing is due before the first step)."""

    log: bool = False
    eval: bool = False
    save: bool = False
    stop: bool = False

    @classmethod
    def after(cls, step: int, recipe: Recipe, max_steps: int, stop: bool) -> "Due":
        cfg, last = recipe.train, step == max_steps
        return cls(log=step % cfg.log_every == 0 or last,
                   eval=bool(cfg.eval_every and step % cfg.eval_every == 0) or last,
                   save=bool(cfg.save_every and step % cfg.save_every == 0) or last or stop, stop=stop)

    @property
    def any(self) -> bool:
        return self.log or self.eval or self.save


def train(model: GPT, tokenizer: Tokenizer, recipe: Recipe, task: TrainTask, store: Store, *,
          stage: str, parent: dict | None = None, resume: bool = False, allow_change: bool = False,
          console: Console | None = None) -> TrainResult:
    """Train `model` on `task` as `recipe.train` says, committing checkpoints of run `recipe.run` to `store`."""
    # A process group this call joins is left again at its end; one the caller joined (the CLI, a soup's
    # members one after another: torchrun's rendezvous cannot be joined twice) stays for the caller.
    joined = not torch.distributed.is_initialized()
    dctx, device_name = init_distributed(recipe.train.device)
    try:
        check_shared_store(dctx, store.root)
        result = fit(model, tokenizer, recipe, task, store, dctx, resolve_device(device_name), stage=stage,
                     parent=parent, resume=resume, allow_change=allow_change, console=console or Console(stderr=True))
        # Every rank is past its last collective before any tears the group down (and a worker's exit
        # skips the interpreter's teardown: distributed.exit_process says why).
        dctx.barrier()
        return result
    finally:
        if joined:
            dctx.close()


def fit(model: GPT, tokenizer: Tokenizer, recipe: Recipe, task: TrainTask, store: Store, dctx: DistContext,
        device: torch.device, *, stage: str, parent: dict | None, resume: bool, allow_change: bool,
        console: Console) -> TrainResult:
    """The training loop; the steps are numbered 1..max_steps, `state.step` counts the finished ones."""
    cfg = recipe.train
    require_packages(cfg.loggers)  # train.loggers: refused before the run folder is touched
    state, saved = start_or_resume(model, tokenizer, recipe, task.data_fingerprint, store, dctx, resume, allow_change)
    run = build_run(model, tokenizer, recipe, task, store, dctx, device, state, saved, stage=stage, parent=parent,
                    console=console)
    announce(run, state, resume)
    plan, optimizer = run.plan, run.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]

    stop = StopFlag()
    stop.install()
    window, due = Window(seq_len=model.config.block_size), Due()
    last_ckpt = Path(saved[1]["loaded_from"]) if saved is not None and dctx.is_main else None  # verified
    stopped_early = False
    state.started = time.perf_counter()
    plan.update(state)
    try:
        while True:
            # 1. the learning rate of the next step (each param group scaled from its own base lr)
            lr = set_lr(optimizer, state.step, cfg, plan.horizon, end_on_last=plan.timed)

            # 2. evaluate and commit a checkpoint when the step just finished asks for it (the time
            #    they take is not training time: train.max_time does not count it)
            with state.paused():
                improved = due.eval and evaluate(run, state, window)
            patience_out = bool(due.any and cfg.patience and state.evals_since_best >= cfg.patience)
            if due.save or improved or patience_out:
                with state.paused():
                    last_ckpt = commit(run, state, improved, last_ckpt) or last_ckpt
            if due.stop and state.step < plan.last:  # a signal during the last step: the run has finished anyway
                run.progress.close()
                run.progress.raw(f"stopped at step {state.step}; checkpoint {last_ckpt}. Resume with:\n  "
                                 f"{resume_command(stage, recipe)}")
                raise StopTraining(stop.signum or signal.SIGTERM)
            if patience_out:
                run.progress.message(f"early stop: {cfg.best_metric} has not improved for {cfg.patience} "
                                     f"evaluation{'s' if cfg.patience != 1 else ''}")
                stopped_early = True
                break
            if state.step >= plan.last:
                break

            # 3. forward and backward over the micro-batches of one step (gradients summed)
            step_loss = micro_steps(run, state, window)  # None: a rollback skips this step's micro-batches

            # 4. clip, 5. step, unless the spike policy (train.spike) drops this update or rolls back
            action, grad_norm = spikes.action(run, state, step_loss), None
            if action == "rollback":
                optimizer.zero_grad(set_to_none=True)
                state, due = spikes.roll_back(store.latest(recipe.run), state, model, optimizer, device), Due()
                continue
            if action == "step":
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # fsdp
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.add_step(step_loss)
            plan.update(state)  # a time budget: the steps that fit, from the step time so far
            for note in plan.take_notes():
                run.progress.message(note)

            # 6. log (every rank agrees on whether a signal asks to stop)
            due = Due.after(state.step, recipe, plan.last, stop=dctx.any_true(stop.signum is not None, device))
            if due.any:
                check_finite(run, state, last_ckpt)
                for spike in spikes.flush(cfg, dctx, state, task.spike_floor):  # train.spike=warn
                    spikes.say(run, spike, "warning only (train.spike=warn)")
            if due.log:
                log_step(run, state, window, lr, grad_norm)
    finally:
        stop.restore()
        run.progress.close()
        run.log.close()

    seconds = state.elapsed
    return TrainResult(recipe.run, state.step, last_ckpt, state.metrics, state.best, seconds, state.tokens_seen,
                       state.tokens_seen / seconds if seconds > 0 else 0.0, stopped_early, state.train_time)


def build_run(model: GPT, tokenizer: Tokenizer, recipe: Recipe, task: TrainTask, store: Store, dctx: DistContext,
              device: torch.device, state: RunState, saved: tuple[dict, dict] | None, *, stage: str,
              parent: dict | None, console: Console) -> Run:
    """The fixed parts of a run: the step plan, the model on its device (sharded, wrapped, compiled), the
    optimizer (restored on resume, with the RNGs), the log and the progress bar."""
    cfg = recipe.train
    accum, precision = cfg.accumulation(dctx.world_size), resolve_precision(cfg.precision, device)
    plan = StepPlan(cfg, 0 if cfg.max_time else cfg.total_steps(task.examples_per_epoch), state, dctx, device)
    sharded = dctx.enabled and cfg.strategy == "fsdp"
    model.to("cpu" if sharded else device).train()  # fsdp moves each process's shards to the device itself
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    stepped = dctx.wrap(model, device, strategy=cfg.strategy, precision=precision, compile=cfg.compile)
    optimizer = build_optimizer(model, cfg, device)  # after sharding: over the shards
    if saved is not None:
        restore_optimizer(saved, model, optimizer, sharded=sharded)
        restore_rng(*saved)
    state.to(device)
    run_dir = store.run_dir(recipe.run)
    loggers = open_loggers(cfg.loggers, run_dir, recipe.run, to_dict(recipe)) if dctx.is_main else None
    return Run(recipe, task, store, tokenizer, dctx, device, stage, parent, model=stepped, raw_model=model,
               optimizer=optimizer, amp=autocast(device, precision), accum=accum, plan=plan,
               log=RunLog(run_dir, loggers), progress=TrainProgress(console, plan.end, state.step, enabled=dctx.is_main),
               peak=peak_flops(device, precision) if dctx.is_main else float("nan"))


def announce(run: Run, state: RunState, resume: bool) -> None:
    """The run's first line: parameters, steps (or the time budget), batch, precision, processes."""
    cfg, model, dctx = run.recipe.train, run.raw_model, run.dctx
    precision = resolve_precision(cfg.precision, run.device)
    steps = f"{run.plan.end} steps" if not run.plan.timed else f"steps for {cfg.max_time} of training"
    run.progress.message(f"[bold]{run.stage}[/bold] run [cyan]{run.recipe.run}[/cyan]: {num_params(model):,} "
                         f"parameters ({num_params(model, trainable_only=True):,} trainable), {steps} of "
                         f"{cfg.global_batch_size} sequences, {precision} on {run.device}"
                         + (f" x {dctx.world_size} processes ({cfg.strategy})" if dctx.enabled else "")
                         + (f", resuming at step {state.step}" if resume else ""))


def micro_steps(run: Run, state: RunState, window: Window) -> torch.Tensor | None:
    """Forward and backward of this process's `accum` micro-batches; returns their mean loss, a () tensor."""
    dctx, seed = run.dctx, run.recipe.train.seed
    if state.step + 1 in state.spikes.skip_steps:
        return None
    step_loss = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        index = (state.step * run.accum + micro) * dctx.world_size + dctx.rank
        torch.manual_seed(seed * 1_000_003 + index)  # dropout masks follow the micro-batch, not the rank
        batch = _to_device(run.task.batch(index), run.device)
        with dctx.grad_sync(run.model, last_micro_step=micro == run.accum - 1):
            with run.amp:
                loss = run.task.loss(run.model, batch)
            (loss / run.accum).backward()
        step_loss += loss.detach()
        n_tokens = batch["n_tokens"] * dctx.world_size  # batch shapes match across ranks
        window.tokens += n_tokens
        state.tokens_seen += n_tokens
        window.seq_len = batch["input_ids"].shape[1]
    return step_loss / run.accum


def check_finite(run: Run, state: RunState, last_ckpt: Path | None) -> None:
    """Stop on a non-finite loss on any rank (it has reached every rank's weights through the gradients)."""
    bad = int(run.dctx.max_(state.bad_step))
    if bad >= 0:
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
        raise TrainingDiverged(f"the training loss became non-finite (nan/inf) at step {bad}; stopped, {where}",
                               hint="lower train.lr, raise train.warmup_steps, or check the data; "
                                    "then resume with --resume --allow-change")


def log_step(run: Run, state: RunState, window: Window, lr: float, grad_norm: torch.Tensor | None) -> None:
    """One log.jsonl line and a progress update: the mean loss since the last log over all ranks, speed, MFU."""
    run.dctx.mean_(state.loss_sum)
    seconds = time.perf_counter() - window.start
    tps = window.tokens / seconds if seconds > 0 else 0.0
    # tps counts the tokens of every process; peak is one device's
    flops_per_s = flops_per_token(run.raw_model.config, window.seq_len) * run.task.flops_factor * tps
    mfu = flops_per_s / (run.peak * run.dctx.world_size) if run.peak == run.peak else None
    record = {"step": state.step, "loss": state.take_loss(), "lr": lr,
              "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": state.tokens_seen,
              "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4) if mfu is not None else None,
              "skipped": state.spikes.skipped + len(state.spikes.skip_steps),
              "time": round(state.elapsed, 2), "train_time": round(state.train_time, 2), **run.task.log_fields}
    if (device_mib := peak_device_mb(run.device)) is not None:  # CUDA: the allocator's peak since start
        record["peak_device_mib"] = round(device_mib, 1)
    if run.dctx.is_main:
        run.log.write(record)
    run.progress.update(state.step, {"loss": record["loss"], "lr": lr, "tok/s": round(tps),
                                     "mfu": f"{mfu:.1%}" if mfu is not None else None}, total=run.plan.steps)
    window.reset()


def evaluate(run: Run, state: RunState, window: Window) -> bool:
    """Validation figures (logged, plotted, kept in `state`); True when the best metric improved."""
    started, train_time = time.perf_counter(), state.train_time
    metrics = _metrics(run.raw_model, run.task, run.amp)
    if run.task.on_eval is not None:  # e.g. sampling, on rank 0 alone: from a whole copy of a sharded model
        sampled = run.raw_model
        if run.recipe.train.strategy == "fsdp":
            from llmstages import fsdp  # imported when used: torch.distributed.checkpoint takes ~0.7 s
            sampled = fsdp.plain_copy(run.raw_model, run.device)
        if run.dctx.is_main:
            metrics.update(run.task.on_eval(sampled) or {})
    improved = state.record_eval(metrics, run.recipe.train.best_metric)
    if run.dctx.is_main:
        run.log.write({"step": state.step, **{k: v for k, v in metrics.items() if _loggable(v)},
                       "train_time": round(train_time, 2)})
        run.log.plot(title=run.recipe.run)
        run.progress.message(f"eval @ {state.step}: " + "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    window.start += time.perf_counter() - started  # eval time does not count against tokens/s
    return improved


def commit(run: Run, state: RunState, improved: bool, last_ckpt: Path | None) -> Path | None:
    """Every rank joins (the saved loss window is the mean over ranks, as a log step takes it); rank 0
    commits the checkpoint, records the best and prunes. Returns the new checkpoint on rank 0.
    train.strategy=fsdp: the weights are gathered on rank 0 and every rank writes its optimizer shards.

    Weights and optimizer state are checked finite first (each rank its own shards under fsdp, so the
    ranks decide together): a diverged update is never committed, so `last_ckpt` is always a finite
    checkpoint to go back to."""
    recipe, store, dctx = run.recipe, run.store, run.dctx
    bad = nonfinite({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict()})
    if dctx.any_true(bool(bad), run.device):
        where = f"the last finite checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
        raise TrainingDiverged(f"the weights or optimizer state became non-finite (nan/inf) by step {state.step} "
                               f"({len(bad)} tensors here, e.g. {', '.join(bad[:3]) or 'on another rank'}); "
                               f"not saved, {where}",
                               hint="lower train.lr or train.weight_decay, raise train.warmup_steps; "
                                    "then resume with --resume --allow-change")
    dctx.mean_(state.loss_sum)
    fsdp_format = recipe.train.strategy == "fsdp"  # one process too: the format follows the recipe
    weights = shards = None
    if fsdp_format:
        from llmstages import fsdp
        weights = fsdp.full_state(run.raw_model)  # every rank joins the gather
        shards = lambda tmp: fsdp.save_optimizer(tmp, run.raw_model, run.optimizer)  # noqa: E731
    path = None
    if not dctx.is_main and shards is not None:
        shards(None)  # into the folder rank 0 opens
    if dctx.is_main:
        saved = state.to_saved(None if fsdp_format else run.optimizer.state_dict(), world_size=dctx.world_size,
                               seed=recipe.train.seed, accum=run.accum)
        meta = {"task": run.task.kind, "stage": run.stage, "metrics": state.metrics, "parent": run.parent,
                "data_fingerprint": run.task.data_fingerprint, "tokens_seen": state.tokens_seen, "created": now_iso(),
                "llmstages_version": __version__, "train": to_dict(recipe.train),
                "generate": to_dict(recipe.generate), "data_settings": to_dict(recipe.data), **run.task.meta}
        path = save_checkpoint(store, recipe.run, state.step, run.raw_model, run.tokenizer, meta, saved,
                               weights=weights, shards=shards)
        if improved:
            store.set_best(recipe.run, state.best["step"], state.best["metric"], state.best["value"])
        store.prune(recipe.run, recipe.train.keep_last)
    dctx.barrier()
    return path


def _to_device(batch: Batch, device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loggable(value) -> bool:
    return isinstance(value, (int, float, str, list, dict)) and not isinstance(value, bool)


@torch.no_grad()
def _metrics(model: GPT, task: TrainTask, amp) -> dict:
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
            "training time (s)": round(result.train_seconds, 1),
            "peak memory (MiB)": round(peak_rss_mb(), 1)}
    rows.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if result.best:
        rows[f"best {result.best['metric']}"] = f"{result.best['value']:.4g} @ step {result.best['step']}"
    rows["checkpoint"] = str(result.checkpoint)
    console.print(summary_table(title, rows))
