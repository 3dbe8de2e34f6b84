"""train.strategy: fsdp. PyTorch FSDP2 sharding, and the sharded part of a checkpoint.

Sharding (`shard`): `fully_shard` on every block, then on the whole model (the embeddings, the final
norm and the head make the root unit). Each of N processes keeps 1/N of every weight (rows, dim 0),
of its gradient and of its AdamW moments, as DTensors. A unit's weights are all-gathered just before
its forward (and again before its backward) and freed after; its gradients are reduce-scattered
(averaged over the processes). Under bf16 the gathered weights are bf16 and the gradients are
averaged in fp32 (MixedPrecisionPolicy); the sharded master weights stay fp32.

A checkpoint of an fsdp run holds (checkpoint.py writes the files every checkpoint has):

    model.safetensors   the full weights, gathered on rank 0: generate, export and verify read one
                        file whatever wrote it
    optimizer/          the optimizer state as torch.distributed.checkpoint (DCP) writes it: every
                        rank its own shards (__R_0.distcp), rank 0 the index (.metadata); keyed by
                        parameter name, so another number of processes (or one) reads it back resharded
    train_state.pt      the RNG states and the loss window, without the optimizer

It goes through the store's commit like any checkpoint: rank 0 opens the temporary folder, the other
ranks learn its path, every rank writes its shards into it, and rank 0 writes MANIFEST last (after
DCP has collected every rank's write) and renames it into place.

Loading never runs code from the checkpoint: DCP's own reader would unpickle its index freely and
load non-tensor values without weights_only, so `_Reader` reads the index through an allow-list
unpickler (DCP's metadata classes only) and `_Planner` loads those values with weights_only=True
(tests/test_fsdp.py refuses an index that asks for code).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # dcp_to_torch_save's reader
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from llmstages.errors import UserError
from llmstages.model import GPT
from llmstages.optim import Optimizers
from llmstages.weights import nonfinite

OPTIMIZER_DIR = "optimizer"


# ---------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------
def shard(model: GPT, device: torch.device, precision: str) -> GPT:
    """Shard `model` in place over every process of the job (the process group exists); returns it."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the stages call the model itself (forward), never its parts
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: GPT) -> dict[str, torch.Tensor]:
    """The whole weights as `GPT.state_for_saving` gives them (a tied head left out), on the CPU.

    A sharded model: every rank must call this (one all-gather per unit); rank 0 gets the weights,
    the other ranks {}."""
    if not is_sharded(model):
        return {k: v.cpu() for k, v in model.state_for_saving().items()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = not model.is_classifier and model.config.tie_embeddings
    return {k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def plain_copy(model: GPT, device: torch.device) -> GPT | None:
    """A whole, unsharded copy of a sharded `model` on rank 0 (None on the others; every rank calls it),
    e.g. to sample from on one rank; an unsharded model is returned as it is."""
    if not is_sharded(model):
        return model
    state = full_state(model)
    if dist.get_rank() != 0:
        return None
    copy = GPT(model.config)
    copy.load_saved_state(state)
    return copy.to(device).train(model.training)


# ---------------------------------------------------------------------------------------------------
# the sharded optimizer state
# ---------------------------------------------------------------------------------------------------
def optimizer_state(model: GPT, optimizer: Optimizers) -> dict:
    """{optimizer name: its state keyed by parameter name}; sharded tensors stay sharded.

    For an optimizer that has not stepped yet, torch builds the state first (a step with lr 0), so
    that the result can be the template DCP loads into; no gradient may exist then."""
    return {name: get_optimizer_state_dict(model, opt) for name, opt in optimizer.named.items()}


def save_optimizer(tmp: Path | None, model: GPT, optimizer: Optimizers) -> None:
    """Every rank calls this: rank 0 with the temporary checkpoint folder, the others with None. Each
    rank writes its shards into tmp/optimizer/; on rank 0 it returns once every rank's write is done."""
    folder = [str(tmp) if tmp is not None else None]
    if dist.is_initialized():
        dist.broadcast_object_list(folder, src=0)
    with _one_process_is_fine():
        dcp.save({"optimizer": optimizer_state(model, optimizer)}, checkpoint_id=Path(folder[0]) / OPTIMIZER_DIR,
                 no_dist=not dist.is_initialized())


def has_sharded_optimizer(path: Path) -> bool:
    return (path / OPTIMIZER_DIR / ".metadata").is_file()


def load_optimizer(path: Path, model: GPT, optimizer: Optimizers) -> None:
    """Every rank: the optimizer state of checkpoint `path` (its MANIFEST verified), resharded onto this
    run's processes and checked finite; this recipe's base learning rates are kept."""
    folder = path / OPTIMIZER_DIR
    if not has_sharded_optimizer(path):
        raise UserError(f"{path}: has no sharded optimizer state ({OPTIMIZER_DIR}/): it was written by a "
                        "train.strategy=ddp run", hint="resume with the train.strategy the run started with")
    optimizer.zero_grad(set_to_none=True)
    base_lrs = [group["base_lr"] for group in optimizer.param_groups]
    state = {"optimizer": optimizer_state(model, optimizer)}
    try:
        with _one_process_is_fine():
            dcp.load(state, storage_reader=_Reader(folder), planner=_Planner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP wraps every rank's failure in one (a BaseException)
        raise UserError(f"{folder}: the sharded optimizer state does not load ({_reason(err)})",
                        hint="resume from an earlier checkpoint of the run (run@STEP)") from None
    for name, opt in optimizer.named.items():
        set_optimizer_state_dict(model, opt, state["optimizer"][name])
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["base_lr"] = base_lr
    bad = torch.tensor([float(bool(nonfinite(state)))])
    if dist.is_initialized():  # every rank checked its own shards (nccl reduces CUDA tensors only)
        bad = bad.cuda() if dist.get_backend() == "nccl" else bad
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise UserError(f"{folder}: refused: non-finite values in the optimizer state",
                        hint="resume from an earlier checkpoint of the run (run@STEP)")


def read_optimizer_files(path: Path) -> dict:
    """The whole sharded optimizer state of checkpoint `path`, read by one process (for verify)."""
    state: dict = {}  # filled from the index (dcp.load would keep only the keys given), as dcp_to_torch_save does
    try:
        with _one_process_is_fine():
            _load_state_dict(state, storage_reader=_Reader(path / OPTIMIZER_DIR), planner=_EmptyPlanner(),
                             no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing shard, a refused index, a truncated file
        raise UserError(f"{path / OPTIMIZER_DIR}: unreadable sharded optimizer state ({_reason(err)})") from None
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index holds dataclasses of torch.distributed.checkpoint, sizes, dtypes: nothing else loads."""

    def find_class(self, module: str, name: str):
        allowed = (module == "torch.distributed.checkpoint.metadata"
                   or (module, name) in {("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                                         ("torch.serialization", "_get_layout"),  # a layout by its name
                                         ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
                   or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))))
        if not allowed:
            raise pickle.UnpicklingError(f"refused: the checkpoint index asks for {module}.{name}")
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeBytes:
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # plain values only (lr, betas, step counts), or this raises
        value.seek(0)
        super().load_bytes(read_item, value)


class _Planner(_SafeBytes, DefaultLoadPlanner):
    pass


class _EmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    pass


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns at every save and load without a process group; one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _reason(err: BaseException) -> str:
    """The last line of what went wrong, from inside DCP's CheckpointException (which holds each rank's
    exception and traceback) when it is one."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    text = str(err).strip()
    return text.splitlines()[-1][:400] if text else type(err).__name__
