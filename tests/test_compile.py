"""torch.compile in the training loop (train.compile): compiled runs train like eager ones.

Kept apart from test_loop.py: inductor's compilation makes these two of the slowest tests, and in a
file of their own they can run on one xdist worker while test_loop.py runs on the other (--dist loadfile).
Both use a one-layer model: inductor compiles each block's kernels, so one layer compiles in about
two thirds of the two-layer time and still runs every kind of kernel the loop has.
"""

import subprocess
import sys

import pytest

from llmstages.checkpoint import load_checkpoint
from llmstages.store import Store
from test_loop import ENV, SCRIPT, run, short_losses

ONE_LAYER = "model.n_layer=1"


def compiled(store, steps, *args):
    """The synthetic run with train.compile=true, inductor's cache in the run's folder (one compile thread:
    the other xdist worker has the other core)."""
    return subprocess.run([sys.executable, str(SCRIPT), str(store), str(steps), *args, "train.compile=true"],
                          capture_output=True, text=True, timeout=900,
                          env=dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(store / "inductor"),
                                   TORCHINDUCTOR_COMPILE_THREADS="1"))


def test_torch_compile_in_the_loop(tmp_path):
    # two steps, no evaluation in between (a mode switch would compile again), one log at step 2
    args = [ONE_LAYER, "train.precision=fp32", "train.eval_every=0", "train.log_every=2"]
    eager = run(tmp_path / "eager", 2, *args)
    assert eager.returncode == 0, eager.stderr[-3000:]
    result = compiled(tmp_path / "compiled", 2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any((tmp_path / "compiled" / "inductor").rglob("*.py")), "nothing was compiled"  # generated kernels
    # dropout masks come from inductor's own RNG, so only closeness to eager fp32 can be asserted
    assert short_losses(tmp_path / "compiled") == pytest.approx(short_losses(tmp_path / "eager"), rel=0.03)
    ckpt = load_checkpoint("syn", Store(tmp_path / "compiled"))
    assert ckpt.meta["step"] == 2 and ckpt.model.config.n_layer == 1  # saved from the uncompiled module


def test_adversarial_training_under_torch_compile(tmp_path):
    """The push enters the compiled model as an input (embedding_offset): same losses as eager."""
    args = [ONE_LAYER, "--classify", "finetune.adversarial_eps=0.5", "train.precision=fp32", "train.eval_every=0",
            "train.log_every=2"]
    eager = run(tmp_path / "eager", 2, *args)
    assert eager.returncode == 0, eager.stderr[-3000:]
    result = compiled(tmp_path / "compiled", 2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    # dropout masks come from inductor's own RNG, so only closeness to eager can be asserted
    assert short_losses(tmp_path / "compiled") == pytest.approx(short_losses(tmp_path / "eager"), rel=0.05)
