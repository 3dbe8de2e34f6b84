"""Issue 13's classifier options: the decision threshold, ROC AUC, pooling, label smoothing, adversarial
training, weight averaging, domain-adaptive pretraining (resumed exactly after SIGKILL), data.lowercase,
the seeding of LoRA adapters, and the CV folds of bench/spam_cv.py (the weight soup: test_soup.py).

Tiny models built here; small synthetic labeled files in tmp dirs.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.classification import classification_loss, decide, roc_auc
from llmstages.classification import predict
from llmstages.cli import main as cli_main
from llmstages.config import build_recipe
from llmstages.data.plan import choose_tokenizer, fingerprint_settings, make_plan
from llmstages.data.split import stratified_folds
from llmstages import loop
from llmstages.errors import RecipeError, UserError
from llmstages.model import GPT, GPTConfig
from llmstages.stages.finetune import finetune
from llmstages.stages.prepare import get_or_prepare
from llmstages.runstate import SpikeGuard
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, train_bpe
from spamdata import env_for, finetune_cli, kill_once_written, labeled_rows, quiet, save_base, spam_tokenizer
from spamdata import write_tsv as write_rows

def write_tsv(path: Path, n: int, seed: int = 0) -> Path:
    return write_rows(path, labeled_rows(n, seed))


@pytest.fixture(scope="module")
def tokenizer():
    return spam_tokenizer()


@pytest.fixture
def base(store_dir, tokenizer) -> str:
    return save_base(store_dir, tokenizer)


def raw_recipe(source: Path, run: str = "clf", **train) -> dict:
    return {"task": "classify", "run": run, "init_from": "base",
            "data": {"source": [str(source)], "columns": ["label", "text"], "val_fraction": 0.2, "test_fraction": 0.2},
            "train": {"max_steps": 4, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 1,
                      "eval_every": 2, "save_every": 2, "log_every": 1, "lr": 3e-3, "min_lr": 3e-4,
                      "best_metric": "f1", **train}}


# --- ROC AUC and the threshold ---------------------------------------------------------------------------------
def test_roc_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ordered right
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.2) = 1
    assert roc_auc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert math.isnan(roc_auc(np.array([0.3, 0.4]), np.array([1, 1])))  # one class only: undefined


def test_decide_keeps_argmax_without_threshold_and_falls_back_to_the_best_other_class():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    assert decide(probs, positive=2).tolist() == [1, 2]
    assert decide(probs, positive=2, threshold=0.25).tolist() == [2, 2]
    assert decide(probs, positive=2, threshold=0.7).tolist() == [1, 1]


def sixty_percent_spam(store_dir: Path, tokenizer, threshold: float = 0.0) -> str:
    """A classifier whose p(spam) is 0.6 for every text, by construction: the final LayerNorm outputs
    its bias (weight 0), e_0; the head maps e_0 to logits [0, log 1.5], so softmax = [0.4, 0.6]."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32,
                       num_classes=2, class_names=["ham", "spam"])
    model = GPT(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.score.weight.zero_()
        model.score.weight[1, 0] = math.log(1.5)
    meta = {"task": "classify", "data_settings": {"format": "tsv", "columns": ["label", "text"], "quoting": "none"},
            "classify": {"threshold": threshold, "positive": ""}}
    save_checkpoint(Store(store_dir), "sixty", 1, model, tokenizer, meta)
    return "sixty"


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`llmstages ARGS` through the CLI's own entry point in this process: (exit code, stdout, stderr)."""
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_threshold_changes_labels(capsys, store_dir, tokenizer, tmp_path):
    model = sixty_percent_spam(store_dir, tokenizer)

    def labels(*extra):
        code, out, err = in_process(capsys, "classify", model, "win a prize now", "see you later", "--json", *extra)
        assert code == 0, err
        predictions = json.loads(out)["predictions"]
        assert all(p["probabilities"]["spam"] == pytest.approx(0.6, abs=1e-6) for p in predictions)
        return [p["label"] for p in predictions]

    assert labels() == ["spam", "spam"]  # the most likely class
    assert labels("--threshold", "0.5") == ["spam", "spam"]
    assert labels("--threshold", "0.7") == ["ham", "ham"]
    code, _, err = in_process(capsys, "classify", model, "hi", "--threshold", "1.5")
    assert code == 2 and "between 0 and 1" in err

    data = tmp_path / "eval.tsv"
    data.write_text("spam\twin a prize\nham\tsee you\n", encoding="utf-8")
    at_half = json.loads(in_process(capsys, "evaluate", model, "--data", str(data), "--json", "--threshold", "0.5")[1])
    at_seven = json.loads(in_process(capsys, "evaluate", model, "--data", str(data), "--json", "--threshold", "0.7")[1])
    assert at_half["per_class"]["spam"]["recall"] == 1.0 and at_half["per_class"]["spam"]["precision"] == 0.5
    assert at_seven["per_class"]["spam"]["recall"] == 0.0 and at_seven["per_class"]["ham"]["recall"] == 1.0
    assert at_half["threshold"] == 0.5 and at_half["positive"] == "spam"
    assert at_half["roc_auc"] == 0.5  # every text scores the same: a tie


def test_the_checkpoints_threshold_is_the_default(capsys, store_dir, tokenizer):
    model = sixty_percent_spam(store_dir, tokenizer, threshold=0.7)  # as a recipe's classify.threshold records it
    out = json.loads(in_process(capsys, "classify", model, "win", "--json")[1])
    assert out["predictions"][0]["label"] == "ham"
    out = json.loads(in_process(capsys, "classify", model, "win", "--json", "--threshold", "0")[1])
    assert out["predictions"][0]["label"] == "spam"


def test_recipe_threshold_is_recorded_and_a_wrong_positive_class_is_refused(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 60)
    raw = raw_recipe(source)
    raw["classify"] = {"threshold": 0.8, "positive": "spam"}
    result = finetune(build_recipe(raw), Store(store_dir), console=quiet())
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.meta["classify"] == {"threshold": 0.8, "positive": "spam"}
    report = json.loads((store_dir / "runs/clf/test_metrics.json").read_text())
    assert report["threshold"] == 0.8 and 0.0 <= report["roc_auc"] <= 1.0
    raw = dict(raw_recipe(source, run="other"), classify={"positive": "eggs"})
    with pytest.raises(Exception, match="classify.positive='eggs'"):
        finetune(build_recipe(raw), Store(store_dir), console=quiet())


# --- pooling, label smoothing, averaging ----------------------------------------------------------------------
def test_mean_pooling_averages_the_real_tokens_only(tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                       num_classes=2, class_names=["a", "b"], pooling="mean")
    model = GPT(config).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        hidden = model.hidden(ids)  # (2, 5, C)
        logits = model(ids, last_index=torch.tensor([2, 4]))
        alone = model(ids[:1, :3], last_index=torch.tensor([2]))
    assert torch.allclose(logits[0], model.score(hidden[0, :3].mean(0)), atol=1e-6)
    assert torch.allclose(logits[1], model.score(hidden[1].mean(0)), atol=1e-6)
    assert torch.allclose(logits[0], alone[0], atol=1e-6)  # the padding changes nothing


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    class Fixed(torch.nn.Module):
        def forward(self, ids, last_index):
            return torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "last_index": torch.tensor([2, 2]),
             "targets": torch.tensor([0, 1])}
    logp = F.log_softmax(torch.tensor([[2.0, -1.0], [0.5, 0.0]]), dim=-1)
    smoothed = torch.tensor([[0.95, 0.05], [0.05, 0.95]])  # e = 0.1, K = 2
    expected = -(smoothed * logp).sum(-1).mean()
    assert classification_loss(Fixed(), batch, label_smoothing=0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    assert classification_loss(Fixed(), batch).item() != pytest.approx(expected.item(), rel=1e-3)


class GivenEmbeddings(torch.nn.Module):
    """Stands in for a GPT's token embedding: returns the tensor it holds, whatever the ids."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings


def test_adversarial_loss_is_the_mean_of_the_clean_loss_and_the_loss_one_push_uphill(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          num_classes=2, class_names=["a", "b"]))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]), "last_index": torch.tensor([2, 4]),
             "targets": torch.tensor([0, 1])}
    eps = 0.5
    adversarial = classification_loss(model, batch, adversarial_eps=eps)
    adversarial.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    # by hand: the gradient of the clean loss at the token embeddings, a step of L2 length eps per text
    wte = model.transformer.wte
    embeddings = wte(batch["input_ids"])  # (2, 5, 16)
    model.transformer.wte = GivenEmbeddings(embeddings)
    clean = classification_loss(model, batch)
    (grad,) = torch.autograd.grad(clean, embeddings, retain_graph=True)
    assert torch.equal(grad[0, 3:], torch.zeros_like(grad[0, 3:]))  # padding is never pushed
    step = eps * grad / grad.flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(step.flatten(1).norm(dim=1), torch.full((2,), eps))
    pushed_embeddings = wte(batch["input_ids"]) + step  # the push is a constant: no gradient through it
    model.transformer.wte = GivenEmbeddings(pushed_embeddings)
    pushed = classification_loss(model, batch)
    assert pushed.item() > clean.item()  # uphill
    ((clean + pushed) / 2).backward()
    assert adversarial.item() == pytest.approx(((clean + pushed) / 2).item(), rel=1e-6)
    by_hand = dict(model.named_parameters(), **{"transformer.wte.weight": wte.weight})
    assert by_hand.keys() == got.keys()
    for name, p in by_hand.items():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name

    model.transformer.wte = wte
    wte.weight.requires_grad_(False)  # frozen embeddings (LoRA, trainable=head): still pushed, same loss
    assert classification_loss(model, batch, adversarial_eps=eps).item() == pytest.approx(adversarial.item(), rel=1e-6)
    with torch.no_grad():  # evaluation: the plain loss, no push
        assert classification_loss(model, batch, adversarial_eps=eps).item() == pytest.approx(
            classification_loss(model, batch).item(), rel=1e-6)


def test_adversarial_eps_reaches_the_loss_and_a_negative_one_is_refused(tmp_path, store_dir, base, monkeypatch):
    with pytest.raises(RecipeError, match="finetune.adversarial_eps"):
        build_recipe(raw_recipe(tmp_path / "x.tsv"), ["finetune.adversarial_eps=-0.1"])
    monkeypatch.setattr(loop, "peak_flops", lambda device, precision: 1e9)  # MFU against a fixed peak
    source = write_tsv(tmp_path / "sms.tsv", 60)
    losses, flops_per_token = {}, {}
    for eps in ("0", "1.0"):
        run = f"clf-{eps}"
        finetune(build_recipe(raw_recipe(source, run=run), [f"finetune.adversarial_eps={eps}"]), Store(store_dir),
                 console=quiet())
        lines = [json.loads(x) for x in (store_dir / "runs" / run / "log.jsonl").read_text().splitlines()]
        losses[eps] = [r["loss"] for r in lines if "loss" in r]
        flops_per_token[eps] = [r["mfu"] * 1e9 / r["tokens_per_s"] for r in lines if r.get("mfu")]
    assert losses["1.0"][0] > losses["0"][0]  # the same first batch: the pushed half of the loss is larger
    # MFU counts the push's extra passes: 14 / 6 the FLOPs of a plain step per token (the same batches)
    assert len(flops_per_token["0"]) == 4
    for plain, pushed in zip(flops_per_token["0"], flops_per_token["1.0"]):
        assert pushed / plain == pytest.approx(14 / 6, rel=0.01)


def test_a_classifier_loss_below_a_uniform_guess_is_never_a_spike(tmp_path, store_dir, base):
    guard = SpikeGuard(window=[0.02, 0.03, 0.05])
    assert guard.observe(0.5, 3.0, 50, 2, floor=math.log(2)) is None  # 17x the median, but < ln 2
    assert guard.observe(0.9, 3.0, 50, 2, floor=math.log(2)) == pytest.approx(0.04)  # a spike
    # a run whose threshold calls nearly every rise a spike: only the steps above ln(2 classes) are
    source = write_tsv(tmp_path / "sms.tsv", 60)
    finetune(build_recipe(raw_recipe(source, max_steps=24), ["train.spike_threshold=1.01"]), Store(store_dir),
             console=quiet())
    lines = [json.loads(x) for x in (store_dir / "runs/clf/log.jsonl").read_text().splitlines()]
    assert min(r["loss"] for r in lines if "loss" in r) < math.log(2) / 2  # it learnt: low losses were there
    assert all(r["spike"] > math.log(2) for r in lines if "spike" in r)


def test_best_metric_none_scores_and_names_the_last_checkpoint(tmp_path, store_dir, base):
    with pytest.raises(RecipeError, match="train.patience"):
        build_recipe(raw_recipe(tmp_path / "x.tsv"), ["train.best_metric=none", "train.patience=2"])
    source = write_tsv(tmp_path / "sms.tsv", 60)
    store = Store(store_dir)
    finetune(build_recipe(raw_recipe(source, keep_last=3), ["train.best_metric=none"]), store, console=quiet())
    lines = [json.loads(x) for x in (store_dir / "runs/clf/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "f1" in r and "test_f1" not in r] == [2, 4]  # validation still runs
    assert not (store_dir / "runs/clf/best.json").exists() and store.best("clf") is None
    last = store.latest("clf")
    assert last.name == "step-000004" and store.resolve("clf") == last
    report = json.loads((store_dir / "runs/clf/test_metrics.json").read_text())
    assert report["checkpoint"] == str(last)


def test_a_resume_to_another_best_metric_forgets_the_old_best(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 60)
    store = Store(store_dir)
    finetune(build_recipe(raw_recipe(source, keep_last=1, max_steps=4), []), store, console=quiet())
    assert store.read_best("clf")["metric"] == "f1"
    # to none: best.json goes, so the run name means the latest checkpoint, as in a run made with none
    finetune(build_recipe(raw_recipe(source, keep_last=1, max_steps=6), ["train.best_metric=none"]), store,
             resume=True, allow_change=True, console=quiet())
    assert store.read_best("clf") is None and store.resolve("clf") == store.latest("clf")
    assert store.latest("clf").name == "step-000006"
    # to val_loss: the first evaluation after the switch is the best (a loss is never compared with an
    # F1), and patience counts from it
    finetune(build_recipe(raw_recipe(source, keep_last=1, max_steps=8), ["train.best_metric=val_loss"]), store,
             resume=True, allow_change=True, console=quiet())
    best = store.read_best("clf")
    assert best["metric"] == "val_loss" and best["step"] == 8
    meta = json.loads((store.latest("clf") / "meta.json").read_text())
    assert meta["metrics"]["val_loss"] == pytest.approx(best["value"])


def test_pooling_is_saved_and_average_last_averages_the_last_checkpoints(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 60)
    store = Store(store_dir)
    recipe = build_recipe(raw_recipe(source, keep_last=2), ["finetune.pooling=mean", "finetune.average_last=2",
                                                            "finetune.label_smoothing=0.1"])
    finetune(recipe, store, console=quiet())
    averaged = store.latest("clf-avg")
    assert averaged is not None and load_checkpoint(averaged).model.config.pooling == "mean"
    a, b = (load_file(str(store_dir / f"runs/clf/step-00000{s}/model.safetensors")) for s in (2, 4))
    mean = load_file(str(averaged / "model.safetensors"))
    assert all(torch.allclose(mean[k], (a[k] + b[k]) / 2, atol=1e-6) for k in mean)
    report = json.loads((store_dir / "runs/clf/test_metrics.json").read_text())
    assert report["checkpoint"] == str(averaged)  # the averaged model is the one scored


def test_average_last_needs_that_many_kept_checkpoints(tmp_path):
    with pytest.raises(RecipeError, match="finetune.average_last"):
        build_recipe(raw_recipe(tmp_path / "x.tsv", keep_last=1), ["finetune.average_last=3"])


# --- seeding ----------------------------------------------------------------------------------------------------
def test_lora_adapters_start_from_train_seed_whatever_drew_from_the_rng_before(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 40)
    store = Store(store_dir)

    def adapters(run: str, seed: int, noise: int) -> dict:
        torch.manual_seed(noise)  # whatever the process drew before (another run, a test, an import)
        recipe = build_recipe(raw_recipe(source, run=run, max_steps=2, seed=seed),
                              ["finetune.trainable=lora", "finetune.lora_rank=2", "finetune.lora_targets=[c_attn]"])
        finetune(recipe, store, console=quiet())
        weights = load_file(str(store.latest(run) / "model.safetensors"))
        return {k: v for k, v in weights.items() if "lora_" in k}

    first, again, other_seed = adapters("a", 0, noise=1), adapters("b", 0, noise=2), adapters("c", 1, noise=1)
    assert first and all(torch.equal(first[k], again[k]) for k in first)  # same seed: the same run
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


# --- data.lowercase ----------------------------------------------------------------------------------------------
def test_a_lowercased_tokenizer_reads_every_case_alike_and_keeps_it_when_saved(tokenizer, tmp_path):
    lower = tokenizer.lowercased()
    assert not tokenizer.lowercases and lower.lowercases
    assert tokenizer.encode("WIN Free CASH") != tokenizer.encode("win free cash")
    assert lower.encode("WIN Free CASH") == lower.encode("win free cash") == tokenizer.encode("win free cash")
    assert lower.fingerprint != tokenizer.fingerprint  # data tokenized by one is refused for the other
    assert lower.lowercased().fingerprint == lower.fingerprint  # a lowercased child fine-tuned again: no second one
    lower.save(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("CALL ME") == tokenizer.encode("call me")
    assert train_bpe(["Hello World hello world"] * 20, 280, lowercase=True).lowercases


def test_data_lowercase_fine_tunes_on_lowercased_text_and_the_classifier_keeps_it(tmp_path, store_dir, base, tokenizer):
    base_tokenizer = tokenizer
    rows = [(label, text.upper() if i % 3 == 0 else text) for i, (label, text) in enumerate(labeled_rows(60))]
    source = write_rows(tmp_path / "sms.tsv", rows)
    store = Store(store_dir)
    recipe = build_recipe(raw_recipe(source), ["data.lowercase=true"])
    finetune(recipe, store, console=quiet())
    child = load_checkpoint(store.latest("clf"))
    assert child.tokenizer.lowercases
    data = get_or_prepare(recipe, store, quiet())
    assert data.manifest["tokenizer_fingerprint"] == child.tokenizer.fingerprint
    train = data.records("train")
    shouted = [i for i, row in enumerate(train.texts()) if row["text"].isupper()]
    assert shouted  # the file's text is kept as read; its tokens are those of the lowercased text
    for i in shouted:
        assert list(train.example(i)) == base_tokenizer.encode(train.texts()[i]["text"].lower())
    # classify and evaluate lowercase their input through the saved tokenizer
    out = predict(child.model, child.tokenizer, ["WIN FREE CASH NOW", "win free cash now"])
    assert out[0]["probabilities"] == out[1]["probabilities"]


def test_a_resume_that_flips_lowercase_is_refused_even_when_changes_are_allowed(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 40)
    store = Store(store_dir)
    finetune(build_recipe(raw_recipe(source, max_steps=4), ["data.lowercase=true"]), store, console=quiet())
    run_dir = store.run_dir("clf")
    before = sorted(p.name for p in run_dir.iterdir())
    flipped = build_recipe(raw_recipe(source, max_steps=6), ["data.lowercase=false"])
    with pytest.raises(UserError, match="recipe differs"):
        finetune(flipped, store, resume=True, console=quiet())
    with pytest.raises(UserError, match="another tokenizer"):  # tokens of another text: never continued
        finetune(flipped, store, resume=True, allow_change=True, console=quiet())
    assert sorted(p.name for p in run_dir.iterdir()) == before  # the run is as it was


def test_lowercase_off_leaves_the_dataset_fingerprint_as_before(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 20)
    store = Store(store_dir)
    off, on = (build_recipe(raw_recipe(source), [f"data.lowercase={v}"]) for v in ("false", "true"))
    choice_off, choice_on = choose_tokenizer(off, store), choose_tokenizer(on, store)
    assert "lowercase" not in fingerprint_settings(off, choice_off)  # datasets prepared before keep theirs
    assert not choice_off.tokenizer.lowercases and choice_on.tokenizer.lowercases
    assert make_plan(off, store).fingerprint != make_plan(on, store).fingerprint


# --- cross-validation folds -----------------------------------------------------------------------------------
def check_folds(labels: list[str], texts: list[str], k: int, folds: np.ndarray) -> None:
    assert sorted(set(folds.tolist())) == list(range(k))
    for text in set(texts):  # every copy of a message in one fold
        assert len({int(folds[i]) for i, t in enumerate(texts) if t == text}) == 1
    largest = max(texts.count(t) for t in set(texts))
    for label in set(labels):
        counts = [sum(1 for i, l in enumerate(labels) if l == label and folds[i] == f) for f in range(k)]
        assert max(counts) - min(counts) <= largest, (label, counts)  # stratified: each fold ~1/k of the class


def test_folds_are_stratified_and_never_split_a_duplicate():
    rng = random.Random(3)
    texts, labels = [], []
    for i in range(300):
        label = "spam" if i % 7 == 0 else "ham"
        text = f"{label} {rng.randint(0, 120)}"  # many exact duplicates
        texts.append(text)
        labels.append(label)
    folds = stratified_folds(labels, texts, 5, seed=0)
    check_folds(labels, texts, 5, folds)
    assert np.array_equal(folds, stratified_folds(labels, texts, 5, seed=0))  # deterministic
    assert not np.array_equal(folds, stratified_folds(labels, texts, 5, seed=1))


def test_folds_of_the_real_sms_file(data_file):
    rows = [line.split("\t", 1) for line in data_file("sms_spam/SMSSpamCollection.tsv").read_text(
        encoding="utf-8").splitlines() if line]
    labels, texts = [r[0] for r in rows], [r[1] for r in rows]
    folds = stratified_folds(labels, texts, 5, seed=0)
    check_folds(labels, texts, 5, folds)
    assert len(texts) == 4738


# --- domain-adaptive pretraining: a stage that resumes exactly -------------------------------------------------
def dapt_yaml(tmp_path: Path, source: Path) -> Path:
    raw = raw_recipe(source, max_steps=6)
    raw["finetune"] = {"dapt_steps": 100, "dapt_lr": 1e-3}  # the kill lands at its step-10 checkpoint
    raw["train"].update(eval_every=3, save_every=10, log_every=10)
    path = tmp_path / "dapt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def dapt_figures(store: Path, run: str) -> list:
    lines = [json.loads(x) for x in (store / "runs" / run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("f1"), r.get("tokens")) for r in lines]


def test_dapt_runs_first_and_resumes_exactly_after_sigkill(tmp_path, tokenizer):
    source = write_tsv(tmp_path / "sms.tsv", 80)
    recipe = dapt_yaml(tmp_path, source)
    stores = {}
    for name in ("straight", "killed"):
        stores[name] = tmp_path / name
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
        save_checkpoint(Store(stores[name]), "base", 1, model, tokenizer, {"task": "pretrain"})
    done = subprocess.run(finetune_cli(recipe), capture_output=True, text=True,
                          env=env_for(stores["straight"]), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = stores["killed"]
    kill_once_written(finetune_cli(recipe), killed, killed / "runs/clf-dapt/step-000010")
    latest = Store(killed).latest("clf-dapt")
    assert latest is not None and latest.name != "step-000100", "the kill must land during DAPT"
    assert not Store(killed).checkpoints("clf")
    resumed = subprocess.run(finetune_cli(recipe, "--resume"), capture_output=True, text=True,
                             env=env_for(killed), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for run in ("clf-dapt", "clf"):  # the DAPT run and the classifier after it: every logged figure, bit for bit
        assert dapt_figures(killed, run) == dapt_figures(stores["straight"], run)
    a = load_file(str(stores["straight"] / "runs/clf/step-000006/model.safetensors"))
    b = load_file(str(killed / "runs/clf/step-000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    parent = load_checkpoint(killed / "runs/clf/step-000006").meta["parent"]
    assert "clf-dapt" in json.dumps(parent)  # the classifier starts from the adapted model

    # a second --resume with both runs finished skips DAPT and changes nothing
    again = subprocess.run(finetune_cli(recipe, "--resume"), capture_output=True, text=True,
                           env=env_for(killed), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert dapt_figures(killed, "clf-dapt") == dapt_figures(stores["straight"], "clf-dapt")


def test_dapt_lowers_the_language_model_loss_on_the_task_texts(tmp_path, store_dir, base):
    source = write_tsv(tmp_path / "sms.tsv", 80)
    raw = raw_recipe(source)
    raw["finetune"] = {"dapt_steps": 40}
    raw["train"]["eval_every"] = 5
    finetune(build_recipe(raw), Store(store_dir), console=quiet())
    lines = [json.loads(x) for x in (store_dir / "runs/clf-dapt/log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.5
