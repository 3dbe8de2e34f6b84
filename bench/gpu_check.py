"""The CUDA paths measured on one GPU, in one go: bench/gpu_check.sh runs this. Writes one JSON file.

    bench/gpu_check.sh OUT_DIR                 # on a GPU machine: GPT-2 124M sizes, ~5 minutes on an H100/H200
    bench/gpu_check.sh OUT_DIR --cpu-smoke     # anywhere: the same parts at tiny sizes (~2 minutes on 2 cores)
    bench/gpu_check.sh OUT_DIR --only generate,profile   # some parts again (their results replace the old)

Parts, in order (each a function below; every command is the `llmstages` command a user types):
    env        machine, GPU, driver, torch / CUDA / Python versions, deterministic algorithms on or off
    prepare    the shared Gutenberg books with GPT-2's tokenizer (recipes/gpt2-124m.yaml's data step)
    pretrain   recipes/gpt2-124m.yaml as shipped (block 1024, bf16 autocast, torch.compile, fused AdamW)
               for STEPS steps on those books: tokens/s and MFU from log.jsonl, peak GPU memory, the loss
    modern     the same with model.arch=modern train.optimizer=muon
    micro32    the pretrain part with micro-batches of 32 (larger matmuls, twice the activations)
    sync_cost  the pretrain part logging every step (a host-device sync each step) against every 10th
    resume     the same recipe run twice: once straight, once SIGKILLed after its step-10 checkpoint and
               resumed; the largest per-step loss difference (bitwise is not expected: deterministic
               algorithms are off, as in a user's run)
    finetune   `finetune --task spam` and `--task instruct` from the pretrained 124M base: tokens/s
    generate   the KV cache on the device: new tokens/s for batch 1 (generate_tokens, the CLI's path) and
               batch 16 (the same model and cache, 16 prompts), 256 new tokens, fp32 and bf16 weights
    profile    torch.profiler over ACTIVE steps of the pretrain loop after compile and warm-up: the top
               entries, and the host-device syncs per step (aten::_local_scalar_dense, cudaStreamSynchronize)
               with the share of step time the host spent waiting in them

Results go to OUT_DIR/gpu_check.json after every part (a part that fails leaves the earlier ones), the
commands' output to OUT_DIR/gpu_check.log, the profiler's tables to OUT_DIR/profile.txt. The first
failing part stops the script with exit code 1 and the end of its output. Data: $LLMSTAGES_DATA or
--data (gutenberg/, gpt2-tokenizer/, sms_spam/, instruction-data.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run_all import machine  # bench/: the machine as `make bench` records it

from llmstages.runlog import RunLog

REPO = Path(__file__).resolve().parent.parent
PARTS = ("env", "prepare", "pretrain", "modern", "micro32", "sync_cost", "resume", "finetune", "generate", "profile")

# Sizes per mode. GPU: the recipe's micro-batch and block, global batch 64 x 1024 tokens so that 100 steps
# (6.6M tokens) stay inside the books' ~10M; the recipe's 700 warmup steps would leave 100 steps at a
# tiny learning rate, so warmup is 10. Smoke: the same commands on a tiny model.
GPU = dict(steps=100, shape=[], batch=["train.micro_batch_size=16", "train.global_batch_size=64"],
           resume_steps=20, finetune_steps=60, new_tokens=256, prompt_tokens=32, profile_steps=(25, 3, 10))
SMOKE = dict(steps=12, shape=["model.size=tiny", "model.block_size=128", "train.compile=false"],
             batch=["train.micro_batch_size=4", "train.global_batch_size=8"],
             resume_steps=14, finetune_steps=8, new_tokens=16, prompt_tokens=8, profile_steps=(3, 1, 3))
COMMON = ["train.warmup_steps=10", "train.log_every=10", "train.eval_batches=5", "train.keep_last=1"]


class Check:
    def __init__(self, out: Path, work: Path, data: Path, smoke: bool):
        self.out, self.work, self.data, self.smoke = out, work, data, smoke
        self.size = SMOKE if smoke else GPU
        self.store = work / "store"
        self.json_path, self.log_path = out / "gpu_check.json", out / "gpu_check.log"
        self.log = open(self.log_path, "a", buffering=1)  # the commands write into it too
        self.results = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}
        self.env = {**os.environ, "LLMSTAGES_DATA": str(data), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    # --- running commands --------------------------------------------------------------------------
    def llm(self, *args: str) -> float:
        """Run `llmstages --store STORE ARGS...`; its output goes to the log. Returns seconds taken."""
        start = time.perf_counter()
        proc = subprocess.run(self.command(*args), env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            self.fail(f"exit {proc.returncode}: llmstages {' '.join(args)}")
        return time.perf_counter() - start

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "llmstages", "--store", str(self.store), *args]

    def say(self, text: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)
        self.log.write(f"\n### {text}\n")
        self.log.flush()

    def fail(self, what: str) -> None:
        self.log.flush()
        tail = self.log_path.read_text()[-4000:] if self.log_path.exists() else ""
        print(tail, file=sys.stderr)
        print(f"gpu_check FAILED: {what}", file=sys.stderr)
        raise SystemExit(1)

    def save(self, part: str, result: dict) -> None:
        self.results[part] = result
        self.json_path.write_text(json.dumps(self.results, indent=2))
        print(json.dumps({part: result})[:2000], flush=True)

    def log_records(self, run: str) -> list[dict]:
        return RunLog(self.store / "runs" / run).records()  # [] before the run logs; a half-written line skipped

    def train_figures(self, run: str) -> dict:
        """Speed and loss from a run's log.jsonl: the first logged window holds compile, so it is left out."""
        records = self.log_records(run)
        steps = [r for r in records if "tokens_per_s" in r]
        evals = [r for r in records if "val_loss" in r]
        timed = steps[1:] or steps
        mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
        return {"steps": steps[-1]["step"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "mfu": statistics.median(mfu) if mfu else None,
                "first_window_tokens_per_s": steps[0]["tokens_per_s"],
                "peak_device_mib": max((r.get("peak_device_mib") or 0) for r in steps) or None,
                "train_loss_first": steps[0]["loss"], "train_loss_last": steps[-1]["loss"],
                "val_loss": [(r["step"], round(r["val_loss"], 4)) for r in evals],
                "train_time_s": steps[-1].get("train_time")}

    # --- the parts ---------------------------------------------------------------------------------
    def part_env(self) -> dict:
        import torch
        info = {"mode": "cpu-smoke" if self.smoke else "gpu", **machine(), "cuda_version": torch.version.cuda,
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        from llmstages.runtime import peak_flops, resolve_device, resolve_precision
        device = resolve_device("auto")
        precision = resolve_precision("auto", device)
        info.update(device=str(device), precision_auto=precision, mfu_peak_flops=peak_flops(device, precision))
        return info

    def fresh_run_args(self, run: str, *extra: str) -> list[str]:
        """`pretrain`'s arguments for a new run `run` (an earlier one of that name, from a part run before
        with --only, is removed first)."""
        shutil.rmtree(self.store / "runs" / run, ignore_errors=True)
        return ["gpt2-124m", f"run={run}", f"data.source={self.data / 'gutenberg'}", *self.size["shape"],
                *self.size["batch"], *COMMON, *extra]

    def part_prepare(self) -> dict:
        seconds = self.llm("prepare", *self.fresh_run_args("gpt2-124m"))
        return {"seconds": round(seconds, 1)}

    def timed_pretrain(self, run: str, *extra: str, eval_every: int | None = None) -> dict:
        """`pretrain` of a new run for the mode's step count (eval at `eval_every`, default the last step):
        wall time and the run's figures."""
        steps = self.size["steps"]
        seconds = self.llm("pretrain", *self.fresh_run_args(run, *extra, f"train.max_steps={steps}",
                                                            f"train.eval_every={eval_every or steps}",
                                                            f"train.save_every={steps}"))
        return {"wall_s": round(seconds, 1), **self.train_figures(run)}

    def part_pretrain(self) -> dict:
        return self.timed_pretrain("gpt2-124m", eval_every=self.size["steps"] // 2)

    def part_modern(self) -> dict:
        return self.timed_pretrain("modern-muon", "model.arch=modern", "train.optimizer=muon",
                                   eval_every=self.size["steps"] // 2)

    def part_micro32(self) -> dict:
        """The pretrain part with micro-batches of 32 (accumulation 2 instead of 4): larger matmuls."""
        return self.timed_pretrain("micro32", "train.micro_batch_size=8" if self.smoke else "train.micro_batch_size=32")

    def part_sync_cost(self) -> dict:
        """The pretrain part logging every step (the loss, grad norm and finite check read back each step,
        instead of every 10th): what those host-device syncs cost, as a tokens/s ratio."""
        self.timed_pretrain("log-every-step", "train.log_every=1")
        records = [r for r in self.log_records("log-every-step") if "tokens_per_s" in r][10:]  # past compile
        every_step = statistics.median(r["tokens_per_s"] for r in records)
        every_10th = self.results.get("pretrain", {}).get("tokens_per_s")
        return {"tokens_per_s_log_every_step": round(every_step, 1), "tokens_per_s_log_every_10": every_10th,
                "ratio": round(every_step / every_10th, 4) if every_10th else None}

    def part_resume(self) -> dict:
        steps, kill_after = self.size["resume_steps"], 10
        args = [f"train.max_steps={steps}", "train.save_every=10", "train.log_every=1", "train.eval_every=0"]
        self.llm("pretrain", *self.fresh_run_args("resume-straight", *args))
        run_b = self.fresh_run_args("resume-killed", *args)
        killed_at = self.kill_after_checkpoint(run_b, kill_after)
        self.llm("pretrain", *run_b, "--resume")
        straight = {r["step"]: r["loss"] for r in self.log_records("resume-straight") if "tokens_per_s" in r}
        resumed = {r["step"]: r["loss"] for r in self.log_records("resume-killed") if "tokens_per_s" in r}
        if sorted(straight) != sorted(resumed):
            self.fail(f"resume: logged steps differ: {sorted(straight)} vs {sorted(resumed)}")
        diffs = {step: abs(straight[step] - resumed[step]) for step in straight}
        after = [d for step, d in diffs.items() if step > kill_after]
        before = [d for step, d in diffs.items() if step <= kill_after]  # two processes, no resume yet
        return {"steps": steps, "checkpoint_step": kill_after, "killed_while_at_step": killed_at,
                "max_abs_loss_diff_before_kill": max(before), "max_abs_loss_diff_after_resume": max(after),
                "bitwise_equal": all(d == 0 for d in diffs.values()),
                "loss_at_last_step": [straight[steps], resumed[steps]]}

    def kill_after_checkpoint(self, args: list[str], step: int) -> int:
        """Start `pretrain ARGS`, SIGKILL it once checkpoint `step` is committed and a later step is logged."""
        run_dir = self.store / "runs" / "resume-killed"
        proc = subprocess.Popen(self.command("pretrain", *args), env=self.env, stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            logged = self.log_records("resume-killed")
            last = max((r["step"] for r in logged if "tokens_per_s" in r), default=0)
            if (run_dir / f"step-{step:06d}").is_dir() and last > step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return last
            time.sleep(0.05)
        self.fail(f"resume: the run ended (exit {proc.poll()}) before it could be killed after step {step}")

    def part_finetune(self) -> dict:
        steps = self.size["finetune_steps"]
        common = ["init_from=gpt2-124m", f"train.max_steps={steps}", "train.epochs=0", "train.log_every=10",
                  f"train.eval_every={steps}", f"train.save_every={steps}", "train.eval_batches=5"]
        result = {}
        for task, extra in (("spam", ["train.lr=5e-5", "train.min_lr=5e-6"]),
                            ("instruct", ["finetune.eval_samples=1"])):
            run = f"{task}-gpu"
            shutil.rmtree(self.store / "runs" / run, ignore_errors=True)
            seconds = self.llm("finetune", "--task", task, f"run={run}", *common, *extra)
            figures = self.train_figures(run)
            result[task] = {"wall_s": round(seconds, 1), **{k: figures[k] for k in
                            ("steps", "tokens_per_s", "mfu", "peak_device_mib", "train_loss_first", "train_loss_last")}}
        return result

    def part_generate(self) -> dict:
        import torch

        from llmstages.checkpoint import load_checkpoint
        from llmstages.runtime import resolve_device
        from llmstages.store import Store
        device = resolve_device("auto")
        ckpt = load_checkpoint("gpt2-124m", Store(self.store), device=device)
        new, prompt_len = self.size["new_tokens"], self.size["prompt_tokens"]
        result = {"new_tokens": new, "prompt_tokens": prompt_len, "device": str(device)}
        for dtype in (torch.float32, torch.bfloat16):
            model = ckpt.model.to(dtype).eval()
            name = str(dtype).removeprefix("torch.")
            for batch in (1, 16):
                timed_generation(model, batch, prompt_len, 8, device)  # warm-up
                seconds = min(timed_generation(model, batch, prompt_len, new, device) for _ in range(2))
                result[f"{name}_batch{batch}_tokens_per_s"] = round(batch * new / seconds, 1)
        # The CLI end to end (load, tokenize, stream; on the GPU by default)
        start = time.perf_counter()
        proc = subprocess.run(self.command("generate", "gpt2-124m", "It was a dark and stormy night", "-n", str(new),
                                           "--min-new-tokens", str(new), "-t", "0", "--json"),
                              env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            self.log.write(proc.stdout + proc.stderr)
            self.fail(f"exit {proc.returncode}: llmstages generate")
        reply = json.loads(proc.stdout)
        result["cli_generate"] = {"wall_s": round(time.perf_counter() - start, 2),
                                  **{k: v for k, v in reply.items() if k not in ("text", "prompt")}}
        return result

    def part_profile(self) -> dict:
        wait, warmup, active = self.size["profile_steps"]
        steps = wait + warmup + active + 1
        argv = self.command("pretrain", *self.fresh_run_args("profiled", f"train.max_steps={steps}",
                                                              "train.eval_every=0", f"train.save_every={steps}"))
        code = f"import gpu_check; gpu_check.profile_child({argv[2:]!r}, {wait}, {warmup}, {active}, {str(self.out)!r})"
        env = {**self.env, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), self.env["PYTHONPATH"]])}
        proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            self.fail(f"profile: exit {proc.returncode}")
        return json.loads((self.out / "profile.json").read_text())


# Host-side calls that wait for the device: an .item() / float() of a device tensor, explicit syncs, and
# synchronous device-to-host copies.
SYNC_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
              "cudaEventSynchronize", "cudaMemcpy")


def profile_child(argv: list[str], wait: int, warmup: int, active: int, out: str) -> None:
    """`llmstages ARGV` in this process under torch.profiler, which records steps wait+warmup+1 ..
    wait+warmup+active (the loop's micro_steps is wrapped to mark each step's start). Writes
    OUT/profile.json (syncs per step, the device's busy share) and OUT/profile.txt (the top entries)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import llmstages.loop as loop
    from llmstages.cli import run
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))
    original = loop.micro_steps

    def marked(*args, **kwargs):
        prof.step()  # a step boundary for the profiler's schedule
        return original(*args, **kwargs)

    loop.micro_steps = marked
    sys.argv = argv
    with prof:
        try:
            run()
        except SystemExit as exit_:
            if exit_.code:
                raise
    events = prof.key_averages()
    # The profiler's own step ranges: host time per step, and the time of the kernels inside them. (The
    # wall clock between step starts would also count the trace processing when recording ends.)
    step = next(e for e in events if e.key.startswith("ProfilerStep"))
    host_ms = step.cpu_time_total / step.count / 1e3
    device_ms = _device_total_us(step) / step.count / 1e3
    syncs = {e.key: {"calls_per_step": e.count / active, "host_ms_per_step": e.self_cpu_time_total / active / 1e3}
             for e in events if e.key.startswith(SYNC_NAMES)}
    ranked = [e for e in events if not e.key.startswith("ProfilerStep")]
    result = {"recorded_steps": step.count, "step_ms": round(host_ms, 2),
              "kernel_ms_per_step": round(device_ms, 2) if cuda else None,
              "device_busy_share": round(device_ms / host_ms, 4) if cuda else None,
              "syncs": syncs,
              "top_self_cpu": _top(ranked, lambda e: e.self_cpu_time_total, active),
              "top_self_device": _top(ranked, _device_self_us, active) if cuda else []}
    Path(out, "profile.json").write_text(json.dumps(result, indent=2))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    Path(out, "profile.txt").write_text(events.table(sort_by=sort, row_limit=30) + "\n\n"
                                        + events.table(sort_by="self_cpu_time_total", row_limit=30))


def _device_self_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _device_total_us(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def _top(events, key, steps: int, n: int = 8) -> list[dict]:
    ranked = sorted(events, key=key, reverse=True)[:n]
    return [{"name": e.key[:80], "ms_per_step": round(key(e) / steps / 1e3, 3), "calls_per_step": e.count / steps}
            for e in ranked]


def timed_generation(model, batch: int, prompt_len: int, new_tokens: int, device) -> float:
    """Greedy decoding of `new_tokens` for `batch` prompts with the KV cache; seconds (device synced).
    Batch 1 goes through generate_tokens (what `llmstages generate` runs); batch > 1 drives the same
    model and KVCache directly, one position per step for all rows."""
    import torch

    from llmstages.blocks import KVCache
    from llmstages.sampling import generate_tokens
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        if batch == 1:
            produced = list(generate_tokens(model, prompts[0].tolist(), max_new_tokens=new_tokens))
            assert len(produced) == new_tokens
        else:
            dtype = next(model.parameters()).dtype
            cache = KVCache(model.config, batch, prompt_len + new_tokens, device, dtype)
            logits = model(prompts.to(device), cache, last_only=True)[:, -1]  # (B, V)
            for _ in range(new_tokens - 1):
                logits = model(logits.argmax(-1, keepdim=True), cache, last_only=True)[:, -1]
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, any machine (a test of this script)")
    parser.add_argument("--only", default="", help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--data", type=Path, default=os.environ.get("LLMSTAGES_DATA") or REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmstages-gpu-check"),
                        help="the store and scratch files (kept between --only runs)")
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p] or list(PARTS)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--only: unknown parts {sorted(unknown)}; the parts are {','.join(PARTS)}")
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --cpu-smoke to check the script on a CPU")
    for name in ("gutenberg", "gpt2-tokenizer", "sms_spam", "instruction-data.json"):
        if not (args.data / name).exists():
            parser.error(f"{args.data / name} is missing: pass --data DIR or set LLMSTAGES_DATA")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.work, args.data.resolve(), args.cpu_smoke)
    for part in parts:
        check.say(f"part {part}")
        start = time.perf_counter()
        result = getattr(check, f"part_{part}")()
        check.save(part, {**result, "part_seconds": round(time.perf_counter() - start, 1)})
    check.say("done")


if __name__ == "__main__":
    main()
