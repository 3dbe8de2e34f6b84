"""`llmstages generate`: continue a prompt with a trained model, streaming tokens as they come."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmstages.checkpoint import Checkpoint
from llmstages.config import GenerateConfig
from llmstages.errors import UserError
from llmstages.sampling import generate_tokens
from llmstages.stopping import StopStrings
from llmstages.tokenizer import StreamDecoder


@dataclass
class Sampling(GenerateConfig):
    """How to pick tokens: the recipe's `generate` settings (recipe_schema.py holds their defaults, the only
    place they are set) plus a seed; `from_checkpoint` fills what the user left unset from the checkpoint."""

    seed: int | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **given: int | float | None) -> "Sampling":
        """Options given on the command line (not None) win over the checkpoint's stored defaults."""
        return cls.over(ckpt.meta.get("generate"), **given)

    @classmethod
    def over(cls, stored: dict | None, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: list[str] | None = None, repetition_penalty: float | None = None,
             min_new_tokens: int | None = None) -> "Sampling":
        """Settings given (not None) over `stored` ones (a checkpoint's `generate`) over the defaults.

        The result is checked as a recipe's `generate` section is: a UserError names each bad setting."""
        given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
                     repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
        stored = {k: v for k, v in (stored or {}).items() if k in given}
        if isinstance(stored.get("stop"), str):  # one string, as a hand-written meta.json may give it
            stored["stop"] = [stored["stop"]]
        sampling = cls(**{**stored, **{k: v for k, v in given.items() if v is not None}}, seed=seed)
        sampling.check()
        return sampling

    def check(self) -> None:
        """The settings together make sense (each alone is bounded by the recipe schema or the CLI)."""
        if self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"min_new_tokens={self.min_new_tokens} is more than max_new_tokens={self.max_new_tokens}",
                            hint="lower --min-new-tokens or raise --max-new-tokens")
        if "" in self.stop:
            raise UserError("an empty stop string would end every reply at once", hint="remove the empty --stop")
        if not 0 < self.repetition_penalty <= 10:
            raise UserError(f"repetition_penalty={self.repetition_penalty} is outside (0, 10]",
                            hint="use 1 for off, 1.1 to 1.3 to repeat less")

    def as_kwargs(self) -> dict:
        """Keyword arguments for generate_text."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=self.seed, stop=list(self.stop),
                    repetition_penalty=self.repetition_penalty, min_new_tokens=self.min_new_tokens)


STOP_REASONS = ("stop_string", "eos", "max_new_tokens")


@dataclass
class Generation:
    prompt: str
    completion: str
    tokens: int
    seconds: float
    stop_reason: str  # one of STOP_REASONS: what ended the reply

    @property
    def stopped_at_eot(self) -> bool:
        return self.stop_reason == "eos"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens_per_s, 2), "seconds": round(self.seconds, 4),
                "stop_reason": self.stop_reason, "stopped_at_eot": self.stopped_at_eot}


def generate_text(ckpt: Checkpoint, prompt_text: str, *, model_input: str | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                  repetition_penalty: float | None = None, min_new_tokens: int | None = None,
                  use_cache: bool = True, on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate a completion of `model_input` (default: the prompt itself, e.g. after a template).

    Sampling settings left None take Sampling's defaults. The reply ends at end-of-text, before the first
    of the `stop` strings, or after max_new_tokens (Generation.stop_reason says which); `tokens` counts
    every token generated, those of a stop string included. `on_text` receives decoded pieces as soon as
    they form whole characters and cannot be the start of a stop string (streaming).
    """
    sampling = Sampling.over(None, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop=stop, repetition_penalty=repetition_penalty,
                             min_new_tokens=min_new_tokens)
    if ckpt.model.is_classifier:
        raise UserError(f"{ckpt.ref} is a classifier; it predicts labels, not text",
                        hint="use `llmstages classify MODEL TEXT`")
    tok = ckpt.tokenizer
    ids = tok.encode(model_input if model_input is not None else prompt_text) or [tok.eot_id]
    decoder, stops = StreamDecoder(tok), StopStrings(sampling.stop)

    def show(piece: str) -> None:
        if piece and on_text is not None:
            on_text(piece)

    produced, reason = 0, "max_new_tokens"
    start = time.perf_counter()
    with torch.inference_mode():
        for token in generate_tokens(ckpt.model, ids, max_new_tokens=sampling.max_new_tokens,
                                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                     seed=sampling.seed, repetition_penalty=sampling.repetition_penalty,
                                     min_new_tokens=sampling.min_new_tokens, stop_id=tok.eot_id, use_cache=use_cache):
            produced += 1
            if token == tok.eot_id:  # generate_tokens only yields it once min_new_tokens are out
                reason = "eos"
                break
            show(stops.feed(decoder.push(token), armed=produced > sampling.min_new_tokens))
            if stops.stopped:
                break
    if not stops.stopped:  # a character cut at max_new_tokens, then the held-back tail
        show(stops.feed(decoder.flush(), armed=produced > sampling.min_new_tokens))
        show(stops.flush())
    reason = "stop_string" if stops.stopped else reason
    seconds = time.perf_counter() - start
    return Generation(prompt_text, stops.text, produced, seconds, reason)


def stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
