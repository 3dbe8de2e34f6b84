"""The GPT model: GPT-2's architecture, one file.

Learned position embeddings, pre-LayerNorm blocks, GELU MLP, tied input/output embeddings, and
GPT-2's initialisation (Radford et al. 2019; nanoGPT's `model.py` is the readable reference).
Attention is PyTorch's `scaled_dot_product_attention`. A `KVCache` makes generation O(T) per token.
The head is either the language-model head (tied to the token embedding) or, when
`num_classes > 0`, a linear class head read at each text's last real token (as in Hugging Face's
`GPT2ForSequenceClassification`). Module names follow GPT-2's so weights map one to one.

Shapes: B batch, T time (tokens), C = n_embd, H = n_head, D = C // H, V = vocab_size, K = num_classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmstages.objectives import head_loss

# Named sizes. tiny runs in CPU seconds (tests); mini is the CPU quickstart shape; the rest are GPT-2's.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
}


@dataclass
class GPTConfig:
    """Everything needed to rebuild a model; saved as `model.json` beside the weights."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # 0 = language-model head; K > 0 = a K-way class head read at the last real token.
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    # LoRA adapters (rank 0 = none); see lora.py.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of all layers for generation, preallocated to `max_len` positions.

    k, v: (n_layer, B, H, max_len, D). `pos` is how many positions are filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at the current position; return all keys/values so far (B, H, pos+T, D)."""
        t = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, causal = None, True
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, H, past+T, D)
            if T == 1:
                causal = False  # one new query attends to every cached position
            elif past > 0:
                # T new queries at positions past..past+T-1: each sees the cache and the queries before it.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.num_classes > 0:
            self.score = nn.Linear(config.n_embd, config.num_classes, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.lora_rank > 0:
            from llmstages.lora import add_lora
            add_lora(self, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def is_classifier(self) -> bool:
        return self.config.num_classes > 0

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states after ln_f: idx (B, T) token ids -> (B, T, C)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                last_index: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with `targets` the mean next-token loss.

        LM head: (B, T, V), or (B, 1, V) with `last_only` (generation needs only the last position).
        With targets (B, T) (IGNORE = -100 left out): the scalar cross-entropy, computed without
        materialising all logits where that is faster (objectives.head_loss).
        Class head: with `last_index` (B,) — the position of each row's last real token, padding is on
        the right — (B, K); without it, (B, T, K) at every position.
        """
        if targets is not None and self.is_classifier:
            raise ValueError("a classifier has no next-token loss: call it with last_index, without targets")
        x = self.hidden(idx, cache)  # (B, T, C)
        if targets is not None:
            return head_loss(x, self.lm_head.weight, targets)
        if self.is_classifier:
            if last_index is not None:
                x = x[torch.arange(x.size(0), device=x.device), last_index]  # (B, C)
            return self.score(x)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The state dict without the tied lm_head (it is the token embedding), contiguous, for safetensors."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}

    def load_saved_state(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load weights written by `state_for_saving`; the tied head follows the embedding."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if strict and (missing or unexpected):
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def set_dropout(model: GPT, p: float) -> None:
    """Change the dropout of a built model (e.g. a fine-tuning recipe's choice over its parent's)."""
    model.config.dropout = p
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and not name.endswith("lora_dropout"):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p


def build_config(size: str = "tiny", *, vocab_size: int, **overrides) -> GPTConfig:
    """A GPTConfig from a named size plus explicit numbers (None values are ignored)."""
    base = dict(SIZES.get(size, {}))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(vocab_size=vocab_size, **base)


def num_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Parameter count; tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(config: GPTConfig, seq_len: int, *, training: bool = True) -> float:
    """Matmul FLOPs per token (Kaplan et al. 2020 / PaLM appendix B accounting).

    Forward: 2 FLOPs per weight of every linear layer (the head included, embedding lookups free),
    plus attention scores and weighted values: 2 * 2 * n_layer * seq_len * n_embd.
    Training (forward + backward) is 3x the forward.
    """
    C, L = config.n_embd, config.n_layer
    linear_weights = L * (3 * C * C + C * C + 8 * C * C)  # c_attn, attn c_proj, c_fc, mlp c_proj
    head = C * (config.num_classes if config.num_classes > 0 else config.vocab_size)
    forward = 2 * (linear_weights + head) + 4 * L * seq_len * C
    return float(3 * forward if training else forward)
