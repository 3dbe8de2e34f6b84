"""How many optimizer steps a run has: a fixed count (train.max_steps, or train.epochs), or as many as
fit in a time budget (train.max_time).

A time budget counts training time only: forward, backward, optimizer steps and logging. Evaluation
and checkpoint commits are left out (RunState.excluded), so they can be frequent without shortening
the training; a 10-minute run with evaluations takes a little more than 10 minutes of wall clock.
log.jsonl has both: `time` (wall clock, evaluations included) and `train_time` (what the budget counts).

The plan, remade after every step until it is fixed (`StepPlan.update`):
    r = the mean step time over the later half of this process's steps so far, its first
        WARMUP_STEPS left out (compilation, allocator and cache warm-up make those slow): steady
        enough to ignore one slow step, recent enough to follow a change of speed
    N = s + floor((budget - t) / r): the s steps done plus those that fit in the time left, t being
        the train_time so far
The schedule runs against N. When the next step reaches the start of N's final `decay_frac`
(optim.decay_start: where wsd's warm-down begins), N is fixed and saved in the run state. From then
on the lr values and the last step do not depend on timing:
  - a checkpoint written after that point resumes exactly: the same lr values, the same last step,
    the same losses;
  - a wsd run is then step for step the run with max_steps=N: before its warm-down wsd's lr does not
    depend on N (warmup, then constant), and N is fixed so that the warm-down starts at the step
    where the estimate placed it;
  - the last step runs at min_lr (cosine too: `end_on_last`).
Before N is fixed, a resumed run measures r again and plans with the time left: the budget minus
the checkpoint's train_time. The time a killed process spent after its last checkpoint is not
counted; those steps are done again.
If the steps slow down after N is fixed and the budget runs out first, the run stops there, short
of min_lr, and says so; if they speed up, it ends at step N a little before the budget.
Under torchrun every rank plans from the largest train_time over the ranks, so all stop together.
"""

from __future__ import annotations

import math

import torch

from llmstages.config import TrainConfig
from llmstages.distributed import DistContext
from llmstages.optim import decay_start, lr_at
from llmstages.runstate import RunState

WARMUP_STEPS = 3  # steps of each process left out of the step-time estimate
UNPLANNED = 1 << 40  # the schedule's horizon before any estimate: warmup, then the peak lr


class StepPlan:
    """The run's step count: `steps`, what the schedule runs against (None while a time budget has no
    estimate yet), and `end`, the step the run ends after (None while a time budget has not fixed it)."""

    def __init__(self, cfg: TrainConfig, fixed_steps: int, state: RunState, dctx: DistContext,
                 device: torch.device):
        self.cfg, self.dctx, self.device = cfg, dctx, device
        self.budget = cfg.budget_seconds
        self.first_step = state.step  # this process's first step
        self.times: list[float] = []  # train_time after each step of this process since its warm-up
        self.notes: list[str] = []  # what the loop should tell the user
        if self.budget is None:
            self.steps: int | None = fixed_steps
            self.end: int | None = fixed_steps
            return
        if state.plan and state.plan.get("budget") != self.budget:
            state.plan = None  # resumed with another train.max_time (--allow-change): plan again
        self.steps = state.plan["steps"] if state.plan else None  # a resumed run's last plan
        self.end = self.steps if state.plan and state.plan["fixed"] else None

    @property
    def timed(self) -> bool:
        return self.budget is not None

    @property
    def horizon(self) -> int:
        """The max_steps the schedule runs against now."""
        return self.steps if self.steps is not None else UNPLANNED

    @property
    def last(self) -> int:
        """The last step (1-based count), as far as known (UNPLANNED: not yet)."""
        return self.end if self.end is not None else UNPLANNED

    def update(self, state: RunState) -> None:
        """Plan again after a finished step (and once before the first): see the module docstring."""
        if not self.timed:
            return
        spent = self._train_time(state)
        done = state.step
        if done - self.first_step >= WARMUP_STEPS:
            self.times.append(spent)
        if self.end is not None:
            if spent >= self.budget and done < self.end:
                self.notes.append(f"the time budget ran out at step {done}, before the planned {self.end} "
                                  f"(the steps got slower): stopping here, lr {self.lr_note(done)}")
                self.end = done
            return
        if len(self.times) < 2:
            if spent >= self.budget:
                self._stop_unannealed(done)
            return
        half = len(self.times) // 2  # times[half:] spans len - 1 - half steps
        per_step = (self.times[-1] - self.times[half]) / max(1, len(self.times) - 1 - half)
        estimate = done + max(0, math.floor((self.budget - spent) / max(per_step, 1e-9)))
        if estimate <= done:
            self._stop_unannealed(done)
            return
        if decay_start(self.cfg, estimate) > done:  # the next step is still before the decay
            self.steps = estimate
            state.plan = {"steps": estimate, "budget": self.budget, "fixed": False}
            return
        if self.cfg.schedule == "wsd":
            while decay_start(self.cfg, estimate) < done:  # the warm-down starts at the next step
                estimate += 1
        self.steps = self.end = estimate
        state.plan = {"steps": estimate, "budget": self.budget, "fixed": True}
        self.notes.append(f"time budget {self.cfg.max_time}: the run has {estimate} steps ({per_step * 1000:.0f} ms "
                          f"a step); the lr reaches min_lr at step {estimate}")

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def lr_note(self, step: int) -> str:
        return f"{lr_at(step - 1, self.cfg, self.horizon, end_on_last=True):.3g} (min_lr {self.cfg.min_lr:.3g})"

    def _stop_unannealed(self, done: int) -> None:
        self.notes.append(f"the time budget {self.cfg.max_time} is spent after {done} steps, before the lr "
                          "decay began: the model is not annealed; give a longer train.max_time")
        self.end = done

    def _train_time(self, state: RunState) -> float:
        """train_time, the largest over the ranks (every rank then makes the same plan)."""
        if not self.dctx.enabled:
            return state.train_time
        t = torch.tensor([state.train_time], dtype=torch.float64, device=self.device)
        return float(self.dctx.max_(t))
