"""`--dry-run`: what a training run would do, with its time and memory measured on two real steps.

Nothing is trained or written: the figures come from timing a few forward/backward passes of
the real model on real batches (no optimizer step), so the estimate reflects this machine.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console

from llmstages.config import Recipe, dump_yaml
from llmstages.loop import TrainTask
from llmstages.model import GPT, flops_per_token, num_params
from llmstages.runlog import summary_table
from llmstages.runtime import autocast, peak_device_mb, peak_rss_mb, resolve_device, resolve_precision


def estimate(model: GPT, recipe: Recipe, task: TrainTask, console: Console) -> dict:
    cfg = recipe.train
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    accum = cfg.accumulation(world_size=1)  # the estimate is for one process
    model.to(device).train()
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
    }
    if task.examples_per_epoch:
        figures["epochs"] = round(steps * cfg.global_batch_size / task.examples_per_epoch, 2)
    console.print("[bold]resolved recipe[/bold]")
    console.print(dump_yaml(recipe), markup=False, highlight=False)
    console.print(summary_table(f"dry run: {recipe.run} (nothing trained; the data is prepared if it was not)", figures))
    return figures
