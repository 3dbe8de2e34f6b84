"""torch.compile in the training loop (train.compile): compiled runs train like eager ones.

Kept apart from test_loop.py: inductor's compilation makes these two of the slowest tests, and in a
file of their own they can run on one xdist worker while test_loop.py runs on the other (--dist loadfile).
"""

import subprocess
import sys

import pytest

from llmstages.checkpoint import load_checkpoint
from llmstages.store import Store
from test_loop import ENV, SCRIPT, fp32_run, run, short_losses  # noqa: F401 (fp32_run is a fixture)


def test_torch_compile_in_the_loop(tmp_path, fp32_run):
    cache = tmp_path / "inductor"
    # two steps, no evaluation in between (a mode switch would compile again): the first log step of fp32_run
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2", "train.precision=fp32",
                             "train.compile=true", "train.eval_every=0", "train.log_every=2"],
                            capture_output=True, text=True, timeout=900,
                            env=dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(cache), TORCHINDUCTOR_COMPILE_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(cache.rglob("*.py")), "nothing was compiled"  # inductor wrote the generated kernels
    # dropout masks come from inductor's own RNG, so only closeness to eager fp32 can be asserted
    assert short_losses(tmp_path) == pytest.approx(short_losses(fp32_run)[:1], rel=0.03)
    assert load_checkpoint("syn", Store(tmp_path)).meta["step"] == 2  # saved from the uncompiled module


def test_adversarial_training_under_torch_compile(tmp_path):
    """The push enters the compiled model as an input (embedding_offset): same losses as eager."""
    args = ["--classify", "finetune.adversarial_eps=0.5", "train.precision=fp32", "train.eval_every=0",
            "train.log_every=2"]
    eager = run(tmp_path / "eager", 2, *args)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "compiled"), "2", *args,
                               "train.compile=true"],
                              capture_output=True, text=True, timeout=900,
                              env=dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
                                       TORCHINDUCTOR_COMPILE_THREADS="1"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    # dropout masks come from inductor's own RNG, so only closeness to eager can be asserted
    assert short_losses(tmp_path / "compiled") == pytest.approx(short_losses(tmp_path / "eager"), rel=0.05)
