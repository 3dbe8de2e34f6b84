"""Browsing the store (`runs`, `show`, `recipes`, `--help`): no torch imported, whole run names in a pipe,
`show` names the dataset and the steps that exist, lineage that survives copying the store.

The checkpoints here are written without torch (meta.json + model.json committed with a MANIFEST), which
is all that browsing reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmstages.ckptmeta import lineage, parent_record
from llmstages.store import Store

LONG = "a-rather-long-run-name-that-a-table-would-cut-in-a-pipe-" + "x" * 40
FINGERPRINT = "0123456789abcdef" * 4
MODEL_JSON = {"vocab_size": 300, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128,
              "lora_rank": 0, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ["attn.c_attn"]}


def fake_checkpoint(store: Store, run: str, step: int, meta: dict, model: dict | None = None) -> Path:
    """A committed checkpoint folder with only the JSON files that browsing reads."""
    with store.commit(run, step) as tmp:
        (tmp / "meta.json").write_text(json.dumps(dict(meta, run=run, step=step)))
        (tmp / "model.json").write_text(json.dumps(model or MODEL_JSON))
    return store.run_dir(run) / f"step-{step:06d}"


@pytest.fixture
def browse_store(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    base = fake_checkpoint(store, "base", 10, {"task": "pretrain", "metrics": {"val_loss": 5.5}})
    fake_checkpoint(store, "base", 20, {"task": "pretrain"})
    (store.data_dir(f"spam-{FINGERPRINT[:12]}")).mkdir(parents=True)
    parent = parent_record("base@10", {"task": "pretrain", "step": 10}, base, store.root)
    fake_checkpoint(store, LONG, 5, {"task": "classify", "parent": parent, "data_fingerprint": FINGERPRINT,
                                     "data_settings": {"source": ["sms.tsv"]}})
    (store.run_dir(LONG) / "log.jsonl").write_text(json.dumps({"step": 5, "loss": 0.25}) + "\n")
    return store


def browse(store: Store, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`llmstages ARGS` in a subprocess (stdout a pipe) that then prints the torch-like modules it imported."""
    code = ("import sys\nfrom llmstages.cli import main\ncode = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors', 'numpy'))\n"
            "print('HEAVY=' + ','.join(heavy[:5]), file=sys.stderr)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, "--store", str(store.root), *args], capture_output=True,
                          text=True, env=dict(os.environ, COLUMNS="80", **(env or {})), timeout=120)


@pytest.mark.parametrize("args", [["runs"], ["runs", "--json"], ["show", "base"], ["show", LONG, "--json"],
                                  ["recipes"], ["--help"], ["evaluate", "--help"], ["show", "base@999"]])
def test_browsing_never_imports_torch(browse_store, args):
    result = browse(browse_store, *args)
    assert result.returncode == (2 if "@999" in args[-1] else 0), result.stderr
    assert "HEAVY=\n" in result.stderr, result.stderr[-500:]  # not torch, nor numpy or safetensors


def test_runs_in_a_pipe_are_plain_rows_with_whole_names(browse_store):
    result = browse(browse_store, "runs")
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["run", "task", "checkpoints", "last step", "best", "last log"]
    assert [r[:4] for r in rows[1:]] == [[LONG, "classify", "1", "5"], ["base", "pretrain", "2", "20"]]
    assert rows[1][4:] == ["-", "step=5  loss=0.25"]
    data = json.loads(browse(browse_store, "runs", "--json").stdout)
    assert data["store"] == str(browse_store.root)
    assert data["runs"][0] == {"run": LONG, "task": "classify", "checkpoints": 1, "last_step": 5, "best": None,
                               "last_log": {"step": 5, "loss": 0.25}}


def test_show_names_the_dataset_and_leaves_out_lora_fields_of_a_model_without_lora(browse_store):
    out = browse(browse_store, "show", LONG).stdout
    assert f"data: data/spam-{FINGERPRINT[:12]}  source: sms.tsv" in out
    assert "n_layer" in out and "lora" not in out
    lora = dict(MODEL_JSON, lora_rank=8)
    fake_checkpoint(browse_store, "adapted", 1, {"task": "instruct"}, model=lora)
    out = browse(browse_store, "show", "adapted").stdout
    assert "lora_rank" in out and "lora_alpha" in out and "data:" not in out  # no dataset recorded


def test_show_at_a_missing_step_lists_the_steps_that_exist(browse_store):
    result = browse(browse_store, "show", "base@999")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "no committed checkpoint at step 999" in text and "its checkpoints are at steps 10, 20" in text


def test_lineage_is_stored_relative_to_the_store_and_survives_copying_it(browse_store, tmp_path):
    child = browse_store.run_dir(LONG) / "step-000005"
    recorded = json.loads((child / "meta.json").read_text())["parent"]
    assert recorded["path"] == "runs/base/step-000010"  # not an absolute path into this store
    copy = Store(tmp_path / "copied")
    shutil.copytree(browse_store.root, copy.root)
    shutil.rmtree(browse_store.root)  # the original is gone: only the copy can answer
    chain = lineage(copy.run_dir(LONG) / "step-000005", copy)
    assert [(c["task"], c["step"]) for c in chain] == [("classify", 5), ("pretrain", 10)]
    assert chain[1]["ref"] == str(copy.root / "runs/base/step-000010")
    out = browse(copy, "show", LONG).stdout
    assert "(not found)" not in out and "runs/base/step-000010  task=pretrain step=10" in out


def test_a_parent_outside_the_store_keeps_its_absolute_path(tmp_path):
    other = fake_checkpoint(Store(tmp_path / "other"), "base", 1, {"task": "pretrain"})
    record = parent_record("x", {"task": "pretrain", "step": 1}, other, tmp_path / "store")
    assert record["path"] == str(other.resolve())
