"""Recipes: YAML files loaded into typed, documented dataclasses.

A recipe is read with `yaml.safe_load` (YAML tags that build Python objects are refused), checked
against the dataclasses of recipe_schema.py, and changed by `KEY=VALUE` overrides on the command line. A value is
converted by the type its field declares, never by YAML's guessing: `train.lr=3e-4` is a float.
All problems of a recipe are collected and reported together, each with its dotted path, and an
unknown key gets a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmstages.errors import RecipeError, UserError
from llmstages.modelconfig import LORA_TARGETS
from llmstages.store import RUN_NAME_RE
from llmstages.recipe_parse import RecipeParser, read_yaml, recipe_diff  # noqa: F401 (re-exported)
from llmstages.recipe_schema import (INHERITED, TASKS, ClassifyConfig, DataConfig,  # noqa: F401 (re-exported)
                                     FinetuneConfig, GenerateConfig, ModelConfig, Recipe, TrainConfig,
                                     parse_duration)

# Names users bring from other tools, mapped to ours, so "did you mean" can point at the right key.
ALIASES = {
    "learning_rate": "train.lr", "learningrate": "train.lr", "max_lr": "train.lr",
    "min_learning_rate": "train.min_lr", "max_iters": "train.max_steps", "iters": "train.max_steps",
    "num_steps": "train.max_steps", "steps": "train.max_steps", "batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size", "gradient_accumulation_steps": "train.global_batch_size",
    "warmup_iters": "train.warmup_steps", "warmup": "train.warmup_steps", "eval_interval": "train.eval_every",
    "eval_iters": "train.eval_batches", "log_interval": "train.log_every", "checkpoint_every": "train.save_every",
    "clip": "train.grad_clip", "time_budget": "train.max_time", "time_limit": "train.max_time",
    "max_duration": "train.max_time", "dtype": "train.precision", "num_epochs": "train.epochs",
    "n_embed": "model.n_embd", "d_model": "model.n_embd", "hidden_size": "model.n_embd",
    "num_layers": "model.n_layer", "n_layers": "model.n_layer", "num_heads": "model.n_head",
    "n_heads": "model.n_head", "context_length": "model.block_size", "seq_len": "model.block_size",
    "max_seq_length": "model.block_size", "name": "run", "out_dir": "run", "resume_from": "init_from",
    "path": "data.source", "dataset": "data.source", "files": "data.source",
}


PARSER = RecipeParser(Recipe, ALIASES)


def _cross_checks(recipe: Recipe, problems: list[tuple[str, str]]) -> None:
    """Checks across fields, appended to `problems`. A check whose fields already have a problem of their own
    is skipped: the value there is a default, not what the user wrote."""
    bad = {path for path, _ in problems}

    def ok(*paths: str) -> bool:  # none of these fields (or their sections) has a problem yet
        return not any(p == b or p.startswith(b + ".") for p in paths for b in bad)

    t, m, ft, d = recipe.train, recipe.model, recipe.finetune, recipe.data
    if ok("train.global_batch_size", "train.micro_batch_size") and (problem := t.batch_problem()):
        problems.append(("train.global_batch_size", problem))
    if ok("train.min_lr", "train.lr") and t.min_lr > t.lr:
        problems.append(("train.min_lr", f"{t.min_lr} is above train.lr={t.lr}"))
    if t.strategy == "fsdp" and t.optimizer == "muon":
        problems.append(("train.strategy", "fsdp shards each weight matrix, Muon orthogonalises whole matrices: "
                         "use train.optimizer=adamw with fsdp, or train.strategy=ddp with muon"))
    if t.strategy == "fsdp" and t.spike == "rollback":
        problems.append(("train.spike", "rollback is not supported with train.strategy=fsdp yet: use skip or warn"))
    if t.max_time:
        try:
            parse_duration(t.max_time)
        except ValueError as err:
            problems.append(("train.max_time", str(err)))
        if t.epochs > 0:
            problems.append(("train.max_time", "set together with train.epochs; a run is counted in time or in "
                             "epochs: set one of them (train.epochs=0 or train.max_time=\"\")"))
    if ok("model.n_embd", "model.n_head") and m.n_embd is not None and m.n_head is not None and m.n_embd % m.n_head:
        problems.append(("model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}"))
    if ok("model.n_kv_head", "model.n_head") and m.n_kv_head and m.n_head is not None and m.n_head % m.n_kv_head:
        problems.append(("model.n_kv_head", f"{m.n_kv_head} does not divide model.n_head={m.n_head}"))
    if ok("model") and m.size == "custom" and None in (m.n_layer, m.n_head, m.n_embd, m.block_size):
        problems.append(("model.size", "custom needs model.n_layer, n_head, n_embd and block_size"))
    if ok("data.val_fraction", "data.test_fraction") and d.val_fraction + d.test_fraction >= 1.0:
        problems.append(("data.val_fraction", f"{d.val_fraction} + data.test_fraction={d.test_fraction} "
                         "leaves no training data"))
    if ok("finetune.trainable", "finetune.lora_targets") and ft.trainable == "lora" and not ft.lora_targets:
        problems.append(("finetune.lora_targets", f"empty: LoRA needs some of {', '.join(LORA_TARGETS)}"))
    unknown_targets = sorted(set(ft.lora_targets) - set(LORA_TARGETS))
    if ok("finetune.lora_targets") and unknown_targets:
        problems.append(("finetune.lora_targets", f"{', '.join(unknown_targets)}: not a linear layer of the "
                         f"model; use some of {', '.join(LORA_TARGETS)}"))
    if ok("finetune.trainable") and not re.fullmatch(r"all|head|lora|last_blocks:\d+", ft.trainable):
        problems.append(("finetune.trainable", f"{ft.trainable!r} is not all, head, lora or last_blocks:N"))
    if ft.packing and recipe.task == "pretrain":
        problems.append(("finetune.packing", "packs fine-tuning examples into shared rows; pretraining rows are "
                         "already full windows: set finetune.packing=false"))
    if ft.packing and recipe.task == "classify" and ok("finetune.pooling") and ft.pooling != "last":
        problems.append(("finetune.packing", f"packed texts are read at their last token; finetune.pooling "
                         f"{ft.pooling} needs one text per row: set finetune.packing=false or finetune.pooling=last"))
    if t.patience and t.best_metric == "none":
        problems.append(("train.patience", f"{t.patience} evaluations without improvement, but train.best_metric is "
                         "none (nothing to improve): set a best_metric (val_loss, accuracy, f1) or patience 0"))
    if ft.average_last > t.keep_last:
        problems.append(("finetune.average_last", f"{ft.average_last} is more than train.keep_last={t.keep_last} "
                         "checkpoints kept; raise train.keep_last"))
    for key, members, how in (("finetune.soup", ft.soup, "averages"), ("finetune.ensemble", ft.ensemble, "combines")):
        if members > 1 and recipe.task != "classify":
            problems.append((key, f"{how} fine-tuned classifiers; task {recipe.task} is not one: set {key}=1, or "
                             "use task: classify"))
    if ft.soup > 1 and ft.average_last > 1:
        problems.append(("finetune.soup", f"and finetune.average_last={ft.average_last} both average weights; "
                         "use one of them (set finetune.average_last=0 or finetune.soup=1)"))
    if ft.ensemble > 1 and ft.soup > 1:
        problems.append(("finetune.ensemble", f"and finetune.soup={ft.soup} both fine-tune several members; "
                         "use one of them (set finetune.soup=1 or finetune.ensemble=1)"))
    if ft.ensemble > 1 and ft.average_last > 1:
        problems.append(("finetune.ensemble", f"keeps each member's final checkpoint (its best, else its last), and finetune.average_last="
                         f"{ft.average_last} would make another model of it: set finetune.average_last=0"))
    for key, name in (("run", recipe.run), ("data.name", d.name)):  # each names a folder in the store
        if ok(key) and name is not None and not RUN_NAME_RE.fullmatch(name):
            problems.append((key, f"{name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"))
    g = recipe.generate
    if ok("generate.min_new_tokens", "generate.max_new_tokens") and g.min_new_tokens > g.max_new_tokens:
        problems.append(("generate.min_new_tokens", f"{g.min_new_tokens} is more than generate.max_new_tokens="
                         f"{g.max_new_tokens}; lower it or raise max_new_tokens"))
    if ok("generate.stop") and "" in g.stop:
        problems.append(("generate.stop", "an empty string would end every reply at once; remove it"))
    for key in ("sha256", "mirror"):
        given = getattr(d, key)
        if ok(f"data.{key}", "data.source") and given and len(given) != len(d.source):
            problems.append((f"data.{key}", f"{len(given)} entries for {len(d.source)} sources; give one per "
                             "source (\"\" where unknown)"))


def build_recipe(raw: dict, overrides: list[str] = (), *, source: str = "<recipe>", stem: str | None = None) -> Recipe:
    """Build a checked Recipe from a raw mapping plus KEY=VALUE overrides; raise RecipeError listing all problems.

    Field problems (unknown keys, types, bounds) and cross-field problems are reported in one pass. The
    run's name defaults to the recipe file's `stem`, which must then be a valid name too.
    """
    recipe, problems = PARSER.parse(raw, overrides)
    if recipe.run is None and stem and not any(path == "run" for path, _ in problems):
        if not RUN_NAME_RE.fullmatch(stem):
            problems.append(("run", f"the recipe file's name gives the run name {stem!r}, which cannot name a "
                             "run in the store; set `run: NAME` in the recipe (or run=NAME), or rename the file"))
        else:
            recipe.run = stem
    _cross_checks(recipe, problems)
    if problems:
        raise RecipeError(source, problems)
    train = raw.get("train")
    recipe.train.given = frozenset((train if isinstance(train, dict) else {}).keys()) | frozenset(
        text.split("=", 1)[0].strip().removeprefix("train.") for text in overrides if text.strip().startswith("train."))
    if recipe.data.name is None:
        recipe.data.name = recipe.run
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file (or a built-in recipe name) and apply overrides."""
    path = resolve_recipe_path(path)
    return build_recipe(read_yaml(path), overrides, source=str(path), stem=path.stem)


def recipes_dir() -> Path:
    """Folder of the built-in recipes: package data (llmstages/recipes/, shipped in the wheel), found through
    importlib.resources as an installed package finds it. `recipes/` in a source checkout links here."""
    return Path(str(resources.files("llmstages") / "recipes"))


def builtin_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"), key=lambda p: p.stem)


def resolve_recipe_path(name: str | Path) -> Path:
    """A recipe path as given, or the name of a built-in recipe (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    builtin = recipes_dir() / f"{path.stem}.yaml"
    if builtin.exists():
        return builtin  # a folder named like a built-in recipe (./shakespeare/ data) does not hide it
    if path.is_dir():
        raise UserError(f"{name}: is a folder, not a recipe file",
                        hint="give a .yaml file, or the name of a built-in recipe (`llmstages recipes`)")
    known = [p.stem for p in builtin_recipes()]
    hint = difflib.get_close_matches(path.stem, known, n=1)
    raise UserError(f"{name}: no such recipe file or built-in recipe",
                    hint=f"did you mean `{hint[0]}`?" if hint else "`llmstages recipes` lists the built-in ones")


def to_dict(obj: Any) -> Any:
    """A recipe (or section) as plain data, for recipe.yaml, meta.json and diffs."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


