"""Device, precision and MFU-peak choices, including the CUDA branches (faked: these machines have no GPU)."""

import builtins
import contextlib
import math

import pytest
import torch

from llmstages import runtime
from llmstages.errors import UserError


def test_cuda_asked_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="train.device=cuda but no CUDA device is available"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("flags,measured,fast", [
    ("fpu sse avx512f", True, False), ("fpu avx512_bf16", True, True), ("amx_bf16 x", True, True),
    ("fpu avx512_bf16", False, False)])  # the flag, but bf16 matmuls slower than fp32 here (seen on a VM)
def test_fast_bf16_needs_the_cpu_flag_and_a_faster_matmul(monkeypatch, tmp_path, flags, measured, fast):
    monkeypatch.setattr(runtime, "bf16_matmul_is_faster", lambda: measured)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        assert runtime.cpu_has_fast_bf16() is fast
        assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if fast else "fp32")
    finally:
        runtime.cpu_has_fast_bf16.cache_clear()


def test_no_cpuinfo_means_no_fast_bf16_except_on_apple_silicon(monkeypatch):
    def no_file(path, *a, **k):
        raise OSError("no /proc here")
    monkeypatch.setattr(builtins, "open", no_file)
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        assert runtime.cpu_has_fast_bf16() is (runtime.sys.platform == "darwin")
    finally:
        runtime.cpu_has_fast_bf16.cache_clear()


def test_precision_on_cuda_follows_the_card(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert runtime.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve_precision("auto", cuda) == "fp32"
    assert runtime.resolve_precision("bf16", cuda) == "bf16"  # an explicit choice is kept


def test_the_matmul_race_runs():
    assert runtime.bf16_matmul_is_faster(64) in (True, False)


def test_autocast_only_for_bf16():
    assert isinstance(runtime.autocast(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    with runtime.autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("card,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "fp32", 989e12 / 2),
    ("NVIDIA L40S", "bf16", 362e12),  # not the L4's figure: the longer name is tried first
    ("NVIDIA L4", "bf16", 121e12), ("Some Future Card", "bf16", float("nan"))])
def test_gpu_peak_comes_from_the_card_name(monkeypatch, card, precision, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    runtime.peak_flops.cache_clear()
    try:
        got = runtime.peak_flops(torch.device("cuda"), precision)
    finally:
        runtime.peak_flops.cache_clear()
    assert (math.isnan(got) and math.isnan(peak)) or got == peak


def test_cpu_peak_is_measured_and_memory_is_reported(monkeypatch):
    assert runtime.peak_flops(torch.device("cpu"), "fp32") > 1e8  # a measured matmul rate, FLOP/s
    assert runtime.peak_rss_mb() > 10 and runtime.peak_device_mb(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 << 20)
    assert runtime.peak_device_mb(torch.device("cuda")) == 3.0


def test_threads_follow_the_cores_per_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = torch.get_num_threads()
    try:
        cores = len(runtime.os.sched_getaffinity(0))
        assert runtime.set_threads() == max(1, cores // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
