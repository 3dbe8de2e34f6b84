"""Domain-adaptive pretraining (`finetune.dapt_steps`): next-token training of the base on the task's
own texts before a class head is put on it.

A small base pretrained on novels has seen little SMS slang; a few hundred next-token steps on the
training split's messages (labels unused) adapt it first. It is a run of its own, `<run>-dapt`, in the
shared loop, so it commits checkpoints and resumes exactly like any stage: `finetune --resume` after
a kill continues it where it stopped, or skips it when it has finished. Only the train split's texts
are read: the validation texts measure it (val_loss), the test texts are never seen.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from rich.console import Console

from llmstages.checkpoint import Checkpoint, load_checkpoint, parent_info
from llmstages.config import Recipe
from llmstages.data.prepared import LabeledSplit, PreparedDataset
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.errors import UserError
from llmstages.loop import TrainTask, train
from llmstages.model import set_dropout
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, token_byte_lengths


def dapt_run(recipe: Recipe) -> str:
    return f"{recipe.run}-dapt"


def stream(split: LabeledSplit, eot_id: int) -> np.ndarray:
    """The split's texts as one token stream, each followed by <|endoftext|> (like pretraining documents)."""
    pieces = []
    for i in range(len(split)):
        pieces += [np.asarray(split.example(i), dtype=np.int64), np.array([eot_id], dtype=np.int64)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def dapt_recipe(recipe: Recipe) -> Recipe:
    """The recipe of the DAPT run: the fine-tuning recipe's train settings, `dapt_steps` steps at
    `dapt_lr` (min_lr scaled alike), best checkpoint by val_loss, no early stop."""
    sub = copy.deepcopy(recipe)
    sub.run, t, ft = dapt_run(recipe), sub.train, recipe.finetune
    lr = ft.dapt_lr or t.lr
    t.min_lr, t.lr = t.min_lr * lr / t.lr, lr
    t.max_steps, t.epochs = ft.dapt_steps, 0.0
    t.warmup_steps = min(t.warmup_steps, ft.dapt_steps // 10)
    t.best_metric, t.patience = "val_loss", 0
    sub.task, sub.finetune.dapt_steps = "pretrain", 0
    return sub


def domain_adapt(base: Checkpoint, data: PreparedDataset, recipe: Recipe, store: Store, *, resume: bool,
                 allow_change: bool, console: Console) -> tuple[Checkpoint, str]:
    """Run (or resume, or skip when finished) the DAPT run; returns its last checkpoint and a reference to it."""
    if base.model.is_classifier:
        raise UserError(f"finetune.dapt_steps needs a language model to pretrain; init_from={recipe.init_from} "
                        "is a classifier", hint="set finetune.dapt_steps=0, or start from a language model")
    sub = dapt_recipe(recipe)
    latest = store.latest(sub.run)
    finished = latest is not None and load_checkpoint(latest, store).meta.get("step") == sub.train.max_steps
    if not (finished and resume):
        model = base.model
        set_dropout(model, recipe.model.dropout)
        task = dapt_task(model.config.block_size, base.tokenizer, data, sub)
        parent = parent_info(recipe.init_from, base, store)
        train(model, base.tokenizer, sub, task, store, stage="dapt", parent=parent,
              resume=resume and latest is not None, allow_change=allow_change, console=console)
        latest = store.latest(sub.run)
    # Always the committed weights, read back: a straight run and a resumed one start the head alike.
    return load_checkpoint(latest, store), str(latest)


def dapt_task(block: int, tokenizer: Tokenizer, data: PreparedDataset, recipe: Recipe) -> TrainTask:
    """Next-token batches of random windows of the train split's texts; val_loss on the val split's."""
    eot_id = tokenizer.eot_id
    train_tokens = stream(data.records("train"), eot_id)
    if len(train_tokens) <= block:
        block = max(2, len(train_tokens) - 1)  # a tiny training split: shorter windows than the context
    micro = recipe.train.micro_batch_size
    sampler = WindowSampler([train_tokens], block, micro, recipe.train.seed)
    val_tokens = stream(data.records("val"), eot_id) if "val" in data.splits else np.zeros(0, dtype=np.int64)
    val_batches = fixed_windows([val_tokens], block, micro, recipe.train.eval_batches) if len(val_tokens) > block \
        else None
    token_bytes = torch.tensor(token_byte_lengths(tokenizer))

    def evaluate(m) -> dict:
        return lm_metrics(m, val_batches, token_bytes) if val_batches is not None else {}

    return TrainTask(kind="pretrain", batch=sampler, loss=lm_loss, evaluate=evaluate,
                     data_fingerprint=f"{data.fingerprint}:dapt", examples_per_epoch=max(1, len(train_tokens) // block))
