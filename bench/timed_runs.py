"""Training runs under a wall-clock budget (train.max_time), for bench_recipes.py and ablate.py.

Each run is `llmstages pretrain RECIPE train.max_time=BUDGET ...` in its own process, in a store of
its own (default ./store-bench): the data is prepared once, before anything is timed. What a run
reports comes from its log.jsonl: the val bits/byte of every evaluation against `train_time` (the
training seconds: evaluation and checkpoint time are not counted, so frequent evaluations do not
shorten the training; the eval seconds are reported beside them).

Two clocks (--clock in the scripts that use this):
  wall   each run is `train.max_time=BUDGET`: what a user gets, but a busy host (other processes on the
         same cores) takes steps from whichever run it overlaps, so two runs of one budget can differ;
  steps  the seconds per step of each recipe are measured first, in short runs interleaved over a few
         rounds (the fastest round counts: the least disturbed), and each run then trains
         round(BUDGET / step time) steps with `train.max_steps`. A WSD or cosine run of N steps is, bit
         for bit, the timed run that fixed its count at N (tests/test_budget.py), so this is the same
         comparison with the load of the host taken out of the losses; times are step x step time.

Not a benchmark itself: run_all.py runs bench_recipes.py (and ablate.py when asked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("LLMSTAGES_TEST_DATA", REPO.parent / "shared" / "data"))

# --quick: a smoke test of seconds on Tiny Shakespeare with a tiny model; its figures mean nothing.
QUICK_DATA = [f"data.source={DATA / 'tinyshakespeare.txt'}", "data.mirror=", "data.name=bench-quick",
              "data.vocab_size=512", "data.tokenizer_sample_bytes=0", "data.strip_gutenberg=false"]
QUICK_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
               "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=2",
               "train.eval_batches=2", "train.eval_every=100"]


@dataclass
class Run:
    """One finished training run: its figures from log.jsonl."""

    label: str
    budget_s: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (train_time s, val bits/byte) per eval
    step_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val bits/byte) per eval
    steps: int = 0
    train_s: float = 0.0  # training seconds (what the budget counts)
    wall_s: float = 0.0  # the whole process: start-up, training, evaluations, checkpoints
    error: str | None = None

    @property
    def final_bpb(self) -> float | None:
        return self.curve[-1][1] if self.curve else None

    def as_dict(self) -> dict:
        return {"budget_s": self.budget_s, "val_bpb": self.final_bpb, "steps": self.steps,
                "train_s": round(self.train_s, 1), "wall_s": round(self.wall_s, 1),
                "eval_and_startup_s": round(self.wall_s - self.train_s, 1),
                "curve": [[round(t, 1), round(b, 4)] for t, b in self.curve], "error": self.error}


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.setdefault("LLMSTAGES_DATA", str(DATA))
    return subprocess.run([sys.executable, "-m", "llmstages", "--store", str(store), *args], capture_output=True,
                          text=True, env=env, cwd=REPO)


def prepare(store: Path, recipe: str, overrides: list[str]) -> None:
    """Prepare the recipe's dataset (once; a prepared one is reused) so no timed run prepares."""
    out = cli(store, "prepare", recipe, *overrides)
    if out.returncode != 0:
        raise SystemExit(f"prepare {recipe} {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")


def train(store: Path, recipe: str, label: str, budget_s: float, overrides: list[str],
          step_s: float | None = None, reuse: bool = False) -> Run:
    """Train `recipe` for `budget_s` training seconds as run `label` (replacing an earlier one).

    step_s None: the wall clock (train.max_time). Else the steps clock: round(budget_s / step_s) steps,
    and the run's times are step x step_s. reuse (steps clock only): a finished run of that label and
    step count already in the store is read instead of trained again (the same overrides are assumed).
    """
    run_dir = store / "runs" / label
    steps = None if step_s is None else max(1, round(budget_s / step_s))
    if reuse and steps is not None and finished_steps(run_dir) == steps:
        return read_run(Run(label, budget_s, wall_s=float("nan")), run_dir, step_s)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the bench's own store: a rerun of the bench starts the run again
    length = f"train.max_time={budget_s:g}s" if steps is None else f"train.max_steps={steps}"
    start = time.perf_counter()
    out = cli(store, "pretrain", recipe, f"run={label}", length, "train.save_every=0", *overrides)
    run = Run(label, budget_s, wall_s=time.perf_counter() - start)
    if out.returncode != 0:
        run.error = "\n".join(out.stderr.strip().splitlines()[-5:])
        return run
    return read_run(run, run_dir, step_s)


def finished_steps(run_dir: Path) -> int | None:
    """The step of the last evaluation in a run's log (a finished run ends with one), None without a log."""
    try:
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    evals = [r["step"] for r in records if "val_bpb" in r]
    return evals[-1] if evals else None


def read_run(run: Run, run_dir: Path, step_s: float | None) -> Run:
    """Fill `run` from its log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    run.step_curve = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    run.curve = [(r["train_time"], r["val_bpb"]) for r in records if "val_bpb" in r and "train_time" in r]
    steps = [r for r in records if "loss" in r]
    run.steps = steps[-1]["step"] if steps else 0
    run.train_s = steps[-1]["train_time"] if steps else 0.0
    if step_s is not None:  # the steps clock: times from the measured step time, not this run's own
        run.curve = [(step * step_s, bpb) for step, bpb in run.step_curve]
        run.train_s = run.steps * step_s
    return run


def step_time(store: Path, recipe: str, label: str, overrides: list[str], steps: int = 30) -> float | None:
    """Seconds per training step of `recipe` in a short run: the time of steps 11..`steps` (the first
    10 are left out: allocation and warm caches), None when the run failed."""
    run_dir = store / "runs" / label
    if run_dir.exists():
        shutil.rmtree(run_dir)
    out = cli(store, "pretrain", recipe, f"run={label}", f"train.max_steps={steps}", "train.save_every=0",
              "train.log_every=10", f"train.eval_every={steps}", "train.eval_batches=1", *overrides)
    if out.returncode != 0:
        return None
    times = {r["step"]: r["train_time"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
             if "loss" in r}
    return (times[steps] - times[10]) / (steps - 10) if 10 in times and steps in times else None


def step_times(store: Path, recipes: dict[str, tuple[str, list[str]]], rounds: int = 3) -> dict[str, float]:
    """name -> seconds per step for each (recipe, overrides), measured in `rounds` interleaved rounds;
    the fastest round counts (a busy host only ever slows a step down)."""
    seen: dict[str, list[float]] = {name: [] for name in recipes}
    for round_index in range(rounds):
        for name, (recipe, overrides) in recipes.items():
            print(f"step time: round {round_index + 1}, {name}", file=sys.stderr, flush=True)
            seconds = step_time(store, recipe, f"steptime-{name}", overrides)
            if seconds is not None:
                seen[name].append(seconds)
    missing = [name for name, values in seen.items() if not values]
    if missing:
        raise SystemExit(f"step time: the short runs of {', '.join(missing)} failed (run one by hand to see why)")
    return {name: min(values) for name, values in seen.items()}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first training time at which the val bits/byte reach `target`, linear between evaluations
    (None: never reached)."""
    for (t0, b0), (t1, b1) in zip([(0.0, float("inf"))] + curve, curve):
        if b1 <= target:
            if b0 == float("inf") or b0 == b1:
                return t1
            return t0 + (b0 - target) / (b0 - b1) * (t1 - t0)
    return None


def time_to_from_budgets(points: list[tuple[float, float]], target: float) -> float | None:
    """The same from the (budget, final val bits/byte) of annealed runs: each point is a run that
    ended at min_lr, so this is the time an annealed run needs (None: no budget reached it)."""
    return time_to(sorted(points), target)


def add_clock_args(parser: argparse.ArgumentParser) -> None:
    """--precision, --clock and --step-rounds: what every equal-time bench takes (see the docstring)."""
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="resolved once ('auto': bf16 where it is fast) and used by every run")
    parser.add_argument("--clock", default="steps", choices=("steps", "wall"),
                        help="steps: budgets as steps at each run's measured step time (robust to a busy "
                             "host); wall: train.max_time")
    parser.add_argument("--step-rounds", type=int, default=3, help="--clock steps: rounds of step-time runs")


def parse_budget(text: str) -> float:
    from llmstages.config import parse_duration
    return parse_duration(text)


def machine(precision: str) -> dict:
    """The machine (CPU model, cores, fast bf16) and the precision the runs used."""
    sys.path.insert(0, str(HERE))
    from run_all import machine as describe
    import torch

    from llmstages.runtime import resolve_precision
    return dict(describe(), precision=resolve_precision(precision, torch.device("cpu")))


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
