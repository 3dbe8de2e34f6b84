"""Sampling tokens from the model: greedy, temperature, top-k, top-p, with or without the KV cache.

`generate_tokens` yields token ids one at a time so the CLI can stream them as they are produced.
Before a token is picked, the logits of tokens already in the context get CTRL's repetition penalty,
and end-of-text is masked while fewer than `min_new_tokens` tokens exist; both act on the (1, V)
logits of either path, so the KV-cache and the no-cache path stay equal. Stop strings are text, not
tokens: stages/generate.py (stopping.StopStrings) looks for them in the decoded reply.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmstages.model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # with top_p = 0 the comparison above would drop every token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor):
    logits (B, V) of the tokens marked in `seen` (B, V, bool) are divided by `penalty` where positive and
    multiplied by it where negative, so a penalty above 1 makes every seen token less likely."""
    logits = logits.float()
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


@torch.no_grad()
def generate_tokens(model: GPT, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_id: int | None = None,
                    use_cache: bool = True, repetition_penalty: float = 1.0,
                    min_new_tokens: int = 0) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt`; stop after yielding `stop_id`.

    `stop_id` cannot be picked before `min_new_tokens` tokens are yielded; `repetition_penalty` != 1
    penalizes every token of the prompt and of the reply so far (penalize_repeats).

    With the cache, each new token costs one position's forward pass. When the context is full
    (block_size), the cache restarts from the last half of the context, so very long generations
    differ from the no-cache path, which re-reads the last block_size tokens at every step.
    """
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = list(prompt)
    if not tokens:
        raise ValueError("the prompt must hold at least one token")
    dtype = next(model.parameters()).dtype
    cache = None
    logits = None
    seen = None  # (1, V) bool: the tokens in the context so far, for the repetition penalty
    for produced in range(max_new_tokens):
        if not use_cache:
            context = torch.tensor([tokens[-block:]], device=device)  # (1, T)
            logits = model(context, last_only=True)[:, -1]  # (1, V)
        elif cache is None or cache.pos >= cache.max_len:
            keep = tokens[-block:] if cache is None else tokens[-(block // 2):]
            # Room for this generation only: a model with a long context (Qwen2.5: 32k positions) would
            # otherwise allocate hundreds of MB of keys and values per call.
            cache = KVCache(model.config, 1, min(block, len(keep) + max_new_tokens), device, dtype)
            logits = model(torch.tensor([keep], device=device), cache, last_only=True)[:, -1]
        if repetition_penalty != 1.0:
            if seen is None:
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[0, torch.tensor(tokens, device=device)] = True
            logits = penalize_repeats(logits, seen, repetition_penalty)
        if stop_id is not None and produced < min_new_tokens:
            logits = logits.clone()  # a view of the model's output: change a copy
            logits[:, stop_id] = float("-inf")  # end-of-text cannot be picked yet
        next_id = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        if seen is not None:
            seen[0, next_id] = True
        tokens.append(next_id)
        yield next_id
        if next_id == stop_id:
            return
        if use_cache and cache.pos < cache.max_len:
            logits = model(torch.tensor([[next_id]], device=device), cache, last_only=True)[:, -1]
