"""Classification fine-tuning, `classify` and classifier evaluation.

Tiny models built here, small synthetic labeled files in tmp dirs; one end-to-end CLI run on the real
SMS Spam Collection with a tiny base.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.classification import ClassBatches, class_weights, classification_loss, pad_batch, predict
from llmstages.cli import main as cli_main
from llmstages.config import build_recipe
from llmstages.data.prepared import LabeledSplit
from llmstages.errors import StopTraining
from llmstages.model import GPT, GPTConfig, build_config
from llmstages.stages.classify import classifier_from
from llmstages.stages.finetune import finetune
from llmstages.store import Store
from llmstages.tokenizer import train_bpe
from spamdata import labeled_rows, message, quiet, save_base, spam_tokenizer, write_tsv

@pytest.fixture(scope="module")
def tokenizer():
    return spam_tokenizer()


@pytest.fixture
def base(store_dir, tokenizer) -> str:
    """A tiny random language model committed as run 'base' in the test store."""
    return save_base(store_dir, tokenizer)


def spam_recipe(source: Path, *overrides: str, run: str = "clf", **train):
    raw = {"task": "classify", "run": run, "init_from": "base",
           "data": {"source": [str(source)], "columns": ["label", "text"], "val_fraction": 0.2, "test_fraction": 0.2},
           "train": {"max_steps": 4, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 1,
                     "eval_every": 2, "save_every": 2, "log_every": 1, "lr": 3e-3, "min_lr": 3e-4,
                     "best_metric": "f1", **train}}
    return build_recipe(raw, list(overrides))


def log_lines(store_dir: Path, run: str = "clf") -> list[dict]:
    return [json.loads(line) for line in (store_dir / "runs" / run / "log.jsonl").read_text().splitlines()]


def split_of(sequences: list[list[int]], labels: list[int], tmp_path: Path) -> LabeledSplit:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    return LabeledSplit(np.concatenate([np.asarray(s) for s in sequences]).astype(np.uint16), offsets,
                        np.asarray(labels, dtype=np.int64), None, tmp_path / "none.jsonl")


# --- pooling, padding, truncation ------------------------------------------------------------------------
def test_padded_and_unpadded_batches_give_the_same_logits(tokenizer):
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    model = classifier_from(lm, ["ham", "spam"], seed=1).eval()
    short, long = tokenizer.encode("call me later"), tokenizer.encode("win a free prize now, txt claim to 0800 today")
    assert len(short) < len(long)
    alone = pad_batch([short], tokenizer.eot_id, 32)
    padded = pad_batch([short, long], tokenizer.eot_id, 32)
    assert padded["input_ids"].shape == (2, len(long))
    assert padded["last_index"].tolist() == [len(short) - 1, len(long) - 1]
    assert padded["n_tokens"] == len(short) + len(long)  # padding is not counted
    with torch.no_grad():
        one = model(alone["input_ids"], last_index=alone["last_index"])  # (1, 2)
        two = model(padded["input_ids"], last_index=padded["last_index"])  # (2, 2)
        other_pad = model(pad_batch([short, long], 0, 32)["input_ids"], last_index=padded["last_index"])
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=1e-6)
    assert torch.equal(two, other_pad)  # the pad id itself never reaches the logits
    # predict() batches by length; the result does not depend on the company a text keeps
    single = predict(model, tokenizer, ["call me later"], batch_size=1)
    batched = predict(model, tokenizer, ["win a free prize now, txt claim to 0800 today", "call me later"])
    assert batched[1]["label"] == single[0]["label"]
    assert batched[1]["probability"] == pytest.approx(single[0]["probability"], abs=1e-6)


def test_long_texts_keep_their_first_block_size_tokens():
    batch = pad_batch([list(range(1, 50)), [7, 8]], pad_id=0, block_size=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == list(range(1, 17)) and batch["last_index"].tolist() == [15, 1]
    assert batch["n_tokens"] == 18


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_classifier_takes_every_base_weight_but_the_lm_head_without_a_copy(tokenizer, arch):
    torch.manual_seed(0)
    lm = GPT(build_config(vocab_size=tokenizer.vocab_size, arch=arch, block_size=32, n_layer=2, n_head=2, n_embd=32))
    base_state = {k: v.clone() for k, v in lm.state_for_saving().items() if not k.startswith("lm_head.")}
    shared = {k: v.data_ptr() for k, v in lm.state_dict().items()}
    model = classifier_from(lm, ["a", "b", "c"], seed=1)
    assert model.config.num_classes == 3 and model.config.class_names == ["a", "b", "c"]
    state = model.state_for_saving()
    assert set(state) == set(base_state) | {"score.weight"}
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    # the base's tensors themselves, not copies: a 1B base is not held twice (issue 14)
    assert all(state[k].data_ptr() == shared[k] for k in base_state)
    assert not any(p.is_meta for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    assert state["score.weight"].shape == (3, 32) and state["score.weight"].std() < 0.05  # a small new head
    again = classifier_from(GPT(lm.config), ["a", "b", "c"], seed=1)
    assert torch.equal(again.score.weight, model.score.weight)  # the head's init depends on the seed alone


# --- training batches and balance --------------------------------------------------------------------------
def test_epochs_visit_every_record_once_in_a_seeded_order(tmp_path):
    split = split_of([[i + 1] * (1 + i % 5) for i in range(30)], [i % 3 == 0 for i in range(30)], tmp_path)
    batches = ClassBatches(split, batch_size=4, block_size=8, pad_id=0, seed=7)
    rows = np.concatenate([batches.records(i) for i in range(15)])  # 60 = two epochs of 30
    assert sorted(rows[:30]) == list(range(30)) and sorted(rows[30:]) == list(range(30))
    assert list(rows[:30]) != list(rows[30:])  # a fresh permutation each epoch
    again = ClassBatches(split, batch_size=4, block_size=8, pad_id=0, seed=7)
    for index in (9, 3, 14):  # any batch from its index alone, in any order: exact resume
        a, b = batches(index), again(index)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert batches(0)["targets"].tolist() == split.labels[batches.records(0)].tolist()


def test_undersample_draws_a_fresh_balanced_epoch(tmp_path):
    labels = [1 if i % 5 == 0 else 0 for i in range(50)]  # 10 of class 1, 40 of class 0
    split = split_of([[i + 1] for i in range(50)], labels, tmp_path)
    batches = ClassBatches(split, batch_size=5, block_size=8, pad_id=0, seed=3, undersample=True)
    assert batches.epoch_size == 20
    first = np.concatenate([batches.records(i) for i in range(4)])
    second = np.concatenate([batches.records(i) for i in range(4, 8)])
    for epoch in (first, second):
        assert len(set(epoch)) == 20 and np.bincount(split.labels[epoch]).tolist() == [10, 10]
        assert set(np.flatnonzero(split.labels == 1)) <= set(epoch)  # every minority record, every epoch
    assert set(first) != set(second)  # a different majority subset


def test_weighted_loss_uses_inverse_class_frequency():
    weights = class_weights([30, 10, 0])
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20, 0.0])
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.2, 0.0], [-1.0, 1.0, 0.0]])
    model = lambda ids, last_index: logits  # noqa: E731 - a stand-in that returns fixed logits
    batch = {"input_ids": torch.zeros(3, 1, dtype=torch.long), "last_index": torch.zeros(3, dtype=torch.long),
             "targets": torch.tensor([0, 1, 1])}
    picked = -F.log_softmax(logits, dim=-1)[torch.arange(3), batch["targets"]]
    expected = (picked * weights[batch["targets"]]).sum() / weights[batch["targets"]].sum()
    assert float(classification_loss(model, batch, weights)) == pytest.approx(float(expected))
    assert float(classification_loss(model, batch)) == pytest.approx(float(picked.mean()))


# --- fine-tuning through the shared loop ---------------------------------------------------------------------
TRAINABLE = {
    "head": lambda name: name == "score.weight",
    "last_blocks:1": lambda name: name == "score.weight" or name.startswith(("transformer.h.1.", "transformer.ln_f.")),
    "lora": lambda name: name == "score.weight" or "lora_" in name,
    "all": lambda name: True,
}


@pytest.mark.parametrize("mode", list(TRAINABLE))
def test_each_trainable_mode_changes_only_what_it_trains(mode, tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    recipe = spam_recipe(source, f"finetune.trainable={mode}", "finetune.lora_rank=4", "finetune.lora_targets=[c_attn]")
    store = Store(store_dir)
    result = finetune(recipe, store, console=quiet())
    assert result.step == 4
    before = load_file(str(store.latest("base") / "model.safetensors"))
    after = load_file(str(store.run_dir("clf") / "step-000004" / "model.safetensors"))
    assert "lm_head.weight" not in after and after["score.weight"].shape == (2, 32)
    if mode == "lora":
        assert {k for k in after if "lora_" in k} == {f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in (0, 1)
                                                    for ab in "AB"}
    trains = TRAINABLE[mode]
    for name, value in after.items():
        if trains(name):
            assert name not in before or not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"{name} changed but is frozen in mode {mode}"
    # each eval logs loss, accuracy, macro F1, per-class figures and the confusion matrix
    evals = [r for r in log_lines(store_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert set(evals[-1]) >= {"accuracy", "f1", "per_class", "confusion"}
    assert set(evals[-1]["per_class"]["spam"]) == {"precision", "recall", "f1", "support"}
    assert (store_dir / "runs/clf/best.json").exists()


def test_finetune_reports_the_best_checkpoint_on_the_test_split(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(100))
    store = Store(store_dir)
    result = finetune(spam_recipe(source, "train.max_steps=6"), store, console=quiet())
    best = json.loads((store_dir / "runs/clf/best.json").read_text())
    report = json.loads((store_dir / "runs/clf/test_metrics.json").read_text())
    assert report["step"] == best["step"] and report["checkpoint"].endswith(f"step-{best['step']:06d}")
    assert report["examples"] == 20 and sum(map(sum, report["confusion"])) == 20
    assert set(report) >= {"accuracy", "f1", "loss", "per_class", "confusion", "labels"}
    last = log_lines(store_dir)[-1]
    assert last["step"] == result.step and last["test_accuracy"] == report["accuracy"]
    assert last["checkpoint_step"] == best["step"]
    meta = load_checkpoint("clf", store).meta
    assert meta["labels"] == ["ham", "spam"] and meta["task"] == "classify" and meta["parent"]["ref"] == "base"


def test_three_classes_from_jsonl_with_labels_from_the_data(tmp_path, store_dir, base):
    rng = random.Random(4)
    topics = {"sport": "goal match team win ball".split(), "food": "bread soup cake eat dinner".split(),
              "tech": "code phone laptop app bug".split()}
    rows = [{"body": message(rng, words), "topic": topic} for _ in range(20) for topic, words in topics.items()]
    source = tmp_path / "topics.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = build_recipe({"task": "classify", "run": "topics", "init_from": "base",
                           "data": {"source": [str(source)], "text_field": "body", "label_field": "topic",
                                    "val_fraction": 0.2},
                           "train": {"max_steps": 3, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 1,
                                     "eval_every": 3},
                           "finetune": {"balance": "weighted"}})
    finetune(recipe, Store(store_dir), console=quiet())
    ckpt = load_checkpoint("topics", Store(store_dir))
    assert ckpt.model.config.class_names == ["food", "sport", "tech"]  # sorted labels of the training data
    assert not (store_dir / "runs/topics/test_metrics.json").exists()  # no test split asked for


def test_resume_after_a_stop_continues_exactly(tmp_path, store_dir, base, monkeypatch):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(80))
    store = Store(store_dir)
    finetune(spam_recipe(source, "train.max_steps=6", run="straight"), store, console=quiet())

    original = ClassBatches.__call__

    def stop_during_step_three(self, index):  # SIGTERM mid-run: the loop finishes the step and commits
        if index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, index)

    monkeypatch.setattr(ClassBatches, "__call__", stop_during_step_three)
    with pytest.raises(StopTraining):
        finetune(spam_recipe(source, "train.max_steps=6", run="stopped"), store, console=quiet())
    assert store.latest("stopped").name == "step-000003"
    monkeypatch.setattr(ClassBatches, "__call__", original)
    finetune(spam_recipe(source, "train.max_steps=6", run="stopped"), store, resume=True, console=quiet())

    def figures(run):
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("f1"), r.get("tokens"))
                for r in log_lines(store_dir, run)]
    assert figures("stopped") == figures("straight")
    a = load_file(str(store.run_dir("straight") / "step-000006" / "model.safetensors"))
    b = load_file(str(store.run_dir("stopped") / "step-000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: exit 2, clear message, nothing written ---------------------------------------------------------
def squeezed(text: str) -> str:
    """Text without whitespace: rich wraps long lines (and long paths) at the terminal width."""
    return "".join(text.split())


def finetune_cli(source: Path, *extra: str) -> list[str]:
    return ["finetune", "--task", "spam", f"data.source={source}", "data.mirror=[]", "data.sha256=[]",
            "init_from=base", "train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=4", *extra]


@pytest.mark.parametrize("rows,expected", [
    ([("ham", "fine thanks"), ("eggs", "a label nobody declared"), ("spam", "win cash")] * 10,
     ["sms.tsv:2:", "label 'eggs' is not in data.labels (ham, spam)"]),
    ([("ham", "fine thanks"), ("spam", "win cash"), ("ham", "   ")] * 10, ["sms.tsv:3:", "field 'text' is empty"]),
    ([("ham", f"message {i}") for i in range(30)], ["at least two classes", "['ham']"]),
])
def test_bad_data_is_exit_2_with_a_clear_message_and_nothing_written(rows, expected, tmp_path, store_dir, base,
                                                                     capsys):
    source = write_tsv(tmp_path / "sms.tsv", rows)
    assert cli_main(finetune_cli(source)) == 2
    err = squeezed(capsys.readouterr().err)
    assert all(squeezed(text) in err for text in expected), err
    assert "Traceback" not in err
    assert not (store_dir / "data").exists() or not any((store_dir / "data").iterdir())
    assert [p.name for p in (store_dir / "runs").iterdir()] == ["base"]  # no run, no member run of the ensemble


def test_missing_base_says_how_to_make_it(tmp_path, store_dir, capsys):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(40))
    assert cli_main(finetune_cli(source, "init_from=quickstart")) == 2
    err = squeezed(capsys.readouterr().err)
    assert squeezed("has not been trained yet") in err and squeezed("llmstages pretrain quickstart") in err


def test_classify_refuses_a_language_model(store_dir, base, capsys):
    assert cli_main(["classify", "base", "hello"]) == 2
    err = squeezed(capsys.readouterr().err)
    assert squeezed("not a classifier") in err and squeezed("llmstages finetune --task spam") in err


def test_evaluate_names_a_label_the_model_does_not_know(tmp_path, store_dir, base, capsys):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(40))
    finetune(spam_recipe(source, "train.max_steps=2"), Store(store_dir), console=quiet())
    other = write_tsv(tmp_path / "other.tsv", [("ham", "ok see you"), ("promo", "big sale today")])
    assert cli_main(["evaluate", "clf", "--data", str(other), "--json"]) == 2
    err = squeezed(capsys.readouterr().err)
    assert squeezed("other.tsv:2: label 'promo' is not one of the model's classes") in err
    assert cli_main(["classify", "clf", "fine", ""]) == 2
    assert squeezed("text 2 of 2 is empty") in squeezed(capsys.readouterr().err)
    assert cli_main(["evaluate", "clf", "--data", str(source)]) == 0  # the human-readable report
    out = capsys.readouterr().out
    assert "accuracy" in out and "true \\ predicted" in out and "spam" in out


def test_dry_run_measures_classification_batches(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(40))
    figures = finetune(spam_recipe(source, "train.epochs=2"), Store(store_dir), dry_run=True, console=quiet())
    assert figures["task"] == "classify" and figures["steps"] == 6  # ceil(2 epochs x 24 train texts / 8)
    assert not (store_dir / "runs/clf").exists()


# --- the whole thing on the real SMS Spam Collection ------------------------------------------------------------
def test_spam_end_to_end_on_the_real_sms_file(cli, data_file, tmp_path, store_dir):
    sms = data_file("sms_spam/SMSSpamCollection.tsv")
    texts = [line.split("\t", 1)[1] for line in sms.read_text(encoding="utf-8").splitlines()[:2000]]
    tok = train_bpe(texts, 512)
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(Store(store_dir), "base", 1, lm, tok, {"task": "pretrain"})
    env = {"LLMSTAGES_DATA": str(sms.parent.parent)}
    # one model, not the recipe's ensemble of three (test_ensemble.py): its predictions are checked below
    # against a plain forward pass of that model
    run = cli("finetune", "--task", "spam", "init_from=base", "train.epochs=0", "train.max_steps=12",
              "train.eval_every=6", "train.save_every=6", "train.keep_last=2", "train.micro_batch_size=16",
              "train.global_batch_size=16", "finetune.ensemble=1", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "test split" in run.stderr and "texts longer than the model's context" in run.stderr
    run_dir = store_dir / "runs/finetune-spam"
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000006", "step-000012"]
    assert not (run_dir / "best.json").exists()  # the recipe's best_metric: none, the last checkpoint is the model
    report = json.loads((run_dir / "test_metrics.json").read_text())
    assert Path(report["checkpoint"]).name == "step-000012"
    # The stratified test split: round(0.15 x 4103) ham + round(0.15 x 635) spam, the same texts every time.
    assert report["examples"] == 615 + 95 and report["labels"] == ["ham", "spam"]
    assert sum(map(sum, report["confusion"])) == 710 and [sum(row) for row in report["confusion"]] == [615, 95]

    one = cli("classify", "finetune-spam", "WINNER!! Claim your free prize now", "See you at 6?", "--json")
    assert one.returncode == 0, one.stderr
    out = json.loads(one.stdout)
    assert [p["text"] for p in out["predictions"]] == ["WINNER!! Claim your free prize now", "See you at 6?"]
    ckpt = load_checkpoint("finetune-spam", Store(store_dir))
    assert ckpt.meta["classify"] == {"threshold": 0.2, "positive": "spam"}  # the recipe's decision, kept
    for p in out["predictions"]:  # against one plain forward pass: softmax of the class logits at the last token
        ids = ckpt.tokenizer.encode(p["text"])
        with torch.no_grad():
            logits = ckpt.model.eval()(torch.tensor([ids]), last_index=torch.tensor([len(ids) - 1]))[0]
        expected = dict(zip(["ham", "spam"], logits.softmax(-1).tolist()))
        assert p["probabilities"] == pytest.approx(expected, abs=1e-5)
        label = "spam" if expected["spam"] >= 0.2 else "ham"
        assert p["label"] == label and p["probability"] == pytest.approx(expected[label], abs=1e-5)
    piped = cli("classify", "finetune-spam", input="first message\n\nsecond [bold]one[/bold]\n")
    assert piped.returncode == 0 and "second [bold]one[/bold]" in piped.stdout and "first message" in piped.stdout

    ev = cli("evaluate", "finetune-spam", "--data", str(sms), "--limit", "300", "--json")
    assert ev.returncode == 0, ev.stderr
    figures = json.loads(ev.stdout)
    assert set(figures) >= {"accuracy", "f1", "loss", "per_class", "confusion", "labels", "examples"}
    assert figures["examples"] == 300 and sum(map(sum, figures["confusion"])) == 300
    assert set(figures["per_class"]) == {"ham", "spam"}
    assert set(figures["per_class"]["spam"]) == {"precision", "recall", "f1", "support"}


# --- a modern base (rotary, RMSNorm, SwiGLU, GQA, QK-norm, untied head) ------------------------------------
@pytest.fixture
def modern_base(store_dir, tokenizer) -> str:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, arch="modern",
                       pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True, bias=False,
                       tie_embeddings=False, logit_softcap=15.0)
    save_checkpoint(Store(store_dir), "base", 1, GPT(config), tokenizer, {"task": "pretrain"})
    return "base"


@pytest.mark.parametrize("mode,optimizer", [("lora", "muon"), ("all", "muon")])  # lora: adapters are AdamW's
def test_finetune_from_a_modern_base_learns(mode, optimizer, tmp_path, store_dir, modern_base):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(160))
    recipe = spam_recipe(source, f"finetune.trainable={mode}", "finetune.lora_targets=[c_attn,c_fc,c_proj]",
                         f"train.optimizer={optimizer}", max_steps=16, eval_every=16, save_every=16, lr=1e-2)
    store = Store(store_dir)
    finetune(recipe, store, console=quiet())
    losses = [r["loss"] for r in log_lines(store_dir) if "lr" in r]
    # from a random base: all weights learn fast; LoRA adapters on random features more slowly
    assert np.mean(losses[-4:]) < (0.8 if mode == "lora" else 0.5) * np.mean(losses[:4]), losses
    after = load_checkpoint("clf", store).model
    assert after.config.pos_emb == "rope" and after.config.mlp == "swiglu" and after.config.n_kv_head == 1
    before = load_file(str(store.latest("base") / "model.safetensors"))
    trained = load_file(str(store.latest("clf") / "model.safetensors"))
    assert "lm_head.weight" not in trained and not torch.equal(trained["score.weight"], torch.zeros(2, 32))
    for name, value in trained.items():
        if name in before:
            assert torch.equal(value, before[name]) == (mode == "lora"), name  # lora: the base is frozen
    if mode == "lora":
        assert {k.rsplit(".", 2)[-2] for k in trained if k.endswith("lora_B")} == {"c_attn", "c_fc", "c_proj"}
