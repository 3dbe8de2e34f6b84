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
    """Mean cross-entropy of next-token prediction: input_ids (B, T), targets (B, T) -> scalar.

    The model computes it (GPT.forward with targets), so DDP and torch.compile see one forward call.
    Packed rows (data/packing.py) also carry positions and segments (B, T), passed on to the model.
    """
    return model(batch["input_ids"], targets=batch["targets"], positions=batch.get("positions"),
                 segments=batch.get("segments"))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Output head + cross-entropy without the full logits: loss = CE(hidden @ weight.T, targets), the
    logits soft-capped first when softcap > 0 (cap * tanh(logits / cap)).

    hidden (N, C), weight (V, C), targets (N,) -> mean loss over targets != IGNORE.
    The N x V logits (4096 x 8192 fp32 = 128 MiB for the quickstart's micro-batch) are made `chunk`
    rows at a time; each chunk's softmax gradient is turned into the gradients of hidden and weight
    at once, so log-softmax, its backward and the big zero-filled gradient buffer are never
    materialised. Same three matmuls as the plain path; less memory traffic. Used on the CPU in fp32,
    where memory bandwidth, not FLOPs, is what the softmax costs.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                softcap: float = 0.0) -> torch.Tensor:
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, t, ok = hidden[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            logits = h @ weight.t()  # (n, V)
            if softcap > 0:  # logits = cap * tanh(z / cap); d logits / dz = 1 - tanh^2
                squashed = torch.tanh(logits.div_(softcap))
                logits = squashed * softcap
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            picked = t.clamp(min=0)
            total += ((lse - logits.gather(1, picked[:, None]).squeeze(1)) * ok).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            probs[torch.arange(len(t), device=t.device), picked] -= 1.0  # d(CE)/d(logits) = softmax - onehot
            probs.mul_(ok[:, None])
            if softcap > 0:
                probs.mul_(1.0 - squashed.square_())
            torch.mm(probs, weight, out=grad_hidden[start:start + chunk])  # (n, C)
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), h)  # (V, C)
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0), count)
        ctx.has_weight_grad = grad_weight is not None
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_hidden * scale, grad_weight * scale if ctx.has_weight_grad else None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512,
              softcap: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of hidden states (B, T, C) under the head `weight` (V, C).

    softcap > 0: the logits are soft-capped first, cap * tanh(logits / cap).
    """
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if hidden.device.type == "cpu" and hidden.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, softcap)
    logits = hidden @ weight.t()
    if softcap > 0:
        logits = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


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
