"""Classification with a GPT: padded batches, the loss, predictions and the figures that judge them.

The model's class head reads the hidden state of each text's last real token (`last_index`), so a
batch pads every text on the right to the longest one in it and the padding never changes a
prediction: causal attention keeps real tokens from seeing the padding after them. Texts longer than
the model's context keep their first `block_size` tokens.

Shapes: B texts in a batch, T the longest of them in tokens, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmstages.data.batches import EpochSampler, pad_batch
from llmstages.data.packing import pack_texts
from llmstages.data.prepared import LabeledSplit
from llmstages.errors import UserError
from llmstages.tokenizer import Tokenizer


def count_truncated(lengths: np.ndarray, block_size: int) -> int:
    return int((lengths > block_size).sum())


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Loss weights inverse to class frequency, n / (K * n_c) (scikit-learn's "balanced"): every class
    contributes as much to the loss as the others. A class with no training example gets weight 0."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


class ClassBatches:
    """`batches(index)` -> padded micro-batch number `index` of the training stream, with `targets`.

    The order is data/batches.py's EpochSampler over the training records; with `undersample`, each
    epoch is a fresh balanced subset: every class present cut down to the size of the smallest one.
    """

    def __init__(self, split: LabeledSplit, batch_size: int, block_size: int, pad_id: int, seed: int,
                 *, undersample: bool = False, pack: bool = False):
        self.split, self.block_size, self.pad_id, self.undersample = split, block_size, pad_id, undersample
        self.collate = pack_texts if pack else pad_batch  # packed: the same texts in fewer rows
        by_class = [np.flatnonzero(split.labels == c) for c in np.unique(split.labels)]
        self.sampler = EpochSampler(len(split), batch_size, seed, groups=by_class if undersample else None)
        self.epoch_size = self.sampler.epoch_size

    def records(self, index: int) -> np.ndarray:
        """The record indices of micro-batch `index`."""
        return self.sampler.indices(index)

    def __call__(self, index: int) -> dict:
        rows = self.records(index)
        batch = self.collate([self.split.example(int(i)) for i in rows], self.pad_id, self.block_size)
        batch["targets"] = torch.from_numpy(self.split.labels[rows])
        return batch


def classification_loss(model: nn.Module, batch: dict, weight: torch.Tensor | None = None,
                        label_smoothing: float = 0.0, adversarial_eps: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of one batch: logits (B, K) read by the model's pooling vs targets (B,),
    optionally against smoothed targets (1 - e) * one-hot + e / K.

    With `adversarial_eps` > 0, while gradients are on (training): the mean of that loss and the loss
    of the same batch with each text's token embeddings moved by a step of L2 length eps, along the
    gradient of the first loss, the direction that raises it fastest (the fast gradient method of
    Miyato et al., 2017, "Adversarial training methods for semi-supervised text classification").
    The classifier learns to keep its answer in a ball around each training text instead of
    memorising the exact tokens. It costs about one more forward and backward per step.
    """
    if weight is not None:
        weight = weight.to(batch["targets"].device)

    packed = {k: batch[k] for k in ("positions", "segments", "last_row") if k in batch}  # data/packing.pack_texts

    def loss_of_forward(offset: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if offset is None else {"embedding_offset": offset}  # without a push: the plain call
        logits = model(batch["input_ids"], last_index=batch["last_index"], **packed, **extra)  # (B, K)
        return F.cross_entropy(logits.float(), batch["targets"], weight=weight, label_smoothing=label_smoothing)

    if adversarial_eps <= 0 or not torch.is_grad_enabled():
        return loss_of_forward()
    # A zero offset on the token embeddings, as a model input: its gradient is the loss's gradient at
    # the embeddings, whether they are trained or frozen, and under DDP, FSDP and torch.compile alike.
    n_embd = getattr(model, "module", model).config.n_embd  # DDP wraps the GPT as .module
    zero = torch.zeros(*batch["input_ids"].shape, n_embd, device=batch["input_ids"].device, requires_grad=True)
    clean = loss_of_forward(zero)
    (grad,) = torch.autograd.grad(clean, zero, retain_graph=True)  # (B, T, C); 0 at the padding
    pushed = loss_of_forward(adversarial_step(grad, adversarial_eps, batch.get("segments")))
    return (clean + pushed) / 2


def step_flops_factor(adversarial_eps: float) -> float:
    """Model FLOPs of a training step of `classification_loss` over a plain step's (6 per weight and
    token). With the push: the clean forward (2), the gradient at the offset, activations only (2), the
    pushed forward (2) and the backward of both with weight gradients (8): 14 / 6."""
    return 14 / 6 if adversarial_eps > 0 else 1.0


def adversarial_step(grad: torch.Tensor, eps: float, segments: torch.Tensor | None = None) -> torch.Tensor:
    """grad (B, T, C) -> the same direction scaled to L2 length eps over each row's (T, C); packed rows
    (`segments` (B, T), data/packing.py) over each text's positions instead, so every text gets the
    push it gets alone in a padded row. Padding has no gradient and gets no push."""
    grad = grad.detach().float()
    if segments is None:
        length = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
        return eps * grad / length[:, None, None]
    rows, width = segments.shape
    text = torch.arange(rows, device=grad.device)[:, None] * width + segments.clamp_min(0)  # (B, T): which text
    squares = torch.zeros(rows * width, device=grad.device).index_add_(0, text.flatten(),
                                                                     grad.pow(2).sum(-1).flatten())
    length = squares.sqrt().clamp_min(1e-12)[text]  # (B, T): the L2 length of each position's text
    return grad * (eps * (segments >= 0) / length)[..., None]


@torch.no_grad()
def class_probabilities(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, *,
                        batch_size: int = 32) -> torch.Tensor:
    """Softmax over classes for every token list: (N, K) on the CPU, in the order given.

    Texts are batched by length (less padding, same results) and put back in order afterwards.
    """
    device = next(model.parameters()).device
    block_size = model.config.block_size
    order = np.argsort([len(s) for s in sequences], kind="stable")
    probs = torch.empty(len(sequences), model.config.num_classes)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad_batch([sequences[i] for i in rows], pad_id, block_size)
            logits = model(batch["input_ids"].to(device), last_index=batch["last_index"].to(device))  # (b, K)
            probs[torch.from_numpy(rows)] = logits.float().softmax(dim=-1).cpu()
    finally:
        model.train(was_training)
    return probs


def decide(probs: torch.Tensor, positive: int, threshold: float = 0.0) -> torch.Tensor:
    """Predicted class ids (N,) from probs (N, K): class `positive` where its probability is >= threshold,
    else the most likely of the other classes. threshold 0 = plain argmax."""
    if threshold <= 0:
        return probs.argmax(dim=-1)
    others = probs.clone()
    others[:, positive] = -1.0
    return torch.where(probs[:, positive] >= threshold, positive, others.argmax(dim=-1))


def positive_index(labels: Sequence[str], positive: str = "") -> int:
    """The class a threshold is for: `positive` by name, or the last class ("spam" of [ham, spam])."""
    if not positive:
        return len(labels) - 1
    if positive not in labels:
        raise UserError(f"classify.positive={positive!r} is not one of the model's classes ({', '.join(labels)})")
    return list(labels).index(positive)


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank formula (Mann-Whitney U), ties counted half:
    (sum of the positives' ranks - P(P+1)/2) / (P * N). nan when either class is absent."""
    scores, is_positive = np.asarray(scores, dtype=np.float64), np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based start of each tied group
    ranks = (first + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predict(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 32,
            threshold: float = 0.0, positive: str = "") -> list[dict]:
    """One {"text", "label", "probability", "probabilities"} per text: the class `decide` picks (the most
    likely one without a threshold), its probability and all of them."""
    probs = class_probabilities(model, tokenizer.encode_batch(list(texts)), tokenizer.eot_id, batch_size=batch_size)
    names = model.config.class_names
    picked = decide(probs, positive_index(names, positive), threshold).tolist()
    return [{"text": text, "label": names[c], "probability": row[c], "probabilities": dict(zip(names, row))}
            for text, c, row in zip(texts, picked, probs.tolist())]


def classification_metrics(targets: np.ndarray, probs: torch.Tensor, labels: Sequence[str], *,
                           threshold: float = 0.0, positive: str = "") -> dict:
    """Loss, accuracy, macro F1, per-class precision / recall / F1 / support, the confusion matrix, and
    the ROC AUC of the positive class (`positive_index`; None when only one class occurs). Labels are
    `decide`d at `threshold`.

    targets (N,) class ids; probs (N, K). `confusion[i][j]` counts texts of class i predicted as j
    (rows true, columns predicted). A class never predicted has precision 0; `f1` is the mean F1 over
    the classes that occur (as targets or predictions), so an absent class does not drag it down.
    """
    targets = np.asarray(targets, dtype=np.int64)
    pos = positive_index(labels, positive)
    pred = decide(probs, pos, threshold).numpy()
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (targets, pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros(k), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    occurs = (predicted + support) > 0
    picked = probs[torch.arange(len(targets)), torch.from_numpy(targets)]
    loss = float(-picked.clamp_min(1e-12).log().mean()) if len(targets) else float("nan")
    return {
        "loss": loss,
        "accuracy": float(true_pos.sum() / max(len(targets), 1)),
        "f1": float(f1[occurs].mean()) if occurs.any() else 0.0,
        "per_class": {label: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                              "support": int(support[c])} for c, label in enumerate(labels)},
        "confusion": confusion.tolist(),
        "threshold": threshold, "positive": labels[pos],
        "roc_auc": auc if (auc := roc_auc(probs[:, pos].numpy(), targets == pos)) == auc else None,  # nan -> None
    }
