"""The recipe schema: one documented dataclass per recipe section, and the checks of each field.

Every field carries its comment (what it does, its unit, its default's reason) and, through `_f`, the
allowed values and bounds the parser (recipe_parse.py) checks. Loading, overrides, aliases and the
checks across fields are in config.py, which re-exports these classes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmstages.errors import UserError
from llmstages.modelconfig import LORA_TARGETS

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
    # .txt: a document longer than this many characters ends at the next line break and the rest
    # makes more documents (each followed by end-of-text), so reading a multi-GB file without
    # delimiters holds at most about this much of it. Far above any book (War and Peace: 3.2M).
    max_document_chars: int = _f(1 << 27, ge=1024)
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
    # Lowercase every text before it is tokenized. The tokenizer gets a Lowercase normalizer (a trained
    # one, or the model's with init_from), and the model keeps it: `classify`, `evaluate` and `generate`
    # lowercase their input too, and decoded text comes back lowercase. For classifiers whose classes do
    # not depend on letter case (SMS spam: shouted ham looked like spam to a base that read novels).
    lowercase: bool = False
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
    # hf:ORG/NAME sources (pretraining): read them with the `datasets` streaming mode, row by row,
    # instead of downloading and exporting the whole split first. Use with max_tokens on big corpora.
    streaming: bool = False
    # Characters of text tokenized at once, in one parallel batch: prepare's memory grows with it
    # (about 100 bytes per token in flight), not with the corpus. Does not change the output.
    batch_chars: int = _f(1 << 22, ge=1024)
    # Pretraining: stop after this many tokens in all (every split together; 0 = the whole corpus).
    # The document that crosses the budget is cut there.
    max_tokens: int = _f(0, ge=0)


@dataclass
class ModelConfig:
    """The GPT's shape. A named size fills the numbers not given explicitly."""

    # tiny (2 layers x 64, for tests) | mini (4 x 256, a CPU-sized model) | small (GPT-2 124M) | medium |
    # large | xl | custom (give every number below).
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
    # Named block choices: gpt2 (GPT-2 exactly) | modern (rotary positions, RMSNorm, ReLU² MLP,
    # QK-norm, no biases, untied head, logit soft-cap 15: nanochat's combination). The fields below
    # left empty take the preset's value; a value given here wins.
    arch: str = _f("gpt2", choices=("gpt2", "modern"))
    # Biases in linear layers and LayerNorms (gpt2: on; modern: off).
    bias: bool | None = None
    # Position encoding: learned (GPT-2's table) | rope (rotary; no position weights).
    pos_emb: str | None = _f(None, choices=("learned", "rope"))
    # Rotary base frequency.
    rope_theta: float = _f(10000.0, gt=0.0)
    # Block norm: layernorm | rmsnorm.
    norm: str | None = _f(None, choices=("layernorm", "rmsnorm"))
    # MLP: gelu | relu2 (ReLU squared) | swiglu.
    mlp: str | None = _f(None, choices=("gelu", "relu2", "swiglu"))
    # MLP hidden width; 0 = 4 * n_embd (gelu, relu2) or 8/3 * n_embd rounded up to 64 (swiglu).
    mlp_hidden: int = _f(0, ge=0)
    # Key/value heads for grouped-query attention; 0 = n_head (plain multi-head attention).
    n_kv_head: int = _f(0, ge=0)
    # RMSNorm on each head's queries and keys.
    qk_norm: bool | None = None
    # Share the output head's weights with the token embedding.
    tie_embeddings: bool | None = None
    # Soft-cap the logits at this magnitude, cap * tanh(logits / cap) (0 = off).
    logit_softcap: float | None = _f(None, ge=0.0)


# Optimizer settings a run with a starting point (init_from) takes from that checkpoint when its
# recipe leaves them unset (nanochat's "None = inherit"); without a recorded value the default stays.
INHERITED = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


@dataclass
class TrainConfig:
    """The optimisation loop shared by every stage."""

    # The train.* keys the recipe or an override sets (filled by build_recipe; not a recipe key).
    given: ClassVar[frozenset[str]] = frozenset()

    # Optimizer steps; see also `epochs` and `max_time`.
    max_steps: int = _f(1000, ge=1)
    # A training-time budget instead of a step count, e.g. 90s, 10m, 1h30m ("" = off; then max_steps
    # and epochs are not used). The steps that fit are estimated from the measured step time and the
    # schedule decays against that estimate, so the run ends at min_lr when the budget is spent.
    # Evaluation and checkpoint time do not count against it (llmstages/budget.py).
    max_time: str = ""
    # If > 0, the number of passes over the training set; sets max_steps from the data size.
    epochs: float = _f(0.0, ge=0.0)
    # Peak learning rate, after warmup. With init_from, the INHERITED settings left unset come from that checkpoint.
    lr: float = _f(6e-4, gt=0.0, le=1.0)
    # Learning rate at the end of the schedule (the floor; the Muon lr ends at muon_lr * min_lr / lr).
    min_lr: float = _f(6e-5, ge=0.0)
    # Linear warmup steps.
    warmup_steps: int = _f(100, ge=0)
    # cosine: warmup, then cosine decay to min_lr | wsd: warmup, constant lr, then a linear decay to
    # min_lr over the final decay_frac of the steps (warmup-stable-decay).
    schedule: str = _f("cosine", choices=("cosine", "wsd"))
    decay_frac: float = _f(0.2, gt=0.0, le=1.0)
    # adamw: AdamW for everything | muon: Muon for the 2-D weight matrices of the blocks, AdamW (lr,
    # weight_decay, betas below) for embeddings, heads, norms, biases and LoRA adapters.
    optimizer: str = _f("adamw", choices=("adamw", "muon"))
    # Muon's peak learning rate, momentum (Nesterov) and decoupled weight decay.
    muon_lr: float = _f(0.02, gt=0.0, le=1.0)
    muon_momentum: float = _f(0.95, ge=0.0, le=1.0)
    muon_weight_decay: float = _f(0.0, ge=0.0)
    # AdamW settings; weight decay is not applied to biases, norms and embeddings.
    weight_decay: float = _f(0.1, ge=0.0)
    beta1: float = _f(0.9, ge=0.0, le=1.0)
    beta2: float = _f(0.95, ge=0.0, le=1.0)
    # Clip the global gradient norm to this (0 = off).
    grad_clip: float = _f(1.0, ge=0.0)
    # A loss spike: a step loss above spike_threshold x the median of the last spike_window step losses
    # (checked once spike_min_steps losses are in the window). warn: log it | skip: drop that step's
    # update | rollback: go back to the last checkpoint and skip that step's micro-batches. skip and
    # rollback stop the run after spike_max spikes in a row. A classifier's step loss is a spike only
    # when it is also above ln(classes), the loss of a uniform guess.
    spike: str = _f("warn", choices=("warn", "skip", "rollback"))
    spike_threshold: float = _f(3.0, gt=1.0)
    spike_window: int = _f(50, ge=1)
    spike_min_steps: int = _f(2, ge=1)
    spike_max: int = _f(5, ge=1)
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
    # Experiment loggers that get every log.jsonl record too: tensorboard (runs/<run>/tensorboard/),
    # wandb. Each is imported only when named here; pip install tensorboard / wandb.
    loggers: list[str] = _f(factory=list, choices=("tensorboard", "wandb"))
    # Seed for initialisation, data order and dropout.
    seed: int = 1337
    # auto = bf16 where the hardware runs it fast (CUDA with bf16, CPUs with avx512_bf16/AMX), else fp32.
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    # torch.compile the model.
    compile: bool = False
    # auto = cuda if available, else cpu.
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    # Under torchrun. ddp: every process holds the whole model, its gradients and optimizer state
    # (DistributedDataParallel) | fsdp: each of N processes holds 1/N of them (PyTorch FSDP2, one unit
    # per block) and gathers a block's weights only while it computes it; its checkpoints hold the
    # optimizer state sharded (torch.distributed.checkpoint). llmstages/fsdp.py.
    strategy: str = _f("ddp", choices=("ddp", "fsdp"))
    # Keep only each block's input in the forward pass and recompute the block in the backward pass:
    # activation memory of about one block instead of all of them, for ~1/3 more compute.
    activation_checkpointing: bool = False
    # Stop after this many evaluations without improvement of `best_metric` (0 = never).
    patience: int = _f(0, ge=0)
    # Metric that picks the best checkpoint: val_loss (lower is better), or accuracy / f1 (higher).
    # none: no checkpoint is marked best (validation is still run and logged); the run's name then
    # means its last checkpoint, and a classifier's test split scores that one.
    best_metric: str = _f("val_loss", choices=("val_loss", "accuracy", "f1", "none"))

    def inherit(self, parent: dict | None) -> dict:
        """Take the INHERITED settings this recipe leaves unset from `parent` (the train settings a
        checkpoint's meta.json records); returns what was taken. A parent without them changes nothing."""
        taken = {key: parent[key] for key in INHERITED if key not in self.given and key in (parent or {})}
        for key, value in taken.items():
            setattr(self, key, value)
        if self.min_lr > self.lr:
            raise UserError(f"train.min_lr={self.min_lr} is above train.lr={self.lr} (one of them taken from "
                            "the init_from checkpoint)", hint="set both train.lr and train.min_lr in the recipe")
        return taken

    def batch_problem(self, world_size: int = 1) -> str | None:
        """Why `global_batch_size` cannot be made of whole micro-batches on `world_size` processes (None: it can)."""
        if self.global_batch_size % (self.micro_batch_size * world_size):
            processes = f" x {world_size} processes" if world_size > 1 else ""
            return (f"{self.global_batch_size} is not a multiple of train.micro_batch_size="
                    f"{self.micro_batch_size}{processes}")
        return None

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each process: global = micro x accumulation x world size."""
        if problem := self.batch_problem(world_size):
            raise UserError(f"train.global_batch_size={problem}",
                            hint="make it a multiple, or change the number of processes")
        return self.global_batch_size // (self.micro_batch_size * world_size)

    @property
    def budget_seconds(self) -> float | None:
        """train.max_time in seconds (None: the run is counted in steps)."""
        return parse_duration(self.max_time) if self.max_time else None

    def total_steps(self, examples_per_epoch: int | None) -> int:
        """Optimizer steps of the run: `max_steps`, or `epochs` passes over `examples_per_epoch` examples."""
        if self.epochs > 0:
            if not examples_per_epoch:
                raise UserError("train.epochs is set but this task has no fixed epoch size",
                                hint="use train.max_steps instead")
            return max(1, math.ceil(self.epochs * examples_per_epoch / self.global_batch_size))
        return self.max_steps


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """`90s`, `10m`, `2.5m`, `1h30m`, or a bare number of seconds -> seconds (> 0); ValueError otherwise."""
    compact = text.strip().lower().replace(" ", "")
    try:
        seconds = float(compact)  # a bare number: seconds
    except ValueError:
        parts = _DURATION_PART.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise ValueError(f"{text!r} is not a duration; write it as e.g. 90s, 10m, 2.5m or 1h30m") from None
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r}: a time budget must be more than 0 seconds")
    return seconds


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
    # The dtype of the weights this run does not train (frozen by `trainable`): bf16 halves their memory
    # (a 1B base held in 2 GB instead of 4), trained weights and optimizer states stay fp32. Only the
    # matrices and embeddings are cast (norm gains and biases are small and stay fp32). Needs bf16 compute:
    # train.precision=bf16 (or auto where it resolves to bf16).
    frozen_dtype: str = _f("fp32", choices=("fp32", "bf16"))
    # Classification: how to treat class imbalance in the training set.
    balance: str = _f("none", choices=("none", "undersample", "weighted"))
    # Classification: what the class head reads: the last real token's hidden state, or the mean over
    # the text's real tokens (padding left out).
    pooling: str = _f("last", choices=("last", "mean"))
    # Classification: cross-entropy against (1 - e) * one-hot + e / K (0 = plain targets).
    label_smoothing: float = _f(0.0, ge=0.0, le=0.5)
    # Classification: adversarial training (the fast gradient method): each step also trains on its
    # batch with every text's token embeddings moved by this L2 distance in the direction that raises
    # the loss most, and takes the mean of both losses (0 = off; about twice the compute per step).
    adversarial_eps: float = _f(0.0, ge=0.0)
    # Classification: domain-adaptive pretraining first: this many next-token steps on the training
    # split's texts (run `<run>-dapt`, resumed like any run), then the class head is trained on that
    # model. dapt_lr 0 = train.lr.
    dapt_steps: int = _f(0, ge=0)
    dapt_lr: float = _f(0.0, ge=0.0, le=1.0)
    # Classification: after training, average the weights of the last N checkpoints (needs
    # train.keep_last >= N) into run `<run>-avg`, which is then the model scored on the test split (0 = off).
    average_last: int = _f(0, ge=0)
    # Classification: a weight soup (Wortsman et al. 2022, "Model soups"). Fine-tune N times, the runs
    # alike but for train.seed (seed, seed + 1, ...; runs `<run>-member1` ... `<run>-memberN`), then
    # average the weights of their final models (each one's best checkpoint where train.best_metric marks
    # one, else its last) into run `<run>`, the model scored on the test split and that `classify` uses.
    # N times the fine-tuning; the inference of one model. 1 = off.
    soup: int = _f(1, ge=1)
    # Classification: an ensemble. Fine-tune N times as for a soup (runs `<run>-member1` ...), then keep
    # all N models in one checkpoint of run `<run>`: its probability of a class is the median of the
    # members' (renormalised), so with two classes and an odd N a threshold on it is their majority vote
    # (ensemble.py). N times the fine-tuning and N times the inference; at most 64 members. 1 = off.
    ensemble: int = _f(1, ge=1, le=64)  # 64: ckptmeta.MAX_MEMBERS, what a checkpoint may say
    # Instruction: prompt template (alpaca | chat | hf), and whether prompt tokens are left out of the loss.
    # hf = the model's own chat_template (tokenizer_config.json); its end-of-turn token ends each response.
    template: str = _f("alpaca", choices=("alpaca", "chat", "hf"))
    mask_prompt: bool = True
    # Pack several examples into each row of up to block_size tokens (each attends only to itself,
    # positions restart per example; the loss is the same) instead of padding one per row: less
    # padding computed. Instruction: more examples per step; train.epochs then counts rows.
    # Classification: the same texts per step in fewer rows (last-token pooling; data/packing.py).
    packing: bool = False
    # Instruction: sample generations for fixed validation prompts printed at each eval.
    eval_samples: int = _f(2, ge=0)

    @property
    def members(self) -> int:
        """How many fine-tunings the recipe combines (soup or ensemble; 1 = an ordinary run)."""
        return max(self.soup, self.ensemble)

    @property
    def combination(self) -> str | None:
        """How the members are combined: "ensemble", "soup", or None for an ordinary run."""
        return "ensemble" if self.ensemble > 1 else "soup" if self.soup > 1 else None


@dataclass
class ClassifyConfig:
    """How a classifier turns probabilities into labels (`classify`, `evaluate`, recorded in its checkpoints)."""

    # Label a text `positive` when that class's probability is >= threshold, else the most likely other
    # class (0 = always the most likely class). A spam filter trades missed spam against lost ham here.
    threshold: float = _f(0.0, ge=0.0, le=1.0)
    # The class the threshold is for ("" = the last class, e.g. spam of [ham, spam]).
    positive: str = ""


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
    # Strings that end a reply: it stops before the first one generated (e.g. ["\n\n", "###"]).
    stop: list[str] = _f(factory=list)
    # CTRL's repetition penalty (Keskar et al. 2019): the logits of tokens already in the context are
    # divided by it where positive, multiplied where negative (1 = off; above 1 repeats less).
    repetition_penalty: float = _f(1.0, gt=0.0, le=10.0)
    # End-of-text and stop strings are ignored until this many tokens are generated (0 = off).
    min_new_tokens: int = _f(0, ge=0)


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
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
