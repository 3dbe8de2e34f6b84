"""Optimizers and learning-rate schedules for the training loop.

    train.optimizer: adamw   AdamW for every trainable parameter
                     muon    Muon (torch.optim.Muon; Jordan et al. 2024) for the 2-D weight matrices
                             inside the transformer blocks, AdamW for the rest: embeddings, output and
                             class heads, norms, biases, LoRA adapters
    train.schedule:  cosine  linear warmup, cosine decay to min_lr at max_steps
                     wsd     linear warmup, constant, then a linear warm-down over the final
                             `decay_frac` of the steps to min_lr (warmup-stable-decay; Hu et al. 2024's
                             MiniCPM, the modded-nanogpt speedrun and nanochat)

AdamW decays matrices only: biases, norm gains and embeddings are not decayed (the usual GPT-2 /
nanoGPT practice; decaying them hurts small models). Fused kernels are used where PyTorch has them.
Muon orthogonalises each matrix's momentum (Newton-Schulz); it accepts 2-D parameters only.

`build_optimizer` returns one `Optimizers` object for either choice: the loop steps, zeroes and
saves it as one optimizer. Every param group carries its own `base_lr` (train.lr for AdamW's,
train.muon_lr for Muon's) and `set_lr` scales each by the schedule.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from llmstages.config import TrainConfig
from llmstages.errors import UserError


def param_groups(model: nn.Module, weight_decay: float, params: list[nn.Parameter] | None = None) -> list[dict]:
    """Trainable parameters (of `params`, default all) split into decayed matrices and the rest."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters() if params is None else params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weight matrices of the transformer blocks (attention and MLP), LoRA adapters not
    included: low-rank factors that start at zero are AdamW's job."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")
            and not name.endswith(("lora_A", "lora_B"))]


class Optimizers:
    """One or two torch optimizers stepped, zeroed and saved together, looking like one optimizer."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]):
        self.named = named

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.named.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" in state:  # a checkpoint from before Muon: one AdamW's state
            state = {"adamw": state}
        if set(state) != set(self.named):
            raise UserError(f"the checkpoint holds the state of {' + '.join(state)}, this run optimizes with "
                            f"{' + '.join(self.named)}",
                            hint="resume with the train.optimizer the run started with, or start a new run")
        base_lrs = [group["base_lr"] for group in self.param_groups]  # this recipe's, not the saved ones
        for name, opt in self.named.items():
            opt.load_state_dict(state[name])
        for group, base_lr in zip(self.param_groups, base_lrs):
            group["base_lr"] = base_lr


def _adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    extra = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        extra["fused"] = True
    for group in groups:
        group["base_lr"] = cfg.lr
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW over every trainable parameter, or Muon (block matrices) + AdamW (the rest), as `cfg` says."""
    matrices = muon_params(model) if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in in_muon]
    groups = param_groups(model, cfg.weight_decay, rest)
    if not groups and not matrices:
        raise ValueError("no trainable parameters")
    named: dict[str, torch.optim.Optimizer] = {}
    if groups:
        named["adamw"] = _adamw(groups, cfg, device)
    if matrices:
        # adjust_lr_fn "original": the update of an (A, B) matrix is scaled by sqrt(max(1, A / B)), Keller
        # Jordan's rule, so muon_lr means the same for square and tall matrices.
        named["muon"] = torch.optim.Muon([{"params": matrices, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                                         weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                                         nesterov=True, adjust_lr_fn="original")
    return Optimizers(named)


def decay_start(cfg: TrainConfig, max_steps: int) -> int:
    """The first step (0-based) of the final `decay_frac` of a `max_steps` run: where wsd's warm-down
    begins, and where a time-budgeted run fixes its step count (budget.py)."""
    return max(cfg.warmup_steps, max_steps - max(1, round(cfg.decay_frac * max_steps)))


def lr_at(step: int, cfg: TrainConfig, max_steps: int, *, end_on_last: bool = False) -> float:
    """train.lr's value for optimizer step `step` (0-based) under `cfg.schedule`; ends at cfg.min_lr.

    wsd reaches min_lr on the last step (max_steps - 1). cosine reaches it at step max_steps, one past
    the last, as it always has for step-counted runs; `end_on_last` (time-budgeted runs) makes it
    reach min_lr on the last step too.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = decay_start(cfg, max_steps)
        if step < start:
            return cfg.lr
        progress = min(1.0, (step + 1 - start) / max(1, max_steps - start))  # 1 at the last step
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    decay_steps = max(1, max_steps - int(end_on_last) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: Optimizers, step: int, cfg: TrainConfig, max_steps: int, *, end_on_last: bool = False) -> float:
    """Set every group's lr for step `step`: its base_lr scaled as the schedule scales train.lr.

    Returns train.lr's value (what the log shows). An AdamW group's base_lr is train.lr, so its lr is
    lr_at exactly (x * 1.0); a Muon group's follows the same curve from train.muon_lr.
    """
    lr = lr_at(step, cfg, max_steps, end_on_last=end_on_last)
    for group in optimizer.param_groups:
        group["lr"] = lr * (group.get("base_lr", cfg.lr) / cfg.lr)
    return lr
