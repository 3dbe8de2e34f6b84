"""Classification fine-tuning (`llmstages finetune` with `task: classify`), `classify` and classifier evaluation.

Read top to bottom:
  classification_task   the base model with its LM head replaced by a K-way class head, and the
                        TrainTask the shared loop runs: padded batches, cross-entropy (optionally
                        class-weighted or on undersampled epochs), validation figures.
  report_test_split     after training: the best checkpoint's figures on the test split, printed,
                        written to the run's test_metrics.json and appended to its log.jsonl.
  evaluate_classifier   `llmstages evaluate MODEL --data FILE` for a classifier.
  classify_texts        `llmstages classify MODEL TEXT...`.
The batching, loss and metrics themselves are in llmstages/classification.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmstages.averaging import commit_average
from llmstages.checkpoint import Checkpoint, load_checkpoint
from llmstages.classification import (ClassBatches, class_probabilities, class_weights, classification_loss,
                                      classification_metrics, count_truncated, positive_index, predict,
                                      step_flops_factor)
from llmstages.config import Recipe
from llmstages.data.examples import data_settings, read_examples
from llmstages.data.prepared import LabeledSplit, PreparedDataset
from llmstages.errors import UserError, listed
from llmstages.interop.load import assign_weights
from llmstages.jsonio import dumps
from llmstages.loop import TrainResult, TrainTask
from llmstages.model import GPT, GPTConfig
from llmstages.runlog import RunLog
from llmstages.store import Store

EVAL_BATCH = 64


# ---------------------------------------------------------------------------------------------------
# the model and the task
# ---------------------------------------------------------------------------------------------------
def classifier_from(base: GPT, labels: list[str], seed: int, pooling: str = "last") -> GPT:
    """`base` with its LM head replaced by a `len(labels)`-way class head.

    The classifier is built on the `meta` device and takes over the base's tensors (assign, no copy),
    so a 1B base is never held twice; the base must not be used afterwards (the fine-tune trains
    these very tensors). Weights are fp32, as a fresh model's would be. The LM head (tied to the
    token embedding, which is kept) is dropped. The new head `score` (K, C) gets GPT-2's small init,
    N(0, 0.02), seeded by `seed`. A base that is already a classifier of exactly these classes keeps
    its head (fine-tuning it further). LoRA adapters of the base must have none (`finetune` merges
    them first).
    """
    config = GPTConfig.from_dict(dict(base.config.to_dict(), num_classes=len(labels), class_names=list(labels),
                                      pooling=pooling))
    with torch.device("meta"):
        model = GPT(config)
    keep_head = base.is_classifier and base.config.class_names == list(labels)
    state = {k: v for k, v in base.state_for_saving().items()
             if not k.startswith("lm_head.") and (keep_head or not k.startswith("score."))}
    if "score.weight" not in state:
        generator = torch.Generator().manual_seed(seed)
        state["score.weight"] = torch.randn(len(labels), config.n_embd, generator=generator).mul_(0.02).to(
            base.transformer.wte.weight.device)
    # the one place outside weights enter a model: shapes, finiteness and completeness checked there
    return assign_weights(model, iter(state.items()), torch.float32, "the base model as a classifier")


def classification_task(base: Checkpoint, data: PreparedDataset, recipe: Recipe, *,
                        console: Console | None = None) -> tuple[GPT, TrainTask]:
    """The classifier built from `base` and the TrainTask that fine-tunes it on `data` as `recipe` says."""
    console = console or Console(stderr=True)
    labels = list(data.manifest["labels"])
    train = data.records("train")
    counts = np.bincount(train.labels, minlength=len(labels))
    if (counts > 0).sum() < 2:
        raise UserError(f"the training split of {data.path.name} has only one class "
                        f"({labels[int(counts.argmax())]}); classification needs at least two")
    ft = recipe.finetune
    model = classifier_from(base.model, labels, recipe.train.seed, ft.pooling)
    block = model.config.block_size
    pad_id = int(data.manifest["eot_id"])
    balance = recipe.finetune.balance
    batches = ClassBatches(train, recipe.train.micro_batch_size, block, pad_id, recipe.train.seed,
                           undersample=balance == "undersample", pack=ft.packing)
    weight = class_weights(counts) if balance == "weighted" else None
    val = data.records("val") if "val" in data.splits else None
    val = val if val is not None and len(val) else None  # an empty val split (all skipped) is no val split

    truncated = {name: count_truncated(np.diff(data.records(name).offsets), block) for name in data.splits}
    _describe(console, labels, counts, truncated, block, weight, batches, has_val=val is not None)

    decision = decision_of(recipe, labels)

    def evaluate(m: GPT) -> dict:
        return split_metrics(m, val, labels, pad_id, **decision) if val is not None else {}

    task = TrainTask(kind="classify", batch=batches,
                     loss=lambda m, b: classification_loss(m, b, weight, ft.label_smoothing, ft.adversarial_eps),
                     evaluate=evaluate, data_fingerprint=data.fingerprint, examples_per_epoch=batches.epoch_size,
                     meta={"labels": labels, "balance": balance, "truncated": truncated, "classify": decision},
                     spike_floor=math.log(len(labels)), flops_factor=step_flops_factor(ft.adversarial_eps))
    return model, task


def decision_of(recipe: Recipe, labels: list[str]) -> dict:
    """The recipe's classify section, checked against the labels: {"threshold", "positive"} (kept in
    every checkpoint's meta.json, so `classify` and `evaluate` decide as the recipe said)."""
    positive = recipe.classify.positive
    positive_index(labels, positive)  # refuses a class the data does not have
    return {"threshold": recipe.classify.threshold, "positive": positive}


def _describe(console: Console, labels: list[str], counts: np.ndarray, truncated: dict[str, int], block: int,
              weight: torch.Tensor | None, batches: ClassBatches, *, has_val: bool) -> None:
    """Say once, before training, what the data holds and how it is treated."""
    if any(truncated.values()):
        console.print(f"[yellow]note:[/yellow] texts longer than the model's context ({block} tokens) are cut to "
                      f"their first {block} tokens: " + ", ".join(f"{n:,} in {s}" for s, n in truncated.items() if n),
                      highlight=False)
    if not has_val:
        console.print("[yellow]note:[/yellow] no validation split: nothing to pick the best checkpoint by "
                      "(set data.val_fraction or data.val_source)", highlight=False)
    line = "classes (train): " + ", ".join(f"{label} {n:,}" for label, n in zip(labels, counts))
    if weight is not None:
        line += "; loss weights " + ", ".join(f"{label} {w:.3g}" for label, w in zip(labels, weight.tolist()))
    elif batches.undersample:
        line += f"; each epoch a fresh balanced draw of {batches.epoch_size:,} texts"
    console.print(line, highlight=False)


def split_metrics(model: GPT, split: LabeledSplit, labels: list[str], pad_id: int, prefix: str = "val_", *,
                  threshold: float = 0.0, positive: str = "") -> dict:
    """Figures of `model` on every record of a prepared split: `<prefix>loss` (plain, unweighted
    cross-entropy), accuracy, f1 (macro), per_class, confusion (labels decided at `threshold`) and roc_auc."""
    probs = class_probabilities(model, [split.example(i) for i in range(len(split))], pad_id, batch_size=EVAL_BATCH)
    metrics = classification_metrics(split.labels, probs, labels, threshold=threshold, positive=positive)
    metrics[f"{prefix}loss"] = metrics.pop("loss")
    if prefix:  # validation figures at every eval: the decision settings are the run's, not a figure
        del metrics["threshold"], metrics["positive"]
    return metrics


# ---------------------------------------------------------------------------------------------------
# after training: the test split
# ---------------------------------------------------------------------------------------------------
def report_test_split(result: TrainResult, data: PreparedDataset, store: Store, *,
                      console: Console | None = None, path: Path | None = None) -> dict | None:
    """The best checkpoint's (or `path`'s) figures on the test split (None when the data has no test split).

    Written to `runs/<run>/test_metrics.json`, appended to its log.jsonl as `test_*` figures at the
    last step, and printed.
    """
    if "test" not in data.splits:
        return None
    console = console or Console(stderr=True)
    path = path or store.best(result.run) or result.checkpoint
    ckpt = load_checkpoint(path, store, ensemble_ok=True)
    split = data.records("test")
    labels = ckpt.model.config.class_names
    metrics = split_metrics(ckpt.model, split, labels, ckpt.tokenizer.eot_id, prefix="", **saved_decision(ckpt))
    report = {"split": "test", "checkpoint": str(path), "step": ckpt.meta.get("step"), "examples": len(split),
              "labels": labels, **metrics}
    run_dir = store.run_dir(result.run)
    (run_dir / "test_metrics.json").write_text(dumps(report, indent=2) + "\n")
    RunLog(run_dir).write({"step": result.step, "checkpoint_step": report["step"],
                           **{f"test_{k}": v for k, v in metrics.items()}})
    print_metrics(console, f"test split ({len(split):,} texts), checkpoint {Path(path).name}", report)
    return report


def average_last(result: TrainResult, recipe: Recipe, store: Store, *, console: Console | None = None) -> Path:
    """`finetune.average_last=N`: the mean of the weights of the run's last N checkpoints, committed as
    run `<run>-avg` (replaced on every call) at the last step; returns its folder."""
    paths = store.checkpoints(result.run)[-recipe.finetune.average_last:]
    path = commit_average(store, f"{result.run}-avg", paths, {"averaged": [str(p) for p in paths]})
    if console is not None:
        console.print(f"averaged the weights of {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) "
                      f"into {path}", highlight=False)
    return path


def print_metrics(console: Console, title: str, metrics: dict) -> None:
    """A headline (accuracy, macro F1, loss), a per-class table and the confusion matrix."""
    line = f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1']:.4f}, loss {metrics['loss']:.4f}"
    if metrics.get("roc_auc") is not None:
        line += f", ROC AUC ({escape(metrics['positive'])}) {metrics['roc_auc']:.4f}"
    if metrics.get("threshold"):
        line += f", threshold {metrics['threshold']:g} for {escape(metrics['positive'])}"
    console.print(f"[bold]{escape(title)}[/bold]: {line}", highlight=False)
    table = Table()
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, row in metrics["per_class"].items():
        table.add_row(escape(label), f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      f"{row['support']:,}")
    console.print(table)
    labels = metrics["labels"]
    confusion = Table()
    confusion.add_column("true \\ predicted")
    for label in labels:
        confusion.add_column(escape(label), justify="right")
    for label, row in zip(labels, metrics["confusion"]):
        confusion.add_row(escape(label), *(f"{n:,}" for n in row))
    console.print(confusion)


# ---------------------------------------------------------------------------------------------------
# evaluate / classify a trained classifier
# ---------------------------------------------------------------------------------------------------
def require_classifier(ckpt: Checkpoint, command: str) -> None:
    if not ckpt.model.is_classifier:
        raise UserError(f"{ckpt.ref} is a language model, not a classifier: `{command}` needs a model fine-tuned "
                        "with a class head",
                        hint="fine-tune one with `llmstages finetune --task spam` (or a task: classify recipe); "
                             "use `llmstages generate` for language models")


def saved_decision(ckpt: Checkpoint, threshold: float | None = None) -> dict:
    """{"threshold", "positive"}: the ones the checkpoint was trained with (none: argmax), `threshold` winning."""
    saved = dict(ckpt.meta.get("classify") or {})
    decision = {"threshold": float(saved.get("threshold", 0.0)), "positive": str(saved.get("positive", ""))}
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"--threshold {threshold}: a probability is between 0 and 1",
                            hint="e.g. --threshold 0.7 labels spam only at 70% or more (0 = the most likely class)")
        decision["threshold"] = threshold
    return decision


def evaluate_classifier(ckpt: Checkpoint, paths: list[str], *, limit: int | None = None,
                        console: Console | None = None, batch_size: int = EVAL_BATCH,
                        threshold: float | None = None) -> dict:
    """Accuracy, macro F1, per-class precision / recall / F1 / support, confusion, loss, ROC AUC and the
    count of examples of a classifier on labeled files, read with the settings it was trained with.
    Labels are decided at `threshold` (None: the one the checkpoint records)."""
    require_classifier(ckpt, "evaluate")
    labels = list(ckpt.model.config.class_names)
    examples = read_examples(paths, "classify", data_settings(ckpt.meta), limit=limit)
    unknown = [e for e in examples if e.label not in labels]
    if unknown:
        shown = listed([f"{e.where}: label {e.label!r} is not one of the model's classes" for e in unknown])
        raise UserError(f"{len(unknown)} record{'s' if len(unknown) > 1 else ''} with a label the model does not "
                        f"know ({', '.join(labels)}):\n{shown}",
                        hint="evaluate on data with the model's classes (data.label_field of the training recipe)")
    tok = ckpt.tokenizer
    sequences = tok.encode_batch([e.text for e in examples])
    block = ckpt.model.config.block_size
    truncated = count_truncated(np.array([len(s) for s in sequences]), block)
    if truncated and console is not None:
        console.print(f"[yellow]note:[/yellow] {truncated:,} texts longer than {block} tokens were cut to their "
                      f"first {block}", highlight=False)
    probs = class_probabilities(ckpt.model, sequences, tok.eot_id, batch_size=batch_size)
    targets = np.array([labels.index(e.label) for e in examples], dtype=np.int64)
    metrics = classification_metrics(targets, probs, labels, **saved_decision(ckpt, threshold))
    return {**metrics, "labels": labels, "examples": len(examples), "truncated": truncated}


def classify_texts(ckpt: Checkpoint, texts: list[str], *, batch_size: int = 32,
                   threshold: float | None = None) -> list[dict]:
    """One {"text", "label", "probability", "probabilities"} per text (empty texts are refused)."""
    require_classifier(ckpt, "classify")
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UserError(f"text {empty[0]} of {len(texts)} is empty: there is nothing to classify",
                        hint="give non-empty texts (from stdin, blank lines are skipped)")
    return predict(ckpt.model, ckpt.tokenizer, texts, batch_size=batch_size, **saved_decision(ckpt, threshold))
