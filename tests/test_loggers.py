"""Experiment loggers (train.loggers): TensorBoard event files read back with TensorBoard's own reader,
W&B offline when it is installed, and the missing-package errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_module
from llmstages.config import build_recipe
from llmstages.errors import RecipeError, UserError
from llmstages.loggers import TENSORBOARD_DIR, open_loggers, require_packages, scalars
from llmstages.runlog import RunLog

SCRIPT = Path(__file__).parent / "scripts" / "train_synthetic.py"


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of `folder`, read with TensorBoard's EventAccumulator."""
    event_accumulator = need_module("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_runlog_hands_each_records_numbers_to_tensorboard(tmp_path):
    need_module("tensorboard")
    log = RunLog(tmp_path, open_loggers(["tensorboard"], tmp_path, "run", {"train": {"lr": 1e-3}}))
    log.write({"step": 5, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "mfu": float("nan")})
    log.write({"step": 10, "loss": 2.25, "val_loss": 2.75, "samples": [{"text": "hi"}], "skipped": 0})
    log.close()
    assert len(log.records()) == 2  # log.jsonl is written as before
    series = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert series["loss"] == [(5, 2.5), (10, 2.25)] and series["val_loss"] == [(10, 2.75)]
    assert series["lr"] == [(5, pytest.approx(1e-3))] and series["skipped"] == [(10, 0.0)]
    assert not {"grad_norm", "mfu", "samples", "step"} & set(series)  # None, NaN, lists and the step itself


def test_scalars_keeps_finite_numbers_only():
    assert scalars({"step": 3, "a": 1, "b": 2.5, "c": True, "d": None, "e": float("inf"), "f": "x"}) == \
        {"a": 1.0, "b": 2.5}


@pytest.mark.slow
def test_a_training_run_writes_its_log_to_tensorboard(tmp_path):
    need_module("tensorboard")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "10", "train.loggers=[tensorboard]"],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "syn"
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    series = tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    expected_loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in series["loss"]] == [s for s, _ in expected_loss] == [5, 10]
    assert [v for _, v in series["loss"]] == pytest.approx([v for _, v in expected_loss], rel=1e-6)
    assert [s for s, _ in series["val_loss"]] == [10]


def test_unknown_logger_is_a_recipe_error_with_a_suggestion():
    with pytest.raises(RecipeError) as err:
        build_recipe({"train": {"loggers": ["tensorbord"]}})
    assert "train.loggers" in str(err.value) and "did you mean `tensorboard`" in str(err.value)
    assert build_recipe({}, ["train.loggers=[tensorboard,wandb]"]).train.loggers == ["tensorboard", "wandb"]


def test_a_missing_logger_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError) as err:
        require_packages(["tensorboard", "wandb"] if real("tensorboard") else ["wandb"])
    assert "train.loggers names wandb" in err.value.message and "pip install wandb" in err.value.hint
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(UserError, match="tensorboard package is not installed"):
        open_loggers(["tensorboard"], tmp_path, "run", {})


@pytest.mark.slow
def test_wandb_offline_or_the_missing_package_error(tmp_path):
    """With wandb installed: an offline run under the run folder. Without: the run stops before it starts."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "5", "train.loggers=[wandb]",
                             "train.eval_every=5"], capture_output=True, text=True, env=env, timeout=300)
    run_dir = tmp_path / "runs" / "syn"
    if importlib.util.find_spec("wandb") is None:
        assert result.returncode == 2 and "wandb package is not installed" in result.stderr
        assert "Traceback" not in result.stderr
        assert not run_dir.exists()  # refused before the run folder was touched
        return
    assert result.returncode == 0, result.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_a_resume_ignores_recipe_differences_that_do_not_change_training():
    from llmstages.checkpoint import _harmless_change

    assert _harmless_change("train.loggers", [], ["tensorboard"])  # add TensorBoard to a running experiment
    assert _harmless_change("generate.stop", ["###"], [])  # generation defaults do not touch the weights
    assert _harmless_change("train.spike_max", None, 5)  # a recipe.yaml written before the field, default kept
    assert not _harmless_change("train.spike_max", None, 7)  # ... set to something else: a real change
    assert not _harmless_change("train.lr", 1e-3, 2e-3)
