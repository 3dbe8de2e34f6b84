"""The demo pipeline (`make demo`) on its cut-down recipe, so the main job can never silently break."""

import json
import os
import subprocess
import sys

from conftest import DATA_ROOT, need_data


def test_demo_smoke_runs_every_stage(tmp_path):
    need_data("gutenberg/pg11_alice_in_wonderland.txt")
    need_data("sms_spam/SMSSpamCollection.tsv")
    need_data("instruction-data.json")
    env = dict(os.environ, LLMSTAGES_DATA=str(DATA_ROOT), PYTHONUNBUFFERED="1", COLUMNS="160")
    result = subprocess.run([sys.executable, "-m", "llmstages.demo", "--smoke", "--store", str(tmp_path / "store"),
                             "--docs", str(tmp_path / "docs")], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for command in ("llmstages prepare quickstart", "llmstages pretrain quickstart", "llmstages finetune --task spam",
                    "llmstages finetune --task instruct", "llmstages evaluate", "llmstages classify"):
        assert command in result.stderr  # each stage shown as the command a user types
    figures = json.loads((tmp_path / "docs" / "demo-results-smoke.json").read_text())
    assert 0 < figures["base"]["val_bpb"] < 10
    assert 0 <= figures["spam"]["test_accuracy"] <= 1 and 0 <= figures["spam"]["test_spam_f1"] <= 1
    assert figures["instruct"]["response_loss_after"] > 0 and figures["instruct"]["response_loss_before"] > 0
    assert figures["generate_tokens_per_s"] > 0
    assert set(figures["stage_seconds"]) >= {"prepare", "pretrain", "finetune spam", "finetune instruct"}
    assert (tmp_path / "docs" / "quickstart-loss-smoke.png").exists()
    assert "llmstages demo" in result.stderr  # the results table


def test_demo_never_empties_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "store"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "llmstages.demo", "--store", str(mine), "--docs", ""],
                            capture_output=True, text=True, env=dict(os.environ, COLUMNS="160"), timeout=120)
    assert result.returncode == 2 and "not a store the demo made" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
