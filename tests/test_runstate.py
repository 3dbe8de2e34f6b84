"""RunState's saved form, and resume going through checkpoint.py's sha256 check."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from rich.console import Console

from llmstages.config import build_recipe
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.errors import UserError
from llmstages.loop import TrainTask, train
from llmstages.model import GPT, build_config
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.runstate import RunState, restore_rng
from llmstages.store import Store
from llmstages.tokenizer import train_bpe


def test_the_saved_form_round_trips_and_restores_every_rng():
    state = RunState(step=12, tokens_seen=3456, elapsed_before=7.5, best={"step": 10, "metric": "val_loss", "value": 2.5},
                     evals_since_best=1, metrics={"val_loss": 2.6}, loss_sum=torch.tensor(5.25), loss_count=2)
    tensors, info = state.to_saved({"state": {}}, world_size=2, seed=3, accum=4)
    assert info["sampler"] == {"kind": "indexed", "seed": 3, "next_micro_batch": 12 * 4 * 2}
    expected = (torch.rand(3), random.random(), np.random.rand())
    back = RunState.from_saved(tensors, info)
    assert (back.step, back.tokens_seen, back.best, back.evals_since_best, back.metrics, back.loss_count) == \
        (12, 3456, state.best, 1, {"val_loss": 2.6}, 2)
    assert float(back.loss_sum) == 5.25 and back.elapsed_before >= 7.5
    restore_rng(tensors, info)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_record_eval_keeps_the_best_and_counts_patience():
    state = RunState(step=5)
    assert state.record_eval({"val_loss": 3.0}, "val_loss")
    state.step = 10
    assert not state.record_eval({"val_loss": 3.5}, "val_loss") and state.evals_since_best == 1
    assert state.best == {"step": 5, "metric": "val_loss", "value": 3.0}
    higher = RunState()
    assert higher.record_eval({"f1": 0.5}, "f1") and higher.record_eval({"f1": 0.6}, "f1")
    assert not higher.record_eval({"f1": 0.55}, "f1") and not higher.record_eval({}, "f1")
    assert higher.best["value"] == 0.6 and higher.evals_since_best == 1  # an eval without the metric is not counted
    # a best by another metric (a resume that changed train.best_metric) is never compared with: a loss
    # of 2.0 is not worse than an F1 of 0.6
    assert higher.record_eval({"val_loss": 2.0}, "val_loss")
    assert higher.best == {"step": 0, "metric": "val_loss", "value": 2.0}


def tiny_run(store: Store, steps: int, resume: bool = False):
    tok = train_bpe(["the king shall speak of love and war " * 50], 280)
    ids = np.array(tok.encode("the king shall speak of love and war " * 200), dtype=np.uint16)
    recipe = build_recipe({"run": "r", "train": {"max_steps": steps, "micro_batch_size": 2, "global_batch_size": 2,
                                                 "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
                                                 "save_every": 2, "log_every": 1}})
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=tok.vocab_size, block_size=16))
    val = fixed_windows([ids], 16, 2, 1)
    task = TrainTask("pretrain", WindowSampler([ids], 16, 2, 0), lm_loss, lambda m: lm_metrics(m, val), "data")
    return train(model, tok, recipe, task, store, stage="pretrain", resume=resume, allow_change=True,
                 console=Console(file=io.StringIO()))


def test_resume_refuses_a_checkpoint_whose_files_do_not_match_its_manifest(tmp_path):
    store = Store(tmp_path)
    tiny_run(store, 2)
    weights = store.latest("r") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="contents do not match MANIFEST"):
        tiny_run(store, 4, resume=True)


def test_log_lines_carry_the_device_peak_memory_only_where_there_is_one(tmp_path, monkeypatch):
    """CUDA: each step line of log.jsonl records the allocator's peak (MiB); a CPU run has no such field.
    (The device is faked: peak_device_mb is what reads torch.cuda's counter.)"""
    from llmstages import loop

    def lines(store: Store) -> list[dict]:
        return [json.loads(x) for x in (store.run_dir("r") / "log.jsonl").read_text().splitlines()]

    tiny_run(Store(tmp_path / "cpu"), 2)
    assert all("peak_device_mib" not in r for r in lines(Store(tmp_path / "cpu")))
    monkeypatch.setattr(loop, "peak_device_mb", lambda device: 1234.56)
    tiny_run(Store(tmp_path / "gpu"), 2)
    steps = [r for r in lines(Store(tmp_path / "gpu")) if "tokens_per_s" in r]
    assert len(steps) == 2 and all(r["peak_device_mib"] == 1234.6 for r in steps)
