"""`llmstages finetune`: continue training a base model on labeled data.

The two kinds share everything but the task (the batch source, the loss and the metrics):
    classify  (stages/classify.py): the LM head is replaced by a class head read at the last real token;
    instruct  (stages/instruct.py): next-token loss on the response tokens only.
Here: load the base (`init_from`), prepare the data with the base's tokenizer, let the task build the
model and its TrainTask, choose what trains (`finetune.trainable`), then run the shared loop.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console

from llmstages.checkpoint import Checkpoint, load_checkpoint, parent_info
from llmstages.config import FinetuneConfig, Recipe, recipes_dir
from llmstages.data.plan import recipe_tokenizer
from llmstages.distributed import is_main_process
from llmstages.errors import UserError
from llmstages.lora import add_lora, merge_lora
from llmstages.loop import TrainResult, train
from llmstages.model import GPT, set_dropout
from llmstages.runstart import check_run_start
from llmstages.runtime import resolve_device, resolve_precision
from llmstages.stages.prepare import get_or_prepare
from llmstages.stages.pretrain import check_data_tokenizer, check_tokenizer, say_inherited
from llmstages.store import Store

# --task NAME -> (built-in recipe, the recipe `task:` it stands for)
TASK_RECIPES = {"spam": ("finetune-spam", "classify"), "instruct": ("finetune-instruct", "instruct"),
                "classify": ("finetune-spam", "classify")}


def task_recipe(task: str) -> Path:
    """The built-in recipe of `--task NAME`."""
    return recipes_dir() / f"{_task_entry(task)[0]}.yaml"


def check_task(task: str, recipe: Recipe, recipe_path: str) -> None:
    """`--task NAME` given with a recipe: the recipe must be of that kind."""
    wanted = _task_entry(task)[1]
    if recipe.task != wanted:
        raise UserError(f"--task {task} wants a {wanted} recipe, but {recipe_path} has task: {recipe.task}",
                        hint=f"drop --task, or give a recipe with task: {wanted}")


def _task_entry(task: str) -> tuple[str, str]:
    if task not in TASK_RECIPES:
        raise UserError(f"--task {task}: unknown task", hint=f"use one of: {', '.join(sorted(TASK_RECIPES))}")
    return TASK_RECIPES[task]


def load_base(recipe: Recipe, store: Store) -> Checkpoint:
    """The checkpoint fine-tuning starts from, with a message that says how to make it when missing."""
    if not recipe.init_from:
        raise UserError("fine-tuning needs a starting point: init_from is not set",
                        hint="add init_from=RUN (e.g. quickstart), a checkpoint folder, or hf:DIR_OR_ID")
    try:
        return load_checkpoint(recipe.init_from, store)
    except UserError as err:
        if "no run named" in err.message and (recipes_dir() / f"{recipe.init_from}.yaml").exists():
            raise UserError(f"init_from={recipe.init_from}: that base model has not been trained yet "
                            f"(store: {store.root})",
                            hint=f"make it first with `llmstages pretrain {recipe.init_from}`, or set "
                                 "init_from=hf:gpt2 to start from GPT-2") from None
        raise


def fit_model_settings(recipe: Recipe, base: Checkpoint) -> None:
    """Apply the recipe's model settings that a fine-tune can honour; refuse the others (exit 2).

    The shape comes from the base: n_layer, n_head, n_embd and vocab_size may only repeat it. A shorter
    context (model.block_size) crops the learned position table; a longer one has no trained positions.
    """
    cfg, base_cfg = recipe.model, base.model.config
    wrong = [f"model.{key}={getattr(cfg, key)} (the base has {getattr(base_cfg, key)})"
             for key in ("n_layer", "n_head", "n_embd", "vocab_size")
             if getattr(cfg, key) is not None and getattr(cfg, key) != getattr(base_cfg, key)]
    if cfg.block_size is not None and cfg.block_size > base_cfg.block_size:
        wrong.append(f"model.block_size={cfg.block_size} (the base was trained with a context of "
                     f"{base_cfg.block_size} tokens and has no positions beyond it)")
    if wrong:
        raise UserError(f"fine-tuning {recipe.init_from} cannot honour " + "; ".join(wrong),
                        hint="a fine-tune keeps its base's shape: drop these settings (model.block_size may be "
                             f"at most {base_cfg.block_size})")
    if cfg.block_size is not None and cfg.block_size < base_cfg.block_size:
        crop_context(base.model, cfg.block_size)


def crop_context(model: GPT, block_size: int) -> None:
    """Shorten the model's context: keep the first `block_size` rows of the position table wpe (P, C);
    rotary positions (pos_emb=rope) have no table and need only the new limit."""
    if "wpe" in model.transformer:
        wpe = model.transformer.wpe.weight
        model.transformer.wpe = nn.Embedding.from_pretrained(wpe[:block_size].detach().clone(), freeze=False)
    model.config.block_size = block_size


def check_trainable(mode: str, n_layer: int, *, classifier: bool) -> None:
    """Refuse a finetune.trainable that the model cannot have (checked before any data is prepared)."""
    if mode.startswith("last_blocks:") and not 1 <= int(mode.split(":")[1]) <= n_layer:
        raise UserError(f"finetune.trainable={mode}: the model has {n_layer} blocks",
                        hint=f"use last_blocks:1 .. last_blocks:{n_layer}")
    if mode == "head" and not classifier:
        raise UserError("finetune.trainable=head needs a class head; a language model's head is its embedding",
                        hint="use all, last_blocks:N or lora for instruction fine-tuning")


def set_trainable(model: GPT, ft: FinetuneConfig) -> list[str]:
    """Freeze what `finetune.trainable` leaves out; return the names of the trainable parameters.

    all             every parameter
    head            the class head only (classifiers)
    last_blocks:N   the last N transformer blocks, the final LayerNorm and the class head. A language
                    model's output head is tied to the token embedding, which stays frozen here.
    lora            low-rank adapters on `lora_targets` (base weights frozen), plus a class head
    """
    mode = ft.trainable
    check_trainable(mode, model.config.n_layer, classifier=model.is_classifier)
    for p in model.parameters():
        p.requires_grad = mode == "all"
    if mode == "lora":
        add_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
        model.config.lora_rank, model.config.lora_alpha = ft.lora_rank, ft.lora_alpha
        model.config.lora_dropout, model.config.lora_targets = ft.lora_dropout, list(ft.lora_targets)
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
    elif mode.startswith("last_blocks:"):
        n = int(mode.split(":")[1])
        for block in model.transformer.h[-n:]:
            block.requires_grad_(True)
        model.transformer.ln_f.requires_grad_(True)
    if model.is_classifier:
        model.score.requires_grad_(True)  # a new head always trains
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise UserError(f"finetune.trainable={mode} leaves nothing to train")
    return names


def check_frozen_dtype(recipe: Recipe) -> None:
    """Refuse frozen bf16 weights without bf16 compute: an fp32 matmul cannot read a bf16 weight."""
    if recipe.finetune.frozen_dtype == "fp32":
        return
    precision = resolve_precision(recipe.train.precision, resolve_device(recipe.train.device))
    if precision != "bf16":
        raise UserError(f"finetune.frozen_dtype={recipe.finetune.frozen_dtype} needs bf16 compute, but "
                        f"train.precision={recipe.train.precision} is {precision} here",
                        hint="set train.precision=bf16, or finetune.frozen_dtype=fp32")


def hold_frozen_weights(model: GPT, dtype: str) -> int:
    """Cast the frozen matrices and embeddings (dim >= 2) to `dtype`; return how many bytes that saved.

    Norm gains and biases stay fp32 (tiny, and a bf16 gain would round every normalised activation).
    The forward pass mixes the two only under bf16 autocast, which casts each matmul's operands.
    """
    if dtype == "fp32":
        return 0
    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.dim() >= 2 and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            saved += p.numel() * 2
    return saved


def trainable_summary(model: nn.Module) -> str:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = re.sub(r"\.(weight|bias|lora_A|lora_B)$", "", name)
            key = re.sub(r"^transformer\.", "", key).split(".")[0:2]
            groups[".".join(key)] = groups.get(".".join(key), 0) + p.numel()
    return ", ".join(f"{k} ({v:,})" for k, v in groups.items())


def finetune(recipe: Recipe, store: Store, *, resume: bool = False, allow_change: bool = False,
             dry_run: bool = False, console: Console | None = None) -> TrainResult | dict:
    console = console or Console(stderr=True)
    if recipe.task not in ("classify", "instruct"):
        raise UserError(f"the recipe's task is {recipe.task}; finetune runs classify or instruct recipes",
                        hint="use `llmstages pretrain` for pretraining recipes")
    if recipe.finetune.combination and not dry_run:
        # N ordinary runs, then their average or their ensemble (a dry run: one member)
        from llmstages.stages.soup import finetune_soup
        return finetune_soup(recipe, store, finetune, resume=resume, allow_change=allow_change, console=console)
    base = load_base(recipe, store)
    base.tokenizer = recipe_tokenizer(recipe, base.tokenizer)  # lowercasing, template hf's end of turn: kept
    say_inherited(console, recipe, base)
    if base.model.config.lora_rank > 0:
        merge_lora(base.model)  # a LoRA base is folded into plain weights; this run adds its own adapters
    # Every refusal that does not need the data comes before it is prepared: a refused run writes nothing.
    fit_model_settings(recipe, base)
    check_data_tokenizer(recipe, store, base.tokenizer)
    check_trainable(recipe.finetune.trainable, base.model.config.n_layer, classifier=recipe.task == "classify")
    check_frozen_dtype(recipe)
    dapt = recipe.task == "classify" and recipe.finetune.dapt_steps > 0
    if not dry_run and not (resume and dapt and store.latest(f"{recipe.run}-dapt") is not None):
        check_run_start(store, recipe.run, resume)  # (a run killed during DAPT resumes from its -dapt run)
    data = get_or_prepare(recipe, store, console)
    check_tokenizer(base.tokenizer, data, recipe.init_from)
    if data.task != recipe.task:
        raise UserError(f"dataset {data.path.name} was prepared for {data.task}, not {recipe.task}")
    if recipe.task == "classify":
        from llmstages.stages.classify import classification_task as make_task
    else:
        from llmstages.stages.instruct import instruction_task as make_task
    parent = parent_info(recipe.init_from, base, store)
    if recipe.task == "classify" and recipe.finetune.dapt_steps and not dry_run:
        from llmstages.stages.dapt import domain_adapt
        base, ref = domain_adapt(base, data, recipe, store, resume=resume, allow_change=allow_change, console=console)
        parent = parent_info(ref, base, store)
        resume = resume and bool(store.checkpoints(recipe.run))  # killed during DAPT: the head starts fresh
    model, task = make_task(base, data, recipe, console=console)
    set_dropout(model, recipe.model.dropout)
    torch.manual_seed(recipe.train.seed)  # LoRA's A matrices draw from the global RNG: same seed, same run
    set_trainable(model, recipe.finetune)
    console.print(f"trainable: {trainable_summary(model)}", highlight=False)
    if recipe.finetune.frozen_dtype != "fp32":
        saved = hold_frozen_weights(model, recipe.finetune.frozen_dtype)
        console.print(f"frozen weights held in {recipe.finetune.frozen_dtype}: {saved / 2**20:,.1f} MiB saved",
                      highlight=False)
    if dry_run:
        from llmstages.dryrun import estimate
        return estimate(model, recipe, task, console, data=data.path)
    result = train(model, base.tokenizer, recipe, task, store, stage="finetune",
                   parent=parent, resume=resume, allow_change=allow_change,
                   console=console)
    if recipe.task == "classify" and is_main_process():
        from llmstages.stages.classify import average_last, report_test_split
        scored = average_last(result, recipe, store, console=console) if recipe.finetune.average_last > 1 else None
        report_test_split(result, data, store, console=console, path=scored)  # the best (or averaged) checkpoint
    return result
