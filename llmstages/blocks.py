"""The pieces of a transformer block, each chosen by a `GPTConfig` field (model.py).

    norm        layernorm (GPT-2) | rmsnorm (Zhang & Sennrich 2019)
    pos_emb     learned (GPT-2, in model.py) | rope (Su et al. 2021): q and k rotated by position
    attention   scaled-dot-product attention; n_kv_head < n_head = grouped-query attention
                (Ainslie et al. 2023); qk_norm = RMSNorm on each head's q and k (OLMo 2, Qwen3, nanochat)
    mlp         gelu (GPT-2's tanh approximation) | relu2 (ReLU squared, So et al. 2021's Primer; the
                modded-nanogpt speedrun) | swiglu (Shazeer 2020; Llama)

Linear layers keep GPT-2's names whatever the choice, so LoRA targets and weight loading do not change:
`attn.c_attn` holds q, k and v in one matmul ((H + 2 * Hkv) * D outputs), `mlp.c_fc` holds SwiGLU's
gate and up projections in one matmul (2 * hidden outputs), `c_proj` is the projection back to C.
Everything is batched over heads and positions: no Python loop per head or per token.

Shapes: B batch, T time, C = n_embd, H = n_head, Hkv = n_kv_head, D = C // H.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmstages.modelconfig import GPTConfig


class RMSNorm(nn.RMSNorm):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim. The gain is cast to the input's dtype, so
    under bf16 autocast (which leaves rms_norm alone) the fused kernel runs instead of a slow fallback."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The block's normalisation over the last `dim` features."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """The D / 2 rotation frequencies theta^(-2i / D), in fp32, computed as Hugging Face does (1 / theta^x),
    so imported models match it bit for bit; `scaling` stretches them for longer contexts:

        linear  every frequency / factor (position interpolation, Chen et al. 2023)
        llama3  Llama 3.1's scheme: wavelengths above original_max_position_embeddings / low_freq_factor
                are divided by factor, those below .../high_freq_factor kept, the band between blended
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / theta ** exponent  # (D/2,)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the angles p * freq_i for each position p and pair i, in fp32: (T, D / 2) for
    positions (T,), or (B, T, D / 2) for per-row positions (B, T) (packed rows restart per example)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by the angles of cos/sin
    (T, D/2), or (B, T, D/2) when each row has its own positions.

    The half-split pairing is Llama's / Hugging Face's `rotate_half` convention.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    if cos.dim() == 3:  # per-row angles: one table for all heads of a row
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows: segments (B, T), the example each position belongs to ->
    bool (B, 1, T, T), True where query i may read key j: j <= i and both in the same example.

    Block-diagonal causal: an example never sees another one packed into its row. Every query can
    read itself, so no row of the mask is all False (SDPA would give NaN there); padding, one
    segment of its own, reads only padding.
    """
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class KVCache:
    """Keys and values of all layers for generation, preallocated to `max_len` positions.

    k, v: (n_layer, B, Hkv, max_len, D), keys stored after QK-norm and rotation. `pos` is how many
    positions are filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at the current position; return all keys/values so far (B, Hkv, pos+T, D)."""
        t = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        qkv = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        # q, k, v in one matmul; qkv_bias gives it a bias even without the others' (Qwen2)
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one gain of D per layer, shared by the heads (as Qwen3's q_norm / k_norm)
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `rope`: cos, sin (T, D/2) or (B, T, D/2) of these positions, or None.
        `mask`: bool (B, 1, T, T), True = may attend (packed rows, see segment_mask), in place of the
        causal mask; not combined with a cache."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split((H * D, Hkv * D, Hkv * D), dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = mask is None
        if cache is not None and mask is not None:
            raise ValueError("a packed-rows mask is for training; generation with a KV cache takes none")
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, past+T, D)
            if T == 1:
                causal = False  # one new query attends to every cached position
            elif past > 0:
                # T new queries at positions past..past+T-1: each sees the cache and the queries before it.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
        # enable_gqa: query head h reads kv head h // (H / Hkv), without copying k and v H / Hkv times.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_width
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden  # SwiGLU: gate and up side by side
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or, for SwiGLU, (B, T, 2 * hidden)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `checkpointing` (train.activation_checkpointing) a training forward keeps only the block's
    input x (B, T, C) for the backward pass, which runs the block again to get the rest (non-reentrant
    torch.utils.checkpoint; the RNG state is replayed, so dropout masks and gradients are the same).
    It happens inside forward, so FSDP's gather of the block's weights wraps the recomputation too."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.checkpointing = False

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpointing and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, rope, None, mask, use_reentrant=False)
        return self._forward(x, rope, cache, mask)

    def _forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))
