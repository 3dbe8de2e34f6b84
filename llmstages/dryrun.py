"""`--dry-run`: what a training run would do, with its time and memory measured on two real steps.

Nothing is trained or written: the figures come from timing a few forward/backward passes of
the real model on real batches (no optimizer step), so the estimate reflects this machine. Before
that, the memory of the run is estimated from the model and the batch shape (weights, gradients,
optimizer states, activations) per process, for train.strategy, train.precision and
train.activation_checkpointing on WORLD_SIZE processes; when it exceeds what the device has free, a
warning says so and the measuring steps are skipped (they would run out of memory). The measuring
steps run on this one process, unsharded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from rich.console import Console

from llmstages.config import Recipe, dump_yaml
from llmstages.loop import TrainTask
from llmstages.model import GPT, flops_per_token, num_params, set_activation_checkpointing
from llmstages.runlog import summary_table
from llmstages.runtime import autocast, peak_device_mb, peak_rss_mb, resolve_device, resolve_precision


def memory_estimate(model: GPT, batch_shape: tuple[int, int], precision: str, trainable_layers: int, *,
                    strategy: str = "ddp", world_size: int = 1, checkpointing: bool = False) -> dict[str, float]:
    """Bytes of a training step on one process, by part (a rough guide, not a measurement).

    weights: as stored; gradients: one per trainable weight, same type; optimizer: AdamW's two moments
    (Muon keeps one, so this is an upper bound) in fp32. Under ddp every process holds all of them,
    plus DDP's gradient buckets (a second copy of the gradients); under fsdp 1/N of each, plus the
    weights gathered at a time: the root unit (embeddings, head) and two blocks (the one computing and
    the one prefetched), in bf16 under bf16.
    activations kept for the backward pass: per token and trainable layer about 8 C + 3 F values (norm
    inputs, q/k/v, attention output, residuals, MLP hidden and its activation); with checkpointing
    only each block's input (C values) plus one block's worth while it is recomputed; plus the logits
    (B, T, V) in fp32 and their gradient.
    """
    seen, weights, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
        trainable += p.numel() * p.element_size() if p.requires_grad else 0
    n_trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    B, T = batch_shape
    c = model.config
    act_bytes = 2 if precision == "bf16" else 4
    block = 8 * c.n_embd + 3 * c.mlp_width  # values kept per token by one block
    per_token = (trainable_layers * c.n_embd + block if checkpointing else trainable_layers * block) * act_bytes
    outputs = c.num_classes if c.num_classes else c.vocab_size
    activations = B * T * per_token + 2 * B * T * outputs * 4
    parts = {"weights": weights, "gradients": trainable, "optimizer": 8 * n_trainable, "activations": activations}
    if strategy == "fsdp" and world_size > 1:
        blocks = list(model.transformer.h)
        block_numel = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        root_numel = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - sum(
            p.numel() for b in blocks for p in b.parameters())
        gathered = (root_numel + 2 * block_numel) * (2 if precision == "bf16" else 4)
        parts = {k: v / world_size if k != "activations" else v for k, v in parts.items()}
        parts["gathered weights"] = gathered
    elif world_size > 1:
        parts["ddp buckets"] = trainable
    return parts


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: the GPU's free memory, or the RAM Linux reports as available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        return pages * os.sysconf("SC_PAGE_SIZE") if pages else None


def trainable_layer_count(model: GPT) -> int:
    """Blocks from the first one with a trainable weight to the last: the backward pass runs through them."""
    blocks = model.transformer.h
    firsts = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
    return len(blocks) - firsts[0] if firsts else 0


def estimate(model: GPT, recipe: Recipe, task: TrainTask, console: Console, data: Path | None = None) -> dict:
    """The plan of a run measured on real micro-batches; trains nothing and writes no run. `data`: the
    prepared dataset folder (prepared by this dry run when it was missing: the one thing it writes)."""
    cfg = recipe.train
    writes = {"writes": f"no run; only the prepared dataset {data}" if data is not None else "no run"}
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # Per process of a launch of WORLD_SIZE processes (torchrun sets it; set it by hand to plan one).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = cfg.accumulation(world_size=world)
    steps = None if cfg.budget_seconds else cfg.total_steps(task.examples_per_epoch)  # a budget: measured below
    first = task.batch(0)
    parts = memory_estimate(model, tuple(first["input_ids"].shape), precision, trainable_layer_count(model),
                            strategy=cfg.strategy, world_size=world, checkpointing=cfg.activation_checkpointing)
    need, free = sum(parts.values()), free_memory(device)
    planned = {"processes": world, "strategy": cfg.strategy if world > 1 else "one process",
               "activation checkpointing": cfg.activation_checkpointing}
    planned.update({f"estimated {k} (MiB)": round(v / (1 << 20), 1) for k, v in parts.items()})
    planned["estimated total (MiB)"] = round(need / (1 << 20), 1)
    if free is not None:
        planned[f"free on {device.type} (MiB)"] = round(free / (1 << 20), 1)
    if free is not None and need > free:
        console.print(f"[bold yellow]warning:[/bold yellow] this run needs about {need / (1 << 30):.1f} GiB "
                      f"({', '.join(f'{k} {v / (1 << 30):.1f}' for k, v in parts.items())}) but {device.type} has "
                      f"{free / (1 << 30):.1f} GiB free: it would not fit. Try finetune.trainable=lora or "
                      "last_blocks:N, a smaller train.micro_batch_size (global_batch_size keeps the step), or "
                      "train.precision=bf16; the measuring steps are skipped.", highlight=False)
        figures = {"task": task.kind, "device": str(device), "precision": precision, "steps": steps,
                   "parameters": num_params(model), "trainable parameters": num_params(model, trainable_only=True),
                   **planned, "fits": False, **writes}
        console.print(summary_table(f"dry run: {recipe.run} (nothing trained)", figures))
        return figures
    model.to(device).train()
    set_activation_checkpointing(model, cfg.activation_checkpointing)  # measured as it will run (unsharded)
    amp = autocast(device, precision)

    def micro_step(index: int) -> int:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.batch(index).items()}
        with amp:
            loss = task.loss(model, batch)
        loss.backward()
        return batch["n_tokens"]

    micro_step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for index in (1, 2):
        tokens += micro_step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_micro = (time.perf_counter() - start) / 2
    # A time budget: the steps that fit at this speed (the run measures again as it goes).
    budget = cfg.budget_seconds
    steps = int(budget // (per_micro * accum)) if budget else cfg.total_steps(task.examples_per_epoch)
    model.zero_grad(set_to_none=True)
    tokens_per_micro = tokens / 2
    tokens_per_step = tokens_per_micro * accum
    params = num_params(model)
    trainable = num_params(model, trainable_only=True)
    # Weights + grads + AdamW's two moments for the trainable part; measured activations on top.
    state_mb = (params * 4 + trainable * 12) / (1 << 20)
    figures = {
        "task": task.kind, "device": str(device), "precision": precision, "parameters": params,
        "trainable parameters": trainable, **({"time budget": cfg.max_time} if budget else {}),
        "steps" + (" (estimated)" if budget else ""): steps, "micro-batches per step": accum,
        "tokens per step": int(tokens_per_step), "total tokens": int(tokens_per_step * steps),
        "tokens per parameter": round(tokens_per_step * steps / max(params, 1), 2),
        "FLOPs per token (train)": flops_per_token(model.config, model.config.block_size),
        "measured tokens/s": round(tokens_per_micro / per_micro, 1),
        "estimated time (min)": round(per_micro * accum * steps / 60, 2),
        "peak memory (MiB, measured)": round(peak_device_mb(device) or peak_rss_mb(), 1),
        "optimizer state (MiB)": round(state_mb, 1),
        **planned, "fits": True, **writes,
    }
    if task.examples_per_epoch:
        figures["epochs"] = round(steps * cfg.global_batch_size / task.examples_per_epoch, 2)
    if kind := recipe.finetune.combination:  # soup or ensemble: N runs like the one measured
        minutes, members = per_micro * accum * steps / 60, recipe.finetune.members
        figures.update({f"{kind} members": members, "estimated time per member (min)": round(minutes, 2),
                        "estimated time (min)": round(minutes * members, 2)})
    console.print("[bold]resolved recipe[/bold]")
    console.print(dump_yaml(recipe), markup=False, highlight=False)
    console.print(summary_table(f"dry run: {recipe.run} (nothing trained)", figures))
    return figures
