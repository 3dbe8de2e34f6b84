"""Scale-out with torch.distributed: the same command runs one process or many under `torchrun`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; we then join a process group (nccl on CUDA, gloo on
CPU), each rank takes its share of the micro-batches, DDP averages gradients (or FSDP shards the
model: train.strategy, fsdp.py), and rank 0 alone writes the store (an FSDP checkpoint's optimizer
shards excepted: every rank writes its own into the folder rank 0 commits).

Several machines: torchrun --nnodes N --node_rank R --rdzv-endpoint HOST:PORT on each (README). Every
process reads the store (prepared data, checkpoints to resume from), so it must be one shared
filesystem; `check_shared_store` makes sure of it before anything is trained.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

from llmstages.errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank (e.g. a stop request)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the mean of `tensor` over all ranks (a no-op on one process)."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the largest value of `tensor` over all ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def wrap(self, model: nn.Module, device: torch.device, *, strategy: str = "ddp", precision: str = "fp32",
             compile: bool = False) -> nn.Module:
        """The model as the training step calls it. One process: as it is (compiled if asked). ddp: a
        DDP wrapper around it. fsdp: `model` itself, sharded in place (fsdp.py), then compiled if asked."""
        if self.enabled and strategy == "fsdp":
            from llmstages.fsdp import shard
            model = shard(model, device, precision)
            return torch.compile(model) if compile else model
        model = torch.compile(model) if compile else model
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def grad_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients only on the last micro-step of an accumulation (no_sync before it).
        FSDP reduce-scatters every micro-step: sharded gradients accumulate, no full copy is kept."""
        if self.enabled and not last_micro_step and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process (known before any process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; a torchrun worker (WORLD_SIZE > 1) skips the interpreter's teardown.

    A gloo worker thread lets go of a finished collective's tensors a moment after the collective has
    returned, and that takes the GIL. If the interpreter is tearing down by then, Python stops that
    thread in a way that aborts the process ("terminate called without an active exception"): a rank
    that had finished and committed its checkpoint was reported failed, and torchrun failed the job
    (seen in CI on busy hosts). The commands close and flush everything they write before they return,
    so a worker flushes stdout and stderr and ends with os._exit.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                pass
        os._exit(code)
    sys.exit(code)


def init_distributed(device_name: str) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun; returns the context and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return DistContext(rank, local_rank, world), f"cuda:{local_rank}"
    return DistContext(rank, local_rank, world), "cpu"


def check_shared_store(dctx: DistContext, root: Path, wait_s: float = 10.0) -> None:
    """Every rank: refuse a store that is not one filesystem for the whole job. Rank 0 writes a file
    with a fresh nonce into the store; every rank must read it back (a shared filesystem may show a new
    file late: each tries for up to `wait_s` seconds)."""
    if not dctx.enabled:
        return
    nonce = [uuid.uuid4().hex if dctx.is_main else None]
    dist.broadcast_object_list(nonce, src=0)
    probe = Path(root) / f".shared-check-{nonce[0]}"
    if dctx.is_main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce[0])
    dctx.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := _reads(probe, nonce[0])) and time.monotonic() < deadline:
        time.sleep(0.2)
    found: list = [None] * dctx.world_size
    dist.all_gather_object(found, (seen, dctx.rank, socket.gethostname(), str(Path(root).resolve())))
    if dctx.is_main:
        probe.unlink(missing_ok=True)
    blind = [(rank, host, path) for seen, rank, host, path in found if not seen]
    if blind:
        where = ", ".join(f"rank {rank} on {host} (store {path})" for rank, host, path in blind)
        raise UserError(f"the store is not one filesystem shared by every process: {where} cannot read the file "
                        f"{probe.name} that rank 0 on {found[0][2]} wrote into {found[0][3]}",
                        hint="put the store on a filesystem every node mounts at the same path (NFS, Lustre, "
                             "...) and pass it to every node: --store DIR or $LLMSTAGES_STORE")


def _reads(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False
