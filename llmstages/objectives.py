"""Next-token prediction: the loss every language-model stage trains on, and its validation figures.

Targets equal to IGNORE (-100) are left out of the loss: instruction fine-tuning uses this to mask
prompt and padding tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction: input_ids (B, T), targets (B, T) -> scalar."""
    logits = model(batch["input_ids"])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def lm_metrics(model: nn.Module, batches: Iterable[dict], token_bytes: torch.Tensor | None = None,
               prefix: str = "val_") -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte over `batches`.

    Bits per byte = total nats / (ln 2 * total UTF-8 bytes of the target tokens): independent of the
    tokenizer, so models with different vocabularies compare. Special tokens (0 bytes) are left out of
    the bits-per-byte sums, as in nanochat's evaluation.
    """
    device = next(model.parameters()).device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    byte_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    lengths = token_bytes.to(device) if token_bytes is not None else None
    for batch in batches:
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        logits = model(x)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="none")
        valid = y.flatten() != IGNORE
        total_nats += nats[valid].sum(dtype=torch.float64)
        total_tokens += int(valid.sum())
        if lengths is not None:
            nbytes = lengths[y.flatten().clamp(min=0)] * valid
            byte_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
            total_bytes += nbytes.sum(dtype=torch.float64)
    if total_tokens == 0:
        return {}
    loss = float(total_nats) / total_tokens
    out = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0)), f"{prefix}tokens": total_tokens}
    if lengths is not None and float(total_bytes) > 0:
        out[f"{prefix}bpb"] = float(byte_nats) / (math.log(2) * float(total_bytes))
    return out
