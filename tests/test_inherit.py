"""Train settings a recipe leaves unset are taken from its init_from checkpoint (nanochat's "None = inherit")."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from llmstages.checkpoint import load_checkpoint
from llmstages.config import INHERITED, build_recipe
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.errors import UserError
from llmstages.loop import TrainTask, train
from llmstages.model import GPT, build_config
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.stages.pretrain import say_inherited
from llmstages.store import Store
from llmstages.tokenizer import train_bpe

PARENT = {"lr": 0.02, "min_lr": 0.0002, "warmup_steps": 7, "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.99,
          "grad_clip": 0.5, "max_steps": 99}


def finetune_recipe(train: dict, overrides: list[str] = ()):
    return build_recipe({"task": "classify", "run": "child", "init_from": "parent", "train": train}, overrides)


def test_unset_settings_come_from_the_parent_and_given_ones_stay():
    recipe = finetune_recipe({"lr": 1e-3, "max_steps": 5}, ["train.warmup_steps=3"])
    taken = recipe.train.inherit(PARENT)
    assert taken == {"min_lr": 0.0002, "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.99, "grad_clip": 0.5}
    t = recipe.train
    assert (t.lr, t.warmup_steps, t.max_steps, t.min_lr, t.beta2) == (1e-3, 3, 5, 0.0002, 0.99)
    assert set(taken) <= set(INHERITED) and "max_steps" not in taken  # the length of a run is never inherited


def test_a_parent_without_train_settings_keeps_the_defaults():
    recipe = finetune_recipe({})
    assert recipe.train.inherit(None) == {} and recipe.train.inherit({}) == {}
    assert recipe.train.lr == 6e-4


def test_an_inherited_min_lr_above_the_given_lr_is_a_user_error():
    with pytest.raises(UserError, match="min_lr=0.002 is above train.lr=0.001"):
        finetune_recipe({"lr": 1e-3}).train.inherit({"min_lr": 0.002})


def test_a_trained_checkpoint_records_its_settings_and_a_child_inherits_them(tmp_path):
    tok = train_bpe(["the king shall speak of love and war " * 50], 280)
    ids = np.array(tok.encode("the king shall speak of love and war " * 200), dtype=np.uint16)
    parent = build_recipe({"run": "parent", "train": {"max_steps": 2, "micro_batch_size": 2, "global_batch_size": 2,
                                                      "lr": 0.02, "min_lr": 0.002, "warmup_steps": 1,
                                                      "eval_every": 0, "eval_batches": 1, "log_every": 1}})
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=tok.vocab_size, block_size=16))
    val = fixed_windows([ids], 16, 2, 1)
    task = TrainTask("pretrain", WindowSampler([ids], 16, 2, 0), lm_loss, lambda m: lm_metrics(m, val), "data")
    quiet = Console(file=io.StringIO())
    train(model, tok, parent, task, Store(tmp_path), stage="pretrain", console=quiet)

    ckpt = load_checkpoint("parent", Store(tmp_path))
    assert ckpt.meta["train"]["lr"] == 0.02 and ckpt.meta["train"]["max_steps"] == 2
    child = finetune_recipe({"lr": 1e-2})
    out = Console(file=io.StringIO(), width=200)
    say_inherited(out, child, ckpt)
    assert (child.train.lr, child.train.min_lr, child.train.warmup_steps) == (1e-2, 0.002, 1)
    assert "train settings from init_from=parent: min_lr=0.002, warmup_steps=1" in out.file.getvalue()
