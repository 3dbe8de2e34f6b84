"""Packed classification batches (finetune.packing with task: classify): a micro-batch's texts share
as few rows as hold them, each attending only to itself with its own positions and read at its own
last token, so the logits, the loss, its gradients and the adversarial push are the padded batch's.

Tiny random models (2 layers, 32 wide) and random token texts; one in-process fine-tuning run of a
synthetic spam file, packed and padded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmstages.classification import ClassBatches, adversarial_step, classification_loss
from llmstages.config import build_recipe
from llmstages.data.batches import pad_batch
from llmstages.data.packing import PAD_SEGMENT, pack_texts
from llmstages.data.prepared import LabeledSplit
from llmstages.model import GPT, GPTConfig
from llmstages.stages.finetune import finetune
from llmstages.store import Store
from spamdata import labeled_rows, quiet, save_base, spam_tokenizer, write_tsv

VOCAB = 97


@pytest.fixture
def base(store_dir) -> str:
    """A tiny random language model committed as run 'base' in the test store."""
    return save_base(store_dir, spam_tokenizer())


def tiny_classifier(arch: str) -> GPT:
    torch.manual_seed(0)
    extra = dict(arch="modern", pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False) \
        if arch == "modern" else dict(arch="gpt2")
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=40, n_layer=2, n_head=2, n_embd=32, num_classes=2,
                         class_names=["ham", "spam"], **extra))


def random_texts(n: int, seed: int = 0, longest: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(1, longest + 1))) for _ in range(n)]


def test_pack_texts_places_every_text_once_and_points_at_its_last_token():
    texts = random_texts(9) + [np.arange(1, 46)]  # the last is cut to the block size, 40
    batch = pack_texts(texts, pad_id=0, block_size=40)
    ids, segments, positions = batch["input_ids"], batch["segments"], batch["positions"]
    assert ids.shape[0] < len(texts) and ids.shape[1] <= 40 and batch["n_tokens"] == sum(min(len(t), 40) for t in texts)
    for i, text in enumerate(texts):
        row, last = int(batch["last_row"][i]), int(batch["last_index"][i])
        n = min(len(text), 40)
        assert ids[row, last - n + 1:last + 1].tolist() == text[:n].tolist()  # the text ends where it points
        assert positions[row, last - n + 1:last + 1].tolist() == list(range(n))  # its positions restart at 0
        assert len(set(segments[row, last - n + 1:last + 1].tolist())) == 1  # one segment of its own
    assert (ids[segments == PAD_SEGMENT] == 0).all()
    with pytest.raises(ValueError, match="empty text"):
        pack_texts([np.array([], dtype=np.int64)], pad_id=0, block_size=40)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_packed_and_padded_batches_give_the_same_logits_loss_and_gradients(arch):
    model = tiny_classifier(arch)
    texts = random_texts(12, seed=1)
    targets = torch.tensor([i % 2 for i in range(12)])
    results = []
    for collate in (pad_batch, pack_texts):
        batch = collate(texts, 0, 40)
        batch["targets"] = targets
        model.zero_grad()
        loss = classification_loss(model, batch)
        loss.backward()
        logits = model(batch["input_ids"], last_index=batch["last_index"],
                       **{k: batch[k] for k in ("positions", "segments", "last_row") if k in batch})
        results.append((logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        batch["input_ids"].numel()))
    (padded_logits, padded_loss, padded_grads, padded_size), (logits, loss, grads, size) = results
    assert size < padded_size  # fewer positions computed
    assert torch.allclose(logits, padded_logits, atol=1e-5) and loss == pytest.approx(padded_loss, abs=1e-6)
    for name, grad in padded_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5), name


def test_the_adversarial_push_of_a_packed_text_is_the_one_it_gets_alone():
    model = tiny_classifier("modern")
    texts = random_texts(10, seed=2)
    targets = torch.tensor([i % 2 for i in range(10)])
    losses = []
    for collate in (pad_batch, pack_texts):
        batch = dict(collate(texts, 0, 40), targets=targets)
        losses.append(classification_loss(model, batch, adversarial_eps=0.5).item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    # the push itself: each text's share of the packed gradient scaled to length eps on its own
    grad = torch.randn(2, 6, 4)
    segments = torch.tensor([[0, 0, 1, 1, 1, PAD_SEGMENT], [0, 0, 0, 0, 0, 0]])
    grad[0, 5] = 0.0  # padding has no gradient
    push = adversarial_step(grad, 0.5, segments)
    for row, span in ((0, slice(0, 2)), (0, slice(2, 5)), (1, slice(0, 6))):
        assert push[row, span].norm().item() == pytest.approx(0.5, rel=1e-5)
        assert torch.allclose(push[row, span], 0.5 * grad[row, span] / grad[row, span].norm(), atol=1e-6)
    assert push[0, 5].abs().sum() == 0


def test_class_batches_pack_the_same_texts_in_fewer_rows(tmp_path):
    texts = random_texts(30, seed=3)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int64)
    split = LabeledSplit(np.concatenate(texts).astype(np.uint16), offsets,
                         np.array([i % 3 == 0 for i in range(30)], dtype=np.int64), None, tmp_path / "none.jsonl")
    padded = ClassBatches(split, batch_size=8, block_size=40, pad_id=0, seed=7)
    packed = ClassBatches(split, batch_size=8, block_size=40, pad_id=0, seed=7, pack=True)
    for index in (0, 5):
        a, b = padded(index), packed(index)
        assert torch.equal(a["targets"], b["targets"]) and a["n_tokens"] == b["n_tokens"]
        assert b["input_ids"].numel() < a["input_ids"].numel() and "last_row" in b


def test_packed_spam_fine_tuning_learns_like_padded(tmp_path, store_dir, base):
    """fp32, the same seed: the packed run's losses are the padded run's (the same texts per step)."""
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80, 0))
    losses = {}
    for packing in ("false", "true"):
        run = f"clf-{packing}"
        recipe = build_recipe({"task": "classify", "run": run, "init_from": "base",
                               "data": {"source": [str(source)], "columns": ["label", "text"],
                                        "val_fraction": 0.2, "test_fraction": 0.2},
                               "train": {"max_steps": 6, "micro_batch_size": 8, "global_batch_size": 8,
                                         "warmup_steps": 1, "eval_every": 3, "save_every": 3, "log_every": 1,
                                         "lr": 3e-3, "min_lr": 3e-4, "precision": "fp32"},
                               "finetune": {"adversarial_eps": 0.3}}, [f"finetune.packing={packing}"])
        finetune(recipe, Store(store_dir), console=quiet())
        lines = [json.loads(x) for x in (store_dir / "runs" / run / "log.jsonl").read_text().splitlines()]
        losses[packing] = [r["loss"] for r in lines if "loss" in r]
    assert len(losses["true"]) == 6 and losses["true"] == pytest.approx(losses["false"], abs=1e-4)
