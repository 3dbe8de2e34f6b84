"""The demo pipeline (`make demo`) on its cut-down recipe, so the main job can never silently break."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DATA_ROOT, need_data


def test_demo_smoke_runs_every_stage(tmp_path):
    need_data("gutenberg/pg11_alice_in_wonderland.txt")
    need_data("sms_spam/SMSSpamCollection.tsv")
    need_data("instruction-data.json")
    env = dict(os.environ, LLMSTAGES_DATA=str(DATA_ROOT), PYTHONUNBUFFERED="1", COLUMNS="160")
    result = subprocess.run([sys.executable, "-m", "llmstages.demo", "--smoke", "--store", str(tmp_path / "store")],
                            capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # nothing written outside the demo's store
    published = subprocess.run([sys.executable, "-m", "llmstages.demo", "--store", str(tmp_path / "store"),
                                "--publish", str(tmp_path / "docs")], capture_output=True, text=True, env=env,
                               timeout=120, cwd=tmp_path)
    assert published.returncode == 0, published.stderr
    assert (tmp_path / "docs" / "demo-results-smoke.json").read_bytes() == \
        (tmp_path / "store" / "demo-results.json").read_bytes()
    for command in ("llmstages prepare quickstart", "llmstages pretrain quickstart", "llmstages finetune --task spam",
                    "llmstages finetune --task instruct", "llmstages evaluate", "llmstages classify"):
        assert command in result.stderr  # each stage shown as the command a user types
    figures = json.loads((tmp_path / "docs" / "demo-results-smoke.json").read_text())
    assert figures["precision"]["precision"] in ("fp32", "bf16")  # the figures say which precision made them
    runs = tmp_path / "store" / "runs"
    # The reported figures are the ones the stages wrote (not ranges a wrong figure would also fall in).
    last_eval = [r for r in map(json.loads, (runs / "quickstart/log.jsonl").read_text().splitlines())
                 if "val_bpb" in r][-1]
    assert figures["base"]["val_bpb"] == last_eval["val_bpb"] and figures["base"]["step"] == last_eval["step"] == 20
    test = json.loads((runs / "finetune-spam/test_metrics.json").read_text())
    spam = figures["spam"]
    assert spam["confusion"] == test["confusion"] and spam["test_accuracy"] == test["accuracy"]
    (tn, fp), (fn, tp) = spam["confusion"]
    assert [tn + fp, fn + tp] == [615, 95]  # the stratified test split: 15% of each class
    assert spam["test_accuracy"] == pytest.approx((tn + tp) / 710)
    assert spam["test_spam_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    inst = figures["instruct"]
    assert inst["examples"] == 10 and inst["response_loss_before"] != inst["response_loss_after"]
    assert all(0 < inst[k] < 20 for k in ("response_loss_before", "response_loss_after"))
    assert figures["generate_tokens_per_s"] > 0 and figures["samples"]["generate"]
    classified = json.loads(figures["samples"]["classify"])["predictions"]
    assert len(classified) >= 2 and all(p["label"] in ("ham", "spam") for p in classified)
    assert set(figures["stage_seconds"]) >= {"prepare", "pretrain", "finetune spam", "finetune instruct"}
    assert (tmp_path / "docs" / "quickstart-loss-smoke.png").exists()
    assert "llmstages demo" in result.stderr  # the results table


def test_demo_never_empties_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "store"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "llmstages.demo", "--store", str(mine)],
                            capture_output=True, text=True, env=dict(os.environ, COLUMNS="160"), timeout=120)
    assert result.returncode == 2 and "not a store the demo made" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_publish_copies_the_last_results_and_refuses_a_store_without_them(tmp_path):
    store, docs = tmp_path / "store-demo", tmp_path / "docs"
    env = dict(os.environ, COLUMNS="160")
    publish = [sys.executable, "-m", "llmstages.demo", "--store", str(store), "--publish", str(docs)]
    missing = subprocess.run(publish, capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "demo-results.json does not exist" in missing.stderr and not docs.exists()
    (store / "runs" / "quickstart").mkdir(parents=True)
    (store / "demo-results.json").write_text(json.dumps({"smoke": False, "total_seconds": 1.0}))
    (store / "runs" / "quickstart" / "loss.png").write_bytes(b"png")
    done = subprocess.run(publish, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((docs / "demo-results.json").read_text())["total_seconds"] == 1.0  # the full demo's names
    assert (docs / "quickstart-loss.png").read_bytes() == b"png"
