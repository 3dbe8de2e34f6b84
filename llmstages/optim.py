"""Optimizer and learning-rate schedule for the training loop.

AdamW with decoupled weight decay on matrices only: biases, LayerNorm parameters and embeddings are
not decayed (the usual GPT-2 / nanoGPT practice; decaying them hurts small models). Fused kernels
are used where PyTorch has them for the device. The schedule is linear warmup, then cosine decay
to `min_lr` at `max_steps`.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from llmstages.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    extra = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup to cfg.lr, cosine down to cfg.min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set the learning rate of every parameter group; returns it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
