"""Shared fixtures. Real data comes from $LLMSTAGES_TEST_DATA (default ../shared/data).

A test that needs a data file asks for it with `data_file("sms_spam/SMSSpamCollection.tsv")`.
Locally a missing file skips the test; with LLMSTAGES_REQUIRE_TEST_DATA=1 (CI) it fails instead.
An optional test dependency (the dev extra: transformers, ...) is imported with `need_module("transformers")`:
locally a missing package skips; with LLMSTAGES_REQUIRE_TEST_DEPS=1 (CI) it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("LLMSTAGES_TEST_DATA", REPO.parent / "shared" / "data"))
REQUIRE_DATA = os.environ.get("LLMSTAGES_REQUIRE_TEST_DATA") == "1"
REQUIRE_DEPS = os.environ.get("LLMSTAGES_REQUIRE_TEST_DEPS") == "1"


def need_data(relative: str) -> Path:
    path = DATA_ROOT / relative
    if not path.exists():
        message = f"test data {path} is missing (set LLMSTAGES_TEST_DATA)"
        if REQUIRE_DATA:
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_module(name: str):
    """Import `name`, or skip (fail under LLMSTAGES_REQUIRE_TEST_DEPS=1) when it is not installed.

    Usable at module level (it skips the whole module) and inside a test.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        message = f"test dependency {name!r} is missing ({err}); install the dev extra: pip install -e '.[dev]'"
        if REQUIRE_DEPS:
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


# Two implementations of the same network (ours and transformers') are compared in float64: in float32
# their kernels round differently from one CPU to another (vector width, attention's fast exp), by up to
# ~3e-5 on logits of size ~2. In float64 the kernels agree to ~1e-14; what is left is float32 rounding
# that both sides keep on purpose: the rotary cos/sin tables (computed in float32 by each) and an
# export's merged LoRA weights (stored in float32), ~2e-7 on the logits. A wrong weight mapping moves
# them by ~1e-1, so this bound is tighter than the float32 one and the same on every machine.
FP64_TOL = 1e-6


@contextlib.contextmanager
def float64(*modules) -> Iterator[None]:
    """Run `modules` in float64 inside the block (no_grad), back in float32 after it (an exact round trip)."""
    import torch
    for module in modules:
        module.double()
    try:
        with torch.no_grad():
            yield
    finally:
        for module in modules:
            module.float()


@pytest.fixture
def data_file():
    """data_file("the-verdict.txt") -> Path into the shared data folder (skip or fail when missing)."""
    return need_data


@pytest.fixture
def gpt2_tokenizer_dir() -> Path:
    return need_data("gpt2-tokenizer")


@pytest.fixture
def store_dir(tmp_path, monkeypatch) -> Path:
    """An empty store for this test, also set as $LLMSTAGES_STORE for CLI calls."""
    root = tmp_path / "store"
    monkeypatch.setenv("LLMSTAGES_STORE", str(root))
    return root


def run_cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m llmstages ARGS` in a real subprocess; returns the completed process (text mode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "llmstages", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli
