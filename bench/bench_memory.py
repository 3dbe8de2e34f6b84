"""Peak memory per process: DDP vs FSDP vs FSDP + activation checkpointing (train.strategy,
train.activation_checkpointing).

    python bench/bench_memory.py [--procs 2] [--steps 3] [--n-layer 8] [--n-embd 512] [--block-size 256]
                                 [--micro-batch 8] [--vocab-size 8192] [--variants ddp,fsdp,fsdp+ac]

Each variant is one torchrun launch of --procs processes (gloo on the CPU, nccl where CUDA is) that
runs --steps AdamW steps of a GPT of the given shape through llmstages' own wrapping
(DistContext.wrap, fsdp.py) on random tokens (memory does not depend on the data). Per rank:

    rss_before_train_mib   resident memory once the model is built and wrapped (sharded for fsdp)
    train_peak_rss_mib     peak resident memory during the training steps (Linux VmHWM, reset just
                           before them, so the full-size model every rank builds first is not counted)
    cuda_peak_mib          torch.cuda.max_memory_allocated, on a GPU
    loss                   the last step's loss (the variants train the same model on the same tokens)

Prints one JSON object. The default shape (8 x 512, about 30M parameters: 0.12 GB of fp32 weights,
as much again of gradients, twice that of AdamW moments, ~0.8 GB of activations at 8 x 256 tokens)
makes the three differ clearly on a CPU with a few GB free.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("ddp", "fsdp", "fsdp+ac")


def status_mib(field: str) -> float | None:
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Linux: make VmHWM (the peak RSS) start again from the current RSS (proc(5), clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: build, wrap, train --steps steps, write this rank's figures as JSON."""
    import torch

    from llmstages.config import build_recipe
    from llmstages.distributed import init_distributed
    from llmstages.model import GPT, GPTConfig, num_params, set_activation_checkpointing
    from llmstages.optim import build_optimizer
    from llmstages.runtime import resolve_device

    dctx, device_name = init_distributed("auto")
    device = resolve_device(device_name)
    strategy = "fsdp" if args.worker.startswith("fsdp") else "ddp"
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
    model = GPT(config)
    params = num_params(model)
    set_activation_checkpointing(model, args.worker.endswith("+ac"))
    if strategy == "ddp":
        model.to(device)
    stepped = dctx.wrap(model, device, strategy=strategy, precision="fp32")
    cfg = build_recipe({"train": {"strategy": strategy, "lr": 1e-4, "min_lr": 1e-5}}).train
    optimizer = build_optimizer(model, cfg, device)
    generator = torch.Generator().manual_seed(1 + dctx.rank)
    before = status_mib("VmRSS")
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        x = torch.randint(0, args.vocab_size, (args.micro_batch, args.block_size), generator=generator).to(device)
        loss = stepped(x, targets=x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    figures = {"rank": dctx.rank, "parameters": params, "rss_before_train_mib": round(before or 0, 1),
               "train_peak_rss_mib": round(status_mib("VmHWM") or 0, 1), "loss": round(float(loss), 4)}
    if device.type == "cuda":
        figures["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    (Path(args.out) / f"rank{dctx.rank}.json").write_text(json.dumps(figures))
    dctx.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, args: argparse.Namespace, shape: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
               "--master-port", str(free_port()), __file__, "--worker", variant, "--out", out, *shape]
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-4000:])
            raise SystemExit(f"bench_memory: the {variant} launch failed (exit {result.returncode})")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(args.procs)]
    return {"ranks": ranks, "max_train_peak_rss_mib": max(r["train_peak_rss_mib"] for r in ranks),
            **({"max_cuda_peak_mib": max(r["cuda_peak_mib"] for r in ranks)} if "cuda_peak_mib" in ranks[0] else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from llmstages.distributed import exit_process
        worker(args)
        exit_process(0)  # a torchrun worker ends without the interpreter's teardown (see exit_process)
    if args.procs < 2:
        raise SystemExit("bench_memory: --procs must be 2 or more (one process shards nothing)")
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"bench_memory: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    shape = ["--steps", str(args.steps), "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd),
             "--block-size", str(args.block_size), "--micro-batch", str(args.micro_batch),
             "--vocab-size", str(args.vocab_size)]
    results = {v: run_variant(v, args, shape) for v in variants}
    print(json.dumps({"benchmark": "memory", "procs": args.procs, "steps": args.steps,
                      "shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "block_size": args.block_size,
                                "micro_batch": args.micro_batch, "vocab_size": args.vocab_size},
                      "variants": results}))


if __name__ == "__main__":
    main()
