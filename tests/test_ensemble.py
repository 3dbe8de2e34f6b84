"""finetune.ensemble: N fine-tuned members kept side by side in one checkpoint that decides by the median
of their probabilities (for an odd N: their majority vote at any threshold); only classification loads
it; its files are verified like any checkpoint's.

Tiny models built here; small synthetic labeled files in tmp dirs.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

from llmstages.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from llmstages.classification import class_probabilities, decide
from llmstages.config import build_recipe
from llmstages.ensemble import median_probabilities
from llmstages.errors import RecipeError, UserError
from llmstages.model import GPT, GPTConfig
from llmstages.stages.evaluate import evaluate
from llmstages.stages.finetune import finetune
from llmstages.stages.browse import print_checkpoint
from llmstages.store import Store, write_manifest
from spamdata import labeled_rows, quiet, save_base, spam_tokenizer, write_tsv
from test_soup import raw_recipe


@pytest.fixture(scope="module")
def tokenizer():
    return spam_tokenizer()


@pytest.fixture
def ensemble_run(tmp_path, store_dir, tokenizer):
    """A finished ensemble of three members (seeds 7, 8, 9) as run `clf`, and its data file."""
    save_base(store_dir, tokenizer)
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(60))
    result = finetune(build_recipe(raw_recipe(source, ensemble=3)), Store(store_dir), console=quiet())
    return Store(store_dir), source, result


@pytest.mark.parametrize("members", [3, 5])
def test_a_threshold_on_the_median_is_the_majority_vote(members):
    torch.manual_seed(members)
    p_spam = torch.rand(members, 200, 1)
    probs = torch.cat([1 - p_spam, p_spam], dim=-1)  # (M, B, 2)
    med = median_probabilities(probs)  # (B, 2)
    assert torch.allclose(med.sum(-1), torch.ones(200))
    for threshold in (0.2, 0.5, 0.9):
        majority = (p_spam[..., 0] >= threshold).sum(0) * 2 > members
        assert torch.equal(med[:, 1] >= threshold, majority)
    three_classes = torch.softmax(torch.randn(members, 50, 3), dim=-1)
    assert torch.allclose(median_probabilities(three_classes).sum(-1), torch.ones(50))  # renormalised


def test_an_ensemble_keeps_each_member_and_decides_by_their_median(ensemble_run, tokenizer):
    store, source, result = ensemble_run
    members = [store.latest(f"clf-member{k}") for k in (1, 2, 3)]
    assert [yaml.safe_load((m.parent / "recipe.yaml").read_text())["train"]["seed"] for m in members] == [7, 8, 9]
    path = store.latest("clf")
    assert store.checkpoints("clf") == [path] == [result.checkpoint]
    saved = load_file(str(path / "model.safetensors"))
    for i, member in enumerate(members):  # member i's tensors, untouched, under members.<i>.
        own = load_file(str(member / "model.safetensors"))
        assert {k.removeprefix(f"members.{i}."): v for k, v in saved.items() if k.startswith(f"members.{i}.")}.keys() \
            == own.keys()
        assert all(torch.equal(saved[f"members.{i}.{k}"], v) for k, v in own.items())
    ensemble = load_checkpoint("clf", store, ensemble_ok=True)
    assert ensemble.meta["ensemble"] == 3 and ensemble.meta["members"] == [str(m) for m in members]

    texts = [text for _, text in labeled_rows(40, seed=5)]
    ids = ensemble.tokenizer.encode_batch(texts)
    each = torch.stack([class_probabilities(load_checkpoint(m, store).model, ids, tokenizer.eot_id) for m in members])
    probs = class_probabilities(ensemble.model, ids, tokenizer.eot_id)
    assert torch.allclose(probs, each.median(dim=0).values, atol=1e-5)
    assert len({tuple(decide(p, 1, 0.5).tolist()) for p in each}) > 1, "the members must disagree somewhere"
    report = json.loads((store.run_dir("clf") / "test_metrics.json").read_text())
    assert report["checkpoint"] == str(path)  # the ensemble is what the test split scores
    scored = evaluate("clf", [str(source)], store, threshold=0.5)
    assert scored["examples"] == 60 and 0 <= scored["roc_auc"] <= 1


def test_only_classification_loads_an_ensemble_and_its_files_are_verified(ensemble_run, cli, tokenizer):
    store, _, _ = ensemble_run
    with pytest.raises(UserError, match="ensemble of 3 classifiers"):
        load_checkpoint("clf", store)  # generation, export, fine-tuning from it: one model is needed
    generated = cli("generate", "clf", "hello")
    assert generated.returncode == 2 and "clf-member1" in generated.stderr  # the hint names a member to use
    texts = ["win a prize now", "see you"]
    classified = cli("classify", "clf", *texts, "--json", "--threshold", "0.5")
    assert classified.returncode == 0, classified.stderr
    ensemble = load_checkpoint("clf", store, ensemble_ok=True)
    median = class_probabilities(ensemble.model, ensemble.tokenizer.encode_batch(texts), tokenizer.eot_id)
    for p, probs in zip(json.loads(classified.stdout)["predictions"], median.tolist()):  # the members' median
        assert [p["probabilities"]["ham"], p["probabilities"]["spam"]] == pytest.approx(probs, abs=1e-5)
        assert p["label"] == ("spam" if probs[1] >= 0.5 else "ham")

    path = store.latest("clf")
    shown = Console(record=True, width=400)
    print_checkpoint(shown, store, "clf")
    text = shown.export_text()
    assert "an ensemble of 3 classifiers" in text and all(str(store.latest(f"clf-member{k}")) in text for k in (1, 2, 3))
    assert "metrics" not in text  # a member's validation figures are not the ensemble's
    assert verify_checkpoint(path) == []
    broken = path.parent / "broken"
    shutil.copytree(path, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["members.1.score.weight"][0, 0] = float("nan")

    def refused(match: str) -> None:
        write_manifest(broken)  # files that hash right: the weight checks must refuse them by themselves
        assert match in "\n".join(verify_checkpoint(broken))
        with pytest.raises(UserError, match=re.escape(match)):
            load_checkpoint(broken, store, ensemble_ok=True)

    save_file(weights, str(broken / "model.safetensors"))
    refused("members.1.score.weight (1 of")
    del weights["members.2.score.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    refused("missing tensors members.2.score.weight")
    meta = json.loads((path / "meta.json").read_text())
    for bad in (1, "3", True, 10**9):  # 10**9 members would be built (on the meta device) for ever
        (broken / "meta.json").write_text(json.dumps(dict(meta, ensemble=bad)))
        refused("not a number of members")
    # a language model's checkpoint that claims to be an ensemble: refused, not a traceback
    language_model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    lm = save_checkpoint(store, "lm", 1, language_model, tokenizer, {"task": "pretrain", "ensemble": 2})
    with pytest.raises(UserError, match="impossible model config"):
        load_checkpoint(lm, store, ensemble_ok=True)


def test_a_kill_before_the_ensemble_is_committed_resumes_to_the_same_checkpoint(ensemble_run):
    store, source, _ = ensemble_run
    first = load_file(str(store.latest("clf") / "model.safetensors"))
    shutil.rmtree(store.run_dir("clf"))  # killed after the last member, before the ensemble's commit
    finetune(build_recipe(raw_recipe(source, ensemble=3)), store, resume=True, console=quiet())
    again = load_file(str(store.latest("clf") / "model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_ensemble_settings_are_checked_before_anything_is_written(tmp_path, store_dir, tokenizer):
    source = write_tsv(tmp_path / "sms.tsv", labeled_rows(40))
    for raw, overrides in ((dict(raw_recipe(source, ensemble=3), task="instruct"), []),
                           (raw_recipe(source, ensemble=3, soup=2), []),
                           (raw_recipe(source, ensemble=3, average_last=2), ["train.keep_last=2"]),
                           (raw_recipe(source, ensemble=0), [])):
        with pytest.raises(RecipeError, match="finetune.ensemble"):
            build_recipe(raw, overrides)
    save_base(store_dir, tokenizer)
    plan = finetune(build_recipe(raw_recipe(source, ensemble=3)), Store(store_dir), dry_run=True, console=quiet())
    assert plan["ensemble members"] == 3 and not Store(store_dir).run_dir("clf-member1").exists()
    assert plan["estimated time (min)"] == pytest.approx(3 * plan["estimated time per member (min)"], abs=0.02)
