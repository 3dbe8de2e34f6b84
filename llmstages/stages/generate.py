"""`llmstages generate`: continue a prompt with a trained model, streaming tokens as they come."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmstages.checkpoint import Checkpoint
from llmstages.config import GenerateConfig
from llmstages.sampling import generate_tokens
from llmstages.tokenizer import StreamDecoder


@dataclass
class Sampling(GenerateConfig):
    """How to pick tokens: the recipe's `generate` settings (config.py holds their defaults, the only
    place they are set) plus a seed; `from_checkpoint` fills what the user left unset from the checkpoint."""

    seed: int | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **given: int | float | None) -> "Sampling":
        """Options given on the command line (not None) win over the checkpoint's stored defaults."""
        return cls.over(ckpt.meta.get("generate"), **given)

    @classmethod
    def over(cls, stored: dict | None, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> "Sampling":
        """Settings given (not None) over `stored` ones (a checkpoint's `generate`) over the defaults."""
        given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        stored = {k: v for k, v in (stored or {}).items() if k in given}
        return cls(**{**stored, **{k: v for k, v in given.items() if v is not None}}, seed=seed)

    def as_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=self.seed)


@dataclass
class Generation:
    prompt: str
    completion: str
    tokens: int
    seconds: float
    stopped_at_eot: bool

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 2), "seconds": round(self.seconds, 4),
                "stopped_at_eot": self.stopped_at_eot}


def generate_text(ckpt: Checkpoint, prompt_text: str, *, model_input: str | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
                  on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate a completion of `model_input` (default: the prompt itself, e.g. after a template).

    Sampling settings left None take Sampling's defaults. `on_text` receives decoded pieces as soon as
    they form whole characters (streaming).
    """
    sampling = Sampling.over(None, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
    if ckpt.model.is_classifier:
        from llmstages.errors import UserError
        raise UserError(f"{ckpt.ref} is a classifier; it predicts labels, not text",
                        hint="use `llmstages classify MODEL TEXT`")
    tok = ckpt.tokenizer
    ids = tok.encode(model_input if model_input is not None else prompt_text) or [tok.eot_id]
    decoder = StreamDecoder(tok)
    produced: list[int] = []
    stopped = False
    start = time.perf_counter()
    with torch.inference_mode():
        for token in generate_tokens(ckpt.model, ids, **sampling.as_kwargs(), stop_id=tok.eot_id, use_cache=use_cache):
            produced.append(token)
            if token == tok.eot_id:
                stopped = True
                break
            piece = decoder.push(token)
            if piece and on_text is not None:
                on_text(piece)
    rest = decoder.flush()
    if rest and on_text is not None:
        on_text(rest)
    seconds = time.perf_counter() - start
    text_ids = [t for t in produced if t != tok.eot_id]
    return Generation(prompt_text, tok.decode(text_ids), len(produced), seconds, stopped)


def stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
