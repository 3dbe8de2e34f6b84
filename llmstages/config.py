"""Recipes: YAML files loaded into typed, documented dataclasses.

A recipe is read with `yaml.safe_load` (YAML tags that build Python objects are refused), checked
against the dataclasses below, and changed by `KEY=VALUE` overrides on the command line. A value is
converted by the type its field declares, never by YAML's guessing: `train.lr=3e-4` is a float.
All problems of a recipe are collected and reported together, each with its dotted path, and an
unknown key gets a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmstages.errors import RecipeError, UserError
from llmstages.store import RUN_NAME_RE
from llmstages.recipe_parse import RecipeParser, read_yaml, recipe_diff  # noqa: F401 (re-exported)

TASKS = ("pretrain", "classify", "instruct")


def _f(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the checks `validate` applies to it (allowed values and bounds)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes a prepared dataset in the store."""

    # Files, folders or globs; http(s) URLs; or hf:ORG/NAME[:split]. One string or a list.
    source: list[str] = _f(factory=list)
    # Expected sha256 of each URL source, in the order of `source` ("" where unknown).
    sha256: list[str] = _f(factory=list)
    # Where each source sits inside the local mirror folder $LLMSTAGES_DATA, in the order of `source`
    # ("" = look up the URL's file name). A mirror file is used instead of downloading.
    mirror: list[str] = _f(factory=list)
    # Separate validation / test files; when empty the split is carved out of `source`.
    val_source: list[str] = _f(factory=list)
    test_source: list[str] = _f(factory=list)
    # Name of the prepared dataset in the store (default: the recipe's run name).
    name: str | None = None
    # File format; auto = by file extension.
    format: str = _f("auto", choices=("auto", "txt", "jsonl", "json", "csv", "tsv", "parquet"))
    # .txt: a line that separates documents inside one file (e.g. <|endoftext|>); "" = one document per file.
    delimiter: str = ""
    # .txt: keep only the text between Project Gutenberg's "*** START OF" and "*** END OF" markers.
    strip_gutenberg: bool = True
    # csv/tsv without a header row: names for its columns, in order (e.g. [label, text]).
    columns: list[str] = _f(factory=list)
    # csv/tsv quote handling: auto = off for .tsv (tab-separated corpora such as the SMS Spam Collection
    # use `"` as plain text, and quoting would swallow lines), standard CSV quoting for .csv.
    quoting: str = _f("auto", choices=("auto", "none", "csv"))
    # Field holding the text (pretraining and classification).
    text_field: str = "text"
    # Field holding the class label (classification).
    label_field: str = "label"
    # Class names in order; empty = the sorted set of labels found in the training data.
    labels: list[str] = _f(factory=list)
    # Instruction data fields (Alpaca style), or the chat-style messages field.
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    # auto = the init_from model's tokenizer when there is one, else train one; "train" = train a
    # byte-level BPE on the corpus; otherwise a tokenizer.json path (or a folder holding one).
    tokenizer: str = "auto"
    # Vocabulary size when training a tokenizer (includes <|endoftext|>).
    vocab_size: int = _f(8192, ge=260, le=1 << 20)
    # Train the tokenizer on at most about this many bytes of the train split, sampled with split_seed
    # (0 = all of it): BPE training time grows with the text while the merges settle after a few MB.
    tokenizer_sample_bytes: int = _f(8_000_000, ge=0)
    # Most tokens per pretraining shard file; a document may continue in the next shard.
    shard_tokens: int = _f(100_000_000, ge=1024)
    # Fractions of the documents / records held out for validation and test.
    val_fraction: float = _f(0.05, ge=0.0, le=0.5)
    test_fraction: float = _f(0.0, ge=0.0, le=0.5)
    # Seed of the deterministic train/val/test split.
    split_seed: int = 1234
    # Write the good records and list the bad ones in the manifest instead of failing.
    skip_bad: bool = False


@dataclass
class ModelConfig:
    """The GPT's shape. A named size fills the numbers not given explicitly."""

    # tiny | small (GPT-2 124M) | medium | large | xl | custom (give every number below).
    size: str = _f("tiny", choices=("tiny", "mini", "small", "medium", "large", "xl", "custom"))
    n_layer: int | None = _f(None, ge=1)
    n_head: int | None = _f(None, ge=1)
    n_embd: int | None = _f(None, ge=1)
    # Context length in tokens.
    block_size: int | None = _f(None, ge=2)
    # Vocabulary size; default: the tokenizer's.
    vocab_size: int | None = _f(None, ge=2)
    # Dropout on attention, residual and embeddings (0 for pretraining small data is rarely best).
    dropout: float = _f(0.0, ge=0.0, le=0.9)
    # Biases in linear layers and LayerNorms (GPT-2 has them).
    bias: bool = True


@dataclass
class TrainConfig:
    """The optimisation loop shared by every stage."""

    # Optimizer steps; see also `epochs`.
    max_steps: int = _f(1000, ge=1)
    # If > 0, the number of passes over the training set; sets max_steps from the data size.
    epochs: float = _f(0.0, ge=0.0)
    # Peak learning rate, after warmup.
    lr: float = _f(6e-4, gt=0.0, le=1.0)
    # Learning rate at the end of the cosine decay.
    min_lr: float = _f(6e-5, ge=0.0)
    # Linear warmup steps.
    warmup_steps: int = _f(100, ge=0)
    # AdamW settings; weight decay is not applied to biases, norms and embeddings.
    weight_decay: float = _f(0.1, ge=0.0)
    beta1: float = _f(0.9, ge=0.0, le=1.0)
    beta2: float = _f(0.95, ge=0.0, le=1.0)
    # Clip the global gradient norm to this (0 = off).
    grad_clip: float = _f(1.0, ge=0.0)
    # Sequences per forward/backward pass on one process.
    micro_batch_size: int = _f(16, ge=1)
    # Sequences per optimizer step over all processes (gradient accumulation makes up the rest).
    global_batch_size: int = _f(16, ge=1)
    # Evaluate every N steps on `eval_batches` validation batches (0 = only at the end).
    eval_every: int = _f(100, ge=0)
    eval_batches: int = _f(20, ge=1)
    # Commit a checkpoint every N steps (0 = only at the end); keep the last `keep_last` and the best.
    save_every: int = _f(500, ge=0)
    keep_last: int = _f(2, ge=1)
    # Log training figures every N steps.
    log_every: int = _f(10, ge=1)
    # Seed for initialisation, data order and dropout.
    seed: int = 1337
    # auto = bf16 where the hardware runs it fast (CUDA with bf16, CPUs with avx512_bf16/AMX), else fp32.
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    # torch.compile the model.
    compile: bool = False
    # auto = cuda if available, else cpu.
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    # Stop after this many evaluations without improvement of `best_metric` (0 = never).
    patience: int = _f(0, ge=0)
    # Metric that picks the best checkpoint: val_loss (lower is better), or accuracy / f1 (higher).
    best_metric: str = _f("val_loss", choices=("val_loss", "accuracy", "f1"))


LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # the linear layers of a transformer block (model.py)


@dataclass
class FinetuneConfig:
    """What fine-tuning changes and how it treats the labeled data."""

    # all | head | last_blocks:N (+ final norm and head) | lora.
    trainable: str = "all"
    # LoRA: rank, scaling alpha, dropout, and which linear layers get adapters.
    lora_rank: int = _f(8, ge=1)
    lora_alpha: float = _f(16.0, gt=0.0)
    lora_dropout: float = _f(0.0, ge=0.0, le=0.9)
    lora_targets: list[str] = _f(factory=lambda: list(LORA_TARGETS))
    # Classification: how to treat class imbalance in the training set.
    balance: str = _f("none", choices=("none", "undersample", "weighted"))
    # Instruction: prompt template, and whether prompt tokens are left out of the loss.
    template: str = _f("alpaca", choices=("alpaca", "chat"))
    mask_prompt: bool = True
    # Instruction: sample generations for fixed validation prompts printed at each eval.
    eval_samples: int = _f(2, ge=0)


@dataclass
class GenerateConfig:
    """Default sampling settings for generate / chat / sample generations."""

    max_new_tokens: int = _f(200, ge=1)
    # 0 = greedy.
    temperature: float = _f(0.8, ge=0.0)
    # Keep the k most likely tokens (0 = off).
    top_k: int = _f(0, ge=0)
    # Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).
    top_p: float = _f(1.0, gt=0.0, le=1.0)


@dataclass
class Recipe:
    """A whole recipe: one training run (or, for `prepare`, one dataset)."""

    # One line shown by `llmstages recipes`.
    description: str = ""
    # pretrain | classify | instruct.
    task: str = _f("pretrain", choices=TASKS)
    # Run name in the store (default: the recipe file's stem).
    run: str | None = None
    # Starting point: a run name, a checkpoint folder, or hf:DIR_OR_ID. Fine-tuning inherits its shape.
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# Names users bring from other tools, mapped to ours, so "did you mean" can point at the right key.
ALIASES = {
    "learning_rate": "train.lr", "learningrate": "train.lr", "max_lr": "train.lr",
    "min_learning_rate": "train.min_lr", "max_iters": "train.max_steps", "iters": "train.max_steps",
    "num_steps": "train.max_steps", "steps": "train.max_steps", "batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size", "gradient_accumulation_steps": "train.global_batch_size",
    "warmup_iters": "train.warmup_steps", "warmup": "train.warmup_steps", "eval_interval": "train.eval_every",
    "eval_iters": "train.eval_batches", "log_interval": "train.log_every", "checkpoint_every": "train.save_every",
    "clip": "train.grad_clip", "dtype": "train.precision", "num_epochs": "train.epochs",
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
    if ok("train.global_batch_size", "train.micro_batch_size") and t.global_batch_size % t.micro_batch_size:
        problems.append(("train.global_batch_size", f"{t.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={t.micro_batch_size}"))
    if ok("train.min_lr", "train.lr") and t.min_lr > t.lr:
        problems.append(("train.min_lr", f"{t.min_lr} is above train.lr={t.lr}"))
    if ok("model.n_embd", "model.n_head") and m.n_embd is not None and m.n_head is not None and m.n_embd % m.n_head:
        problems.append(("model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}"))
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
    for key, name in (("run", recipe.run), ("data.name", d.name)):  # each names a folder in the store
        if ok(key) and name is not None and not RUN_NAME_RE.fullmatch(name):
            problems.append((key, f"{name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"))
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
    if recipe.data.name is None:
        recipe.data.name = recipe.run
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe file (or a built-in recipe name) and apply overrides."""
    path = resolve_recipe_path(path)
    return build_recipe(read_yaml(path), overrides, source=str(path), stem=path.stem)


def recipes_dir() -> Path:
    """Folder of the built-in recipes (`recipes/` beside the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


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


