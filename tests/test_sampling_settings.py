"""`generate` and `chat` take their sampling settings from the command line first, then the checkpoint."""

from types import SimpleNamespace

import torch

from llmstages.sampling import sample_next
from llmstages.stages.generate import Sampling


def checkpoint_with(generate: dict | None) -> SimpleNamespace:
    return SimpleNamespace(meta={} if generate is None else {"generate": generate})


def test_stored_defaults_fill_what_the_user_left_unset():
    ckpt = checkpoint_with({"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0})
    sampling = Sampling.from_checkpoint(ckpt, top_k=40, seed=7)
    assert sampling == Sampling(max_new_tokens=128, temperature=0.0, top_k=40, top_p=1.0, seed=7)


def test_a_given_zero_is_kept_not_replaced_by_the_stored_value():
    ckpt = checkpoint_with({"temperature": 0.9, "max_new_tokens": 64})
    sampling = Sampling.from_checkpoint(ckpt, temperature=0.0)  # 0 = greedy: falsy, but given
    assert sampling.temperature == 0.0 and sampling.max_new_tokens == 64


def test_without_stored_settings_the_defaults_apply_and_unknown_keys_are_ignored():
    assert Sampling.from_checkpoint(checkpoint_with(None)) == Sampling()
    assert Sampling.from_checkpoint(checkpoint_with({"colour": "red"})) == Sampling()
    assert Sampling.from_checkpoint(checkpoint_with({"stop": "\n"})) == Sampling(stop=["\n"])  # one string
    assert Sampling(top_k=5, seed=1).as_kwargs() == {"max_new_tokens": 200, "temperature": 0.8, "top_k": 5,
                                                    "top_p": 1.0, "seed": 1, "stop": [], "repetition_penalty": 1.0,
                                                    "min_new_tokens": 0}


def test_top_p_zero_keeps_the_most_likely_token_instead_of_failing():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, 0.0, 0.0, 0.0]])
    for seed in range(5):
        picked = sample_next(logits, temperature=1.0, top_p=0.0, generator=torch.Generator().manual_seed(seed))
        assert picked.tolist() == [1, 0]
