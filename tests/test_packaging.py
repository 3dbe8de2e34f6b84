"""A regular (non-editable) install works: the wheel ships the built-in recipes as package data, and the
installed `llmstages` lists them and plans a run from a folder that is not the source tree.

The wheel is built offline from a copy of the sources (`pip wheel --no-deps --no-build-isolation`, with
the setuptools of this environment) and installed into a fresh venv that sees this environment's
packages through a .pth line (torch is not installed again), but not its editable llmstages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

SOURCES = ("llmstages", "recipes", "pyproject.toml", "README.md")


def run(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            env=env or dict(os.environ))
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (a build/ folder in the checkout could hold stale files)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_symlink():
            os.symlink(os.readlink(path), src / name)
        elif path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", out, src, cwd=src)
    [built] = out.glob("llmstages-*.whl")
    return built


def test_the_wheel_ships_every_builtin_recipe_and_an_spdx_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("llmstages/recipes/") and n.endswith(".yaml"))
    assert shipped == sorted(p.name for p in (REPO / "llmstages" / "recipes").glob("*.yaml")) and shipped
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.slow
def test_an_installed_wheel_lists_recipes_and_plans_a_run_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    # torch, typer, ... from this environment: a plain path line (its .pth files, among them the editable
    # install of llmstages, are not run), after the venv's own site-packages where the wheel goes
    (site / "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLMSTAGES_STORE", "LLMSTAGES_DATA")}
    env.update(COLUMNS="200", OMP_NUM_THREADS="1")
    cli = venv / "bin" / "llmstages"
    where = run(py, "-c", "import llmstages; print(llmstages.__file__)", cwd=work, env=env).stdout
    assert where.startswith(str(site)), where  # the installed package, not the source tree
    listed = run(cli, "recipes", cwd=work, env=env).stdout
    for name in ("quickstart", "shakespeare", "finetune-spam", "finetune-instruct"):
        assert f"│ {name} " in listed, listed
    (work / "tiny.txt").write_text("the king shall speak of love and war to thee my lord\n" * 400)
    dry = run(cli, "pretrain", "shakespeare", "data.source=tiny.txt", "data.sha256=", "data.mirror=",
              "data.vocab_size=300", "model.size=tiny", "model.block_size=32", "train.max_steps=2",
              "train.micro_batch_size=2", "train.global_batch_size=2", "--dry-run", cwd=work, env=env, timeout=600)
    assert "parameters" in dry.stdout + dry.stderr
    assert not (work / "store" / "runs").exists()  # planned, not trained
