"""Everything a training run carries from one optimizer step to the next, and its saved form.

    step, tokens_seen               where the run is
    elapsed                         training seconds so far, over every process that ran it
    excluded, train_time            of those, the seconds spent evaluating and committing checkpoints,
                                    and the rest (what train.max_time counts)
    plan                            a time-budgeted run's fixed step count, once fixed (budget.py)
    best, evals_since_best          the best evaluation so far, and the evaluations since (patience)
    metrics                         the figures of the last evaluation
    loss_sum, loss_count            the loss window: step losses summed on the device since the last log
    bad_step                        the first step whose loss was not finite (-1: none), on the device
    spikes                          the loss-spike policy's memory (SpikeGuard): recent losses, spikes
                                    in a row, steps skipped, steps whose micro-batches a rollback skips
    RNG states                      taken when saved, set again on resume (torch, CUDA, Python, NumPy)

`to_saved` / `from_saved` are the one place that turns a RunState into a checkpoint's train state
and back: tensors for `train_state.pt`, plain data for `train_state.json`. checkpoint.py owns the
files themselves.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SpikeGuard:
    """Loss spikes: a step loss above `threshold` x the median of the recent step losses (train.spike).

    `window` holds the last step losses that were not spikes (host floats, oldest first); `pending`
    the (step, loss on the device) pairs a `warn` policy checks later, at the next log step, so that
    training needs no host sync per step. `skip_steps` are the steps whose micro-batches a rollback
    skips (1-based step numbers)."""

    window: list[float] = field(default_factory=list)
    in_a_row: int = 0
    skipped: int = 0
    skip_steps: list[int] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # not saved: empty at a commit

    def observe(self, loss: float, threshold: float, size: int, min_steps: int, floor: float = 0.0) -> float | None:
        """Take one step loss; the median it is a spike against, or None when it is none (kept then).
        A loss at or below `floor` is never a spike."""
        if len(self.window) >= min_steps and math.isfinite(loss):
            median = statistics.median(self.window)
            if loss > threshold * median and loss > floor:
                self.in_a_row += 1
                return median
        self.in_a_row = 0
        self.window = (self.window + [loss])[-size:]
        return None

    def to_saved(self) -> dict:
        return {"window": self.window, "in_a_row": self.in_a_row, "skipped": self.skipped,
                "skip_steps": self.skip_steps}

    @classmethod
    def from_saved(cls, info: dict | None) -> "SpikeGuard":
        info = info or {}
        return cls(window=list(info.get("window", [])), in_a_row=info.get("in_a_row", 0),
                   skipped=info.get("skipped", 0), skip_steps=list(info.get("skip_steps", [])))


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process started (a resumed run)
    excluded: float = 0.0  # seconds of `elapsed` spent in evaluation and checkpoint commits
    plan: dict | None = None  # {"steps": N, "budget": seconds}: a time budget's fixed step count
    best: dict | None = None  # {"step", "metric", "value"}
    evals_since_best: int = 0
    metrics: dict = field(default_factory=dict)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # () on the training device
    loss_count: int = 0
    bad_step: torch.Tensor = field(default_factory=lambda: torch.full((), -1, dtype=torch.long))  # ()
    spikes: SpikeGuard = field(default_factory=SpikeGuard)
    started: float = field(default_factory=time.perf_counter)  # this process's start (not saved)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def train_time(self) -> float:
        """Seconds spent training so far, evaluation and checkpoint commits left out."""
        return self.elapsed - self.excluded

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (evaluation, checkpoint commits)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def to(self, device: torch.device) -> "RunState":
        """The device-side figures moved to `device` (the hot loop never syncs with the host)."""
        self.loss_sum, self.bad_step = self.loss_sum.to(device), self.bad_step.to(device)
        return self

    def add_step(self, step_loss: torch.Tensor | None) -> None:
        """Count one optimizer step with its mean loss (a () tensor on the device; no host sync); None for
        a step whose micro-batches a rollback skips."""
        if step_loss is None:
            self.step += 1
            return
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(step_loss), self.step + 1, self.bad_step)
        self.loss_sum += step_loss
        self.loss_count += 1
        self.step += 1

    def take_loss(self) -> float | None:
        """The mean loss of the window since the last log (syncs with the device), and a new window
        (None when every step of the window was skipped by a rollback)."""
        loss = float(self.loss_sum) / self.loss_count if self.loss_count else None
        self.loss_sum.zero_()
        self.loss_count = 0
        return loss

    def record_eval(self, metrics: dict, metric: str) -> bool:
        """Keep an evaluation's figures; True when `metric` is better than the best so far (never for
        train.best_metric=none: no checkpoint is marked best)."""
        self.metrics = metrics
        value = metrics.get(metric)
        if metric == "none" or not isinstance(value, (int, float)):
            return False
        old = self.best["value"] if self.best and self.best.get("metric") == metric else None
        improved = old is None or (value < old if metric == "val_loss" else value > old)
        if improved:
            self.best = {"step": self.step, "metric": metric, "value": value}
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    # --- the saved form ------------------------------------------------------------------------------
    def to_saved(self, optimizer_state: dict | None, *, world_size: int, seed: int, accum: int) -> tuple[dict, dict]:
        """(tensors, info) for a checkpoint: this state, the optimizer's, and the RNG states right now."""
        tensors, rng = _rng_state()
        tensors["loss_sum"] = self.loss_sum.detach().cpu()
        if optimizer_state is not None:  # None: train.strategy=fsdp saves it sharded, beside (fsdp.py)
            tensors["optimizer"] = optimizer_state
        info = {"step": self.step, "tokens_seen": self.tokens_seen, "loss_count": self.loss_count, "best": self.best,
                "evals_since_best": self.evals_since_best, "metrics": self.metrics, "rng": rng,
                "elapsed": self.elapsed, "excluded": self.excluded, "plan": self.plan, "world_size": world_size,
                "spikes": self.spikes.to_saved(),
                "sampler": {"kind": "indexed", "seed": seed, "next_micro_batch": self.step * accum * world_size}}
        return tensors, info

    @classmethod
    def from_saved(cls, tensors: dict, info: dict) -> "RunState":
        """The state a checkpoint saved (the RNG states are set by `restore_rng`, once the model is built)."""
        return cls(step=info["step"], tokens_seen=info["tokens_seen"], elapsed_before=info.get("elapsed", 0.0),
                   excluded=info.get("excluded", 0.0), plan=info.get("plan"),
                   best=info.get("best"), evals_since_best=info.get("evals_since_best", 0),
                   metrics=info.get("metrics", {}), loss_sum=tensors["loss_sum"], loss_count=info.get("loss_count", 0),
                   spikes=SpikeGuard.from_saved(info.get("spikes")))


def restore_rng(tensors: dict, info: dict) -> None:
    """Set every RNG to the states a checkpoint saved, so dropout and sampling continue exactly."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, state, gauss = info["rng"]["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = info["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    info = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, info
