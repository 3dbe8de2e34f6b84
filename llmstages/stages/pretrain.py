"""`llmstages pretrain`: next-token prediction on a prepared corpus, from scratch or from `init_from`.

Read top to bottom: get the prepared data (preparing it if needed), build or load the model, check
that tokenizer and data match, describe the task to the shared loop, train.
"""

from __future__ import annotations


import torch
from rich.console import Console

from llmstages.checkpoint import Checkpoint, load_checkpoint, parent_info, read_model_json
from llmstages.config import ModelConfig, Recipe
from llmstages.data.plan import parent_tokenizer, recipe_tokenizer
from llmstages.data.prepared import PreparedDataset
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.errors import UserError
from llmstages.loop import TrainResult, TrainTask, train
from llmstages.model import GPT, GPTConfig, build_config, set_dropout
from llmstages.objectives import lm_loss, lm_metrics
from llmstages.runstart import check_run_start
from llmstages.stages.prepare import get_or_prepare
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, token_byte_lengths


def model_config(cfg: ModelConfig, vocab_size: int) -> GPTConfig:
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens",
                        hint="remove model.vocab_size (it defaults to the tokenizer's) or raise it")
    return build_config(cfg.size if cfg.size != "custom" else "", vocab_size=cfg.vocab_size or vocab_size,
                        arch=cfg.arch, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        block_size=cfg.block_size, dropout=cfg.dropout, bias=cfg.bias, pos_emb=cfg.pos_emb,
                        rope_theta=cfg.rope_theta, norm=cfg.norm, mlp=cfg.mlp, mlp_hidden=cfg.mlp_hidden,
                        n_kv_head=cfg.n_kv_head, qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings,
                        logit_softcap=cfg.logit_softcap)


def say_inherited(console: Console, recipe: Recipe, parent: Checkpoint) -> dict:
    """Fill the train settings the recipe leaves unset from the parent checkpoint, and say which (also in --dry-run)."""
    taken = recipe.train.inherit(parent.meta.get("train"))
    if taken:
        console.print(f"train settings from init_from={recipe.init_from}: "
                      + ", ".join(f"{k}={v}" for k, v in taken.items()), highlight=False)
    return taken


def check_tokenizer(tokenizer: Tokenizer, data: PreparedDataset, model_ref: str) -> None:
    """Refuse to train a model on data tokenized by a different tokenizer, before step 1."""
    expected = data.manifest["tokenizer_fingerprint"]
    if tokenizer.fingerprint != expected:
        raise UserError(f"tokenizer mismatch: {model_ref} uses tokenizer {tokenizer.fingerprint}, the dataset "
                        f"{data.path.name} was tokenized with {expected}",
                        hint="prepare the data with the model's tokenizer (data.tokenizer=auto with init_from)")
    if data.manifest.get("eot_id", tokenizer.eot_id) != tokenizer.eot_id:  # e.g. a chat template's end of turn
        raise UserError(f"end-of-text mismatch: {model_ref} ends texts with token {tokenizer.eot_id} ({tokenizer.eot}), "
                        f"the dataset {data.path.name} with token {data.manifest['eot_id']}",
                        hint="prepare the data with the same finetune.template as the run")


def check_data_tokenizer(recipe: Recipe, store: Store, tokenizer: Tokenizer) -> None:
    """Refuse data settings that would tokenize with another tokenizer than the model's, before anything is
    prepared (check_tokenizer checks the prepared data again)."""
    from llmstages.data.plan import choose_tokenizer

    choice = choose_tokenizer(recipe, store)
    if choice.kind == "train":
        raise UserError(f"tokenizer mismatch: data.tokenizer={recipe.data.tokenizer} would train a new tokenizer, "
                        f"but the model {recipe.init_from} has its own; nothing was prepared",
                        hint="use data.tokenizer=auto (the model's tokenizer)")
    if choice.tokenizer.fingerprint != tokenizer.fingerprint:
        raise UserError(f"tokenizer mismatch: data.tokenizer={choice.ref} has fingerprint "
                        f"{choice.tokenizer.fingerprint}, the model {recipe.init_from} uses {tokenizer.fingerprint}; "
                        "nothing was prepared", hint="use data.tokenizer=auto (the model's tokenizer)")


def refuse_classifier_base(ref: str, store: Store) -> None:
    """Pretraining continues a language model; a classifier checkpoint is refused from its model.json
    (an hf: classifier is refused by build_model once loaded)."""
    if ref.startswith("hf:"):
        return
    if read_model_json(store.resolve(ref)).get("num_classes"):
        raise UserError(f"init_from={ref} is a classifier; pretraining needs a language model")


def build_model(recipe: Recipe, store: Store, data: PreparedDataset,
                console: Console | None = None) -> tuple[GPT, Tokenizer, dict | None]:
    """A new model shaped by `recipe.model`, or the `init_from` checkpoint (whose shape and unset train
    settings win)."""
    if recipe.init_from:
        ckpt = load_checkpoint(recipe.init_from, store)
        say_inherited(console or Console(stderr=True), recipe, ckpt)
        if ckpt.model.is_classifier:
            raise UserError(f"init_from={recipe.init_from} is a classifier; pretraining needs a language model")
        ckpt.tokenizer = recipe_tokenizer(recipe, ckpt.tokenizer)
        check_tokenizer(ckpt.tokenizer, data, recipe.init_from)
        set_dropout(ckpt.model, recipe.model.dropout)
        return ckpt.model, ckpt.tokenizer, parent_info(recipe.init_from, ckpt, store)
    tokenizer = data.tokenizer
    torch.manual_seed(recipe.train.seed)
    return GPT(model_config(recipe.model, tokenizer.vocab_size)), tokenizer, None


def pretrain_task(model: GPT, tokenizer: Tokenizer, data: PreparedDataset, recipe: Recipe) -> TrainTask:
    if data.task != "pretrain":
        raise UserError(f"dataset {data.path.name} was prepared for {data.task}, not pretraining",
                        hint="use a recipe with task: pretrain")
    block, micro = model.config.block_size, recipe.train.micro_batch_size
    sampler = WindowSampler(data.shards("train"), block, micro, recipe.train.seed)
    val_batches = fixed_windows(data.shards("val"), block, micro, recipe.train.eval_batches)
    token_bytes = torch.tensor(token_byte_lengths(tokenizer))
    train_tokens = data.manifest["splits"]["train"]["tokens"]
    return TrainTask(kind="pretrain", batch=sampler, loss=lm_loss,
                     evaluate=lambda m: lm_metrics(m, val_batches, token_bytes),
                     data_fingerprint=data.fingerprint, examples_per_epoch=max(1, train_tokens // block))


def pretrain(recipe: Recipe, store: Store, *, resume: bool = False, allow_change: bool = False,
             dry_run: bool = False, console: Console | None = None) -> TrainResult | dict:
    console = console or Console(stderr=True)
    if recipe.task != "pretrain":
        raise UserError(f"the recipe's task is {recipe.task}; pretrain runs task: pretrain recipes",
                        hint=f"use `llmstages finetune --task ... RECIPE` for {recipe.task}")
    if not dry_run:  # refusals that need no data come before it is prepared
        check_run_start(store, recipe.run, resume)
    if recipe.init_from:  # parent_tokenizer: a missing base says which command makes it
        tokenizer = recipe_tokenizer(recipe, parent_tokenizer(recipe.init_from, store))
        refuse_classifier_base(recipe.init_from, store)  # the root cause first: no tokenizer can fix that
        check_data_tokenizer(recipe, store, tokenizer)
    data = get_or_prepare(recipe, store, console)
    model, tokenizer, parent = build_model(recipe, store, data, console)
    task = pretrain_task(model, tokenizer, data, recipe)
    if dry_run:
        from llmstages.dryrun import estimate
        return estimate(model, recipe, task, console, data=data.path)
    return train(model, tokenizer, recipe, task, store, stage="pretrain", parent=parent, resume=resume,
                 allow_change=allow_change, console=console)
