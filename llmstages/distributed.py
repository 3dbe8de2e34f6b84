"""Scale-out with torch.distributed: the same command runs one process or many under `torchrun`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; we then join a process group (nccl on CUDA, gloo on
CPU), each rank takes its share of the micro-batches, DDP averages gradients, and rank 0 alone
writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


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

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as the training step calls it: DDP-wrapped under torchrun, else as it is."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def grad_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients only on the last micro-step of an accumulation (no_sync before it)."""
        if self.enabled and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process (known before any process group exists)."""
    return os.environ.get("RANK", "0") == "0"


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
