"""The loss-spike policy (`train.spike`): what the loop does when a step's loss jumps.

A spike is a step loss above `train.spike_threshold` x the median of the last `spike_window` step
losses that were not spikes (checked once `spike_min_steps` are in), and above the task's floor
(TrainTask.spike_floor): for a classifier ln(classes), the loss of a uniform guess. A classifier's
median loss falls near 0, and a batch of 16 with one confident mistake is then "3x the median"
without being anything a run should stop for (a spam fine-tune logged about 200 such warnings in 889
steps). The memory of it lives in `RunState.spikes` (runstate.SpikeGuard), so a resumed run decides
as the uninterrupted one would.

    warn      log it (log.jsonl gets {"step", "spike", "median"}); training goes on unchanged. The
              losses are checked at the next log step, so warn costs no host sync per step.
    skip      drop that step's update (the loss is read before the optimizer step: one sync per step);
              the count is in the log as "skipped".
    rollback  go back to the last committed checkpoint (weights, optimizer, RunState, RNGs) and skip the
              spiking step's micro-batches when the run gets there again (RunState.spikes.skip_steps).

skip and rollback stop the run (exit 1) after `spike_max` spikes in a row: that is divergence, not a
bad batch. Every rank decides on the loss averaged over the ranks, so all ranks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from llmstages.checkpoint import load_state
from llmstages.config import Recipe, TrainConfig
from llmstages.distributed import DistContext
from llmstages.errors import UserError
from llmstages.runlog import RunLog, TrainProgress
from llmstages.runstate import RunState, restore_rng
from llmstages.store import STEP_RE, Store



class Run(Protocol):
    """What the spike policy reads of loop.Run (a Protocol, so this module need not import loop.py)."""

    recipe: Recipe
    dctx: DistContext
    store: Store
    log: RunLog
    progress: TrainProgress


class TooManySpikes(UserError):
    exit_code = 1  # as a diverged run


@dataclass
class Spike:
    step: int
    loss: float
    median: float

    def record(self) -> dict:
        return {"step": self.step, "spike": self.loss, "median": self.median}

    def text(self, what: str) -> str:
        return (f"loss spike at step {self.step}: {self.loss:.4g} is {self.loss / self.median:.1f}x the median "
                f"{self.median:.4g} of the recent steps; {what}")


def observe(cfg: TrainConfig, state: RunState, step: int, loss: float, floor: float) -> Spike | None:
    median = state.spikes.observe(loss, cfg.spike_threshold, cfg.spike_window, cfg.spike_min_steps, floor)
    return Spike(step, loss, median) if median is not None else None


def check_now(cfg: TrainConfig, dctx: DistContext, state: RunState, step_loss: torch.Tensor,
              floor: float) -> Spike | None:
    """skip / rollback: is the step about to be taken (state.step + 1) a spike? Syncs with the device.
    Stops the run after spike_max spikes in a row."""
    loss = float(dctx.mean_(step_loss.detach().clone()))
    spike = observe(cfg, state, state.step + 1, loss, floor)
    if spike is not None and state.spikes.in_a_row >= cfg.spike_max:
        _too_many(state.spikes.in_a_row, spike)
    return spike


def check_rollbacks(cfg: TrainConfig, state: RunState, spike: Spike) -> None:
    """rollback: the steps skipped in a row up to this spike (a replay after a rollback resets in_a_row)."""
    skipped, n = set(state.spikes.skip_steps), 1
    while spike.step - n in skipped:
        n += 1
    if n >= cfg.spike_max:
        _too_many(n, spike)


def _too_many(n: int, spike: Spike) -> None:
    raise TooManySpikes(f"{n} loss spikes in a row (the last at step {spike.step}: {spike.loss:.4g} against a "
                        f"median of {spike.median:.4g}); the run is diverging",
                        hint="lower train.lr or raise train.warmup_steps, then resume with --resume "
                             "--allow-change from the last checkpoint")


def flush(cfg: TrainConfig, dctx: DistContext, state: RunState, floor: float) -> list[Spike]:
    """warn: check the step losses gathered since the last log step (one sync for all of them)."""
    pending, state.spikes.pending = state.spikes.pending, []
    if not pending:
        return []
    losses = dctx.mean_(torch.stack([loss.detach().float() for _, loss in pending])).tolist()
    return [spike for (step, _), loss in zip(pending, losses) if (spike := observe(cfg, state, step, loss, floor))]


def roll_back(path: Path, state: RunState, model: torch.nn.Module, optimizer, device: torch.device) -> RunState:
    """The RunState of checkpoint `path` (its weights, optimizer state and RNGs restored), keeping what
    the spike policy has learnt since: the steps to skip, the spikes in a row."""
    tensors, info = load_state(path, model)
    optimizer.load_state_dict(tensors["optimizer"])
    restore_rng(tensors, info)
    new = RunState.from_saved(tensors, info)
    new.spikes.skip_steps = sorted(set(new.spikes.skip_steps) | set(state.spikes.skip_steps))
    new.spikes.in_a_row, new.spikes.skipped = state.spikes.in_a_row, state.spikes.skipped
    new.elapsed_before, new.started = state.elapsed_before, state.started  # time spent is not rolled back
    return new.to(device)


def action(run: Run, state: RunState, step_loss: torch.Tensor | None) -> str:
    """What to do with the step just computed: "step" (take it), "skip" (drop its update; also a step a
    rollback skips), or "rollback" (to the last checkpoint), as train.spike says (module docstring)."""
    cfg = run.recipe.train
    if step_loss is None:
        return "skip"
    if cfg.spike == "warn":
        state.spikes.pending.append((state.step + 1, step_loss))  # checked at the next log step
        return "step"
    spike = check_now(cfg, run.dctx, state, step_loss, run.task.spike_floor)
    if spike is None:
        return "step"
    target = run.store.latest(run.recipe.run) if cfg.spike == "rollback" else None
    if target is None:  # skip, or a rollback before the first checkpoint
        state.spikes.skipped += 1
        say(run, spike, f"update skipped ({state.spikes.skipped} so far)")
        return "skip"
    state.spikes.skip_steps.append(spike.step)
    check_rollbacks(cfg, state, spike)
    if run.dctx.is_main:  # the steps after the checkpoint are trained again: their log lines go, as on resume
        run.log.truncate_after(int(STEP_RE.fullmatch(target.name).group(1)))
    say(run, spike, f"rolled back to {target.name}; this step's micro-batches will be skipped")
    return "rollback"


def say(run: Run, spike: Spike, what: str) -> None:
    """A spike into log.jsonl and onto the console, on rank 0, with what was done about it."""
    if run.dctx.is_main:
        run.log.write(spike.record())
        run.progress.message(spike.text(what))
