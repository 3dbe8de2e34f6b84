"""Where and how the model runs: device, precision, autocast, threads, peak memory.

bf16 is used only where it is fast: CUDA devices that support it, and CPUs with native bf16 matmul
(avx512_bf16 or AMX). On a CPU without them bf16 is emulated and several times slower than fp32,
so `precision: auto` chooses fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys

import torch

from llmstages.errors import UserError


def resolve_device(name: str = "auto", setting: str = "train.device") -> torch.device:
    """auto: the CUDA GPU when there is one, else the CPU. `setting` names where `name` came from, for errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{setting}={name} but no CUDA device is available", hint=f"use {setting}=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{setting}={name} is not a device", hint=f"use {setting}=auto, cpu or cuda") from None


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (avx512_bf16, or AMX tiles) and they are faster here.

    The flags alone are not enough: a VM can list avx512_bf16 and still run bf16 matmuls slower than
    fp32 (measured 4.5x slower training on one), so a short matmul race decides as well.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return sys.platform == "darwin" and os.uname().machine == "arm64"  # Apple silicon has bf16
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and bf16_matmul_is_faster()


def bf16_matmul_is_faster(n: int = 512, trials: int = 9) -> bool:
    """bf16 (n, n) matmuls under 0.8x the fp32 time, each dtype's best of `trials` (~0.1 s to find out).

    One thread, and the trials alternate between the dtypes, so another process taking the cores for a
    moment slows both alike: measured one dtype after the other on two threads, a busy host made bf16
    look faster here one time in four (the threaded fp32 matmul waited for a descheduled thread).
    """
    import time

    pairs = {dtype: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in pairs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core speed: a multi-threaded matmul waits for a thread the host descheduled
    try:
        for trial in range(trials + 1):
            for dtype, (a, b) in pairs.items():
                start = time.perf_counter()
                a @ b
                if trial:  # the first round warms up
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] < 0.8 * best[torch.float32]


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for this device; 'auto' picks bf16 only where it is fast."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 for matmuls (weights and optimizer stay fp32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads() -> int:
    """Use one intra-op thread per core available to this process (and per process under torchrun)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return threads


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def peak_device_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 20)
    return None


# Dense bf16 peak of common accelerators (FLOP/s, without sparsity), for MFU on CUDA.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


@functools.cache
def peak_flops(device: torch.device, precision: str) -> float:
    """The FLOP/s that MFU is measured against.

    CUDA: the datasheet dense peak for known cards (bf16; fp32 runs on TF32 tensor cores at half that).
    CPU: measured here and now as the best of a few 1024x1024 matmuls in the training dtype, so the
    figure says how much of *this* machine's matmul speed the model reaches.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in sorted(GPU_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):  # "L40S" is not "L4"
            if key in name:
                return value if precision == "bf16" else value / 2
        return float("nan")
    import time
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best
