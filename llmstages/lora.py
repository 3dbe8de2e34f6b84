"""LoRA: low-rank adapters on the model's linear layers (Hu et al. 2021).

A `LoRALinear` is an `nn.Linear` whose frozen weight W (out, in) gets a trainable update
B @ A * (alpha / rank), with A (rank, in) initialised small and B (out, rank) at zero, so training
starts from the base model exactly. It subclasses nn.Linear, so the base weights keep their names
(`...c_attn.weight`) and a base checkpoint loads into a LoRA model unchanged; the adapters add
`...c_attn.lora_A` / `lora_B`. `merge_lora` folds the update into W and removes the adapters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float):
        super().__init__(in_features, out_features, bias=bias)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear does for its weight
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> base (..., out) + ((x A^T) B^T) * scaling; the rank-r path costs O(r (in + out)).
        base = F.linear(x, self.weight, self.bias)
        return base + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Replace every nn.Linear whose name ends in one of `targets` by a LoRALinear; return their names.

    The base weight and bias are carried over; nothing else changes.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] not in targets:
            continue
        lora = LoRALinear(module.in_features, module.out_features, module.bias is not None, rank, alpha, dropout)
        lora.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            lora.weight.copy_(module.weight)
            if module.bias is not None:
                lora.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lora)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"no linear layer matches lora targets {targets}")
    return replaced


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and turn the layer back into a plain nn.Linear.

    Returns the number of merged layers. The model's config is updated to say it has no adapters.
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.to(device=module.weight.device, dtype=module.weight.dtype)
        plain.weight.copy_(module.merged_weight())
        if module.bias is not None:
            plain.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        merged += 1
    if merged and hasattr(model, "config"):
        model.config.lora_rank = 0
        model.config.lora_targets = []
    return merged
