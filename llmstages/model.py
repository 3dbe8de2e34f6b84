"""The GPT model, one file: GPT-2's architecture, or modern blocks chosen per recipe.

`arch: gpt2` is GPT-2 exactly (Radford et al. 2019; nanoGPT's `model.py` is the readable reference):
learned position embeddings, pre-LayerNorm blocks, GELU MLP, biases, the output head tied to the
token embedding, GPT-2's initialisation. `arch: modern` is the combination of the small-model
speedrun literature (modded-nanogpt, nanochat): rotary positions, RMSNorm, ReLU² MLP, QK-norm, no
biases, an untied head and a logit soft-cap. Every choice is a `GPTConfig` field (the blocks are in
blocks.py); a preset only fills the fields a recipe leaves open, and `model.json` records them all,
so every command rebuilds the same model. A `KVCache` makes generation O(T) per token.
The head is either the language-model head or, when `num_classes > 0`, a linear class head read at
each text's last real token (as in Hugging Face's `GPT2ForSequenceClassification`). Module names
follow GPT-2's so weights map one to one.

Shapes: B batch, T time (tokens), C = n_embd, H = n_head, D = C // H, V = vocab_size, K = num_classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

from llmstages.blocks import Block, CausalSelfAttention, KVCache, make_norm, rope_tables
from llmstages.objectives import head_loss

__all__ = ["ARCHS", "SIZES", "GPT", "GPTConfig", "KVCache", "build_config", "flops_per_token", "num_params",
           "set_dropout"]

# Named sizes. tiny runs in CPU seconds (tests); mini is the CPU quickstart shape; the rest are GPT-2's.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
}

# Named architectures: the block choices each preset fills in (explicit fields win).
ARCHS: dict[str, dict] = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=False, bias=True,
                 tie_embeddings=True, logit_softcap=0.0),
    # nanochat's choices (modded-nanogpt's too, bar its extras): the soft-cap of 15 is nanochat's.
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False,
                   tie_embeddings=False, logit_softcap=15.0),
}
CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu"),
           "pooling": ("last", "mean")}


@dataclass
class GPTConfig:
    """Everything needed to rebuild a model; saved as `model.json` beside the weights.

    The defaults are GPT-2's, so a model.json written before a field existed loads as GPT-2.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # A bias on the q, k, v projection (c_attn) even when `bias` is off (Qwen2's attention).
    qkv_bias: bool = False
    # The preset the block choices came from (a label: the fields below are what counts).
    arch: str = "gpt2"
    # learned (a wpe table of block_size positions) | rope (rotary, no position weights).
    pos_emb: str = "learned"
    rope_theta: float = 10000.0
    # Rotary frequency scaling, as Hugging Face's config.json `rope_scaling` ({} = none; rope_type linear
    # or llama3 with its factors): see blocks.rope_frequencies.
    rope_scaling: dict = field(default_factory=dict)
    # layernorm | rmsnorm, for the block norms and ln_f.
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    # gelu | relu2 | swiglu; mlp_hidden 0 = 4 * n_embd (gelu, relu2), or 8/3 * n_embd rounded up to a
    # multiple of 64 (swiglu: its three matrices then hold as many weights as the other two's two).
    mlp: str = "gelu"
    mlp_hidden: int = 0
    # Key/value heads; 0 = n_head (plain multi-head attention), fewer = grouped-query attention.
    n_kv_head: int = 0
    # RMSNorm on each head's queries and keys before the dot product.
    qk_norm: bool = False
    # The LM head shares the token embedding's weights (GPT-2) or has its own.
    tie_embeddings: bool = True
    # logits -> cap * tanh(logits / cap) (0 = off): bounds the logits, as Gemma 2 and nanochat do.
    logit_softcap: float = 0.0
    # 0 = language-model head; K > 0 = a K-way class head read at the last real token.
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    # What the class head reads: "last" real token's hidden state, or the "mean" over the real tokens.
    pooling: str = "last"
    # LoRA adapters (rank 0 = none); see lora.py.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    # The Hugging Face model_type the weights came from (llama, qwen2, mistral, gpt2; "" = ours):
    # `export --format hf` writes the same type back.
    hf_model_type: str = ""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size; n_embd / n_head = {self.n_embd // self.n_head}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width (SwiGLU's c_fc has twice as many outputs: gate and up)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def is_gpt2(self) -> bool:
        """True when the blocks are GPT-2's (biases aside): the model is a Hugging Face GPT-2."""
        return (self.pos_emb == "learned" and self.norm == "layernorm" and self.norm_eps == 1e-5
                and self.mlp == "gelu" and self.mlp_width == 4 * self.n_embd and self.kv_heads == self.n_head
                and not self.qk_norm and self.tie_embeddings and not self.logit_softcap)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        if config.num_classes > 0:
            self.score = nn.Linear(config.n_embd, config.num_classes, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
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

    @property
    def head_is_tied(self) -> bool:
        return not self.is_classifier and self.lm_head.weight is self.transformer.wte.weight

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states after ln_f: idx (B, T) token ids -> (B, T, C)."""
        B, T = idx.shape
        config = self.config
        start = cache.pos if cache is not None else 0
        if start + T > config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # cos, sin (T, D/2), a few hundred numbers: computed here, in fp32, at the right positions
            rope = rope_tables(pos, config.n_embd // config.n_head, config.rope_theta, config.rope_scaling)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                last_index: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with `targets` the mean next-token loss.

        LM head: (B, T, V), or (B, 1, V) with `last_only` (generation needs only the last position),
        soft-capped when the config says so. With targets (B, T) (IGNORE = -100 left out): the scalar
        cross-entropy, computed without materialising all logits where that is faster
        (objectives.head_loss). Class head: with `last_index` (B,) — the position of each row's last
        real token, padding is on the right — (B, K); without it, (B, T, K) at every position.
        """
        if targets is not None and self.is_classifier:
            raise ValueError("a classifier has no next-token loss: call it with last_index, without targets")
        x = self.hidden(idx, cache)  # (B, T, C)
        cap = self.config.logit_softcap
        if targets is not None:
            return head_loss(x, self.lm_head.weight, targets, softcap=cap)
        if self.is_classifier:
            if last_index is not None:
                x = pool(x, last_index, self.config.pooling)  # (B, C)
            return self.score(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The state dict without a tied lm_head (it is the token embedding), contiguous, for safetensors."""
        skip = "lm_head.weight" if self.head_is_tied else None
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != skip}

    def load_saved_state(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load weights written by `state_for_saving`; a tied head follows the embedding."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if self.head_is_tied:
            missing = [k for k in missing if k != "lm_head.weight"]
        if strict and (missing or unexpected):
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def pool(x: torch.Tensor, last_index: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): row b's state at `last_index[b]`, or ("mean") the mean of its
    states 0..last_index[b]; the padding after a row's last real token never counts."""
    if how == "mean":
        real = torch.arange(x.size(1), device=x.device)[None, :] <= last_index[:, None]  # (B, T)
        return (x * real[..., None].to(x.dtype)).sum(dim=1) / (last_index[:, None] + 1).to(x.dtype)
    return x[torch.arange(x.size(0), device=x.device), last_index]


def set_dropout(model: GPT, p: float) -> None:
    """Change the dropout of a built model (e.g. a fine-tuning recipe's choice over its parent's)."""
    model.config.dropout = p
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and not name.endswith("lora_dropout"):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p


def build_config(size: str = "tiny", *, vocab_size: int, arch: str = "gpt2", **overrides) -> GPTConfig:
    """A GPTConfig from a named size and a named architecture plus explicit fields (None values are ignored)."""
    base = dict(SIZES.get(size, {}), **ARCHS[arch], arch=arch)
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
    C, L, D = config.n_embd, config.n_layer, config.n_embd // config.n_head
    hidden = config.mlp_width
    attn = C * (config.n_head + 2 * config.kv_heads) * D + C * C  # c_attn, c_proj
    mlp = C * hidden * (3 if config.mlp == "swiglu" else 2)  # c_fc (gate and up for SwiGLU), c_proj
    head = C * (config.num_classes if config.num_classes > 0 else config.vocab_size)
    forward = 2 * (L * (attn + mlp) + head) + 4 * L * seq_len * C
    return float(3 * forward if training else forward)
