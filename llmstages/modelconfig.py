"""GPTConfig: the model's shape and block choices, as model.json records them, with the named sizes
and architecture presets. Its own module so that blocks.py and model.py both import it (one way)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

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
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # the linear layers of a transformer block (blocks.py)
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
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.lora_rank > 0 and (unknown or not self.lora_targets):
            raise ValueError(f"lora_rank={self.lora_rank} needs lora_targets from {', '.join(LORA_TARGETS)}; "
                             f"got {self.lora_targets}")

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
