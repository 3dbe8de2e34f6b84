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

import torch
import torch.nn as nn

from llmstages.blocks import Block, CausalSelfAttention, KVCache, make_norm, rope_tables, segment_mask
from llmstages.modelconfig import ARCHS, SIZES, GPTConfig
from llmstages.objectives import head_loss

__all__ = ["ARCHS", "SIZES", "GPT", "GPTConfig", "KVCache", "build_config", "flops_per_token", "num_params",
           "set_activation_checkpointing", "set_dropout"]

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

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, *, positions: torch.Tensor | None = None,
               segments: torch.Tensor | None = None, embedding_offset: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after ln_f: idx (B, T) token ids -> (B, T, C).

        Packed rows (several examples in one row, data/packing.py) give `positions` (B, T), each
        token's position within its own example, and `segments` (B, T), the example it belongs to:
        attention then stays inside each example (blocks.segment_mask) instead of the plain causal mask.
        """
        B, T = idx.shape
        config = self.config
        start = cache.pos if cache is not None else 0
        if start + T > config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device) if positions is None else positions  # (T,) | (B, T)
        mask = segment_mask(segments) if segments is not None else None  # (B, 1, T, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if embedding_offset is not None:  # (B, T, C): adversarial training's push (classification.py)
            x = x + embedding_offset
        rope = None
        if config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        else:  # cos, sin (T, D/2) or (B, T, D/2): computed here, in fp32, at the right positions
            rope = rope_tables(pos, config.n_embd // config.n_head, config.rope_theta, config.rope_scaling)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                last_index: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, embedding_offset: torch.Tensor | None = None,
                last_row: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with `targets` the mean next-token loss. `positions`, `segments` (B, T): packed
        rows, see `hidden`; `embedding_offset` (B, T, C) is added to the token embeddings.

        LM head: (B, T, V), or (B, 1, V) with `last_only` (generation needs only the last position),
        soft-capped when the config says so. With targets (B, T) (IGNORE = -100 left out): the scalar
        cross-entropy, computed without materialising all logits where that is faster
        (objectives.head_loss). Class head: with `last_index` (B,) — the position of each row's last
        real token, padding is on the right — (B, K); without it, (B, T, K) at every position. Packed
        texts (data/packing.pack_texts) add `last_row` (N,): text n ends at (last_row[n], last_index[n]).
        """
        if targets is not None and self.is_classifier:
            raise ValueError("a classifier has no next-token loss: call it with last_index, without targets")
        x = self.hidden(idx, cache, positions=positions, segments=segments,
                        embedding_offset=embedding_offset)  # (B, T, C)
        cap = self.config.logit_softcap
        if targets is not None:
            return head_loss(x, self.lm_head.weight, targets, softcap=cap)
        if self.is_classifier:
            if last_index is not None:
                x = pool(x, last_index, self.config.pooling, last_row)  # (B, C), or (N, C) packed
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


def pool(x: torch.Tensor, last_index: torch.Tensor, how: str, last_row: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): row b's state at `last_index[b]`, or ("mean") the mean of its
    states 0..last_index[b]; the padding after a row's last real token never counts. Packed rows hold
    several texts: text n's state is at (last_row[n], last_index[n]) -> (N, C) (last-token pooling only)."""
    if last_row is not None:
        if how != "last":
            raise ValueError(f"packed texts are read at their last token; pooling {how!r} needs one text per row")
        return x[last_row, last_index]
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


def set_activation_checkpointing(model: GPT, on: bool) -> None:
    """Recompute every block in the backward pass instead of keeping its activations (Block.checkpointing)."""
    for block in model.transformer.h:
        block.checkpointing = on


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
