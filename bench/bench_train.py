"""Training throughput: llmstages' loop against a plain fp32 eager PyTorch GPT loop of the same shape.

    python bench/bench_train.py [--steps 30] [--rounds 3] [--variants baseline,fp32,fp32-compile,bf16] [--data DIR]

Fixed shape (issue 4): 4 layers, 4 heads, 256 wide, block 256, micro-batch 16, vocab 8192.
Every variant runs in its own subprocess (clean peak RSS, no shared caches) on the same token
stream (Tiny Shakespeare through GPT-2's tokenizer folded into 8192 ids; a missing data file is an
error, never a random stream), for --steps optimizer steps after --warmup steps. --data follows
bench/benchdata.py's rule.
Prints one JSON object: per variant the median over --rounds interleaved runs of tokens/s, with MFU
against this machine's matmul peak measured in the same process, peak RSS, and the mean loss of the
last 10 steps (the same data, so losses compare).

The baseline is what a reader of a from-scratch tutorial writes: explicit attention with a causal
mask, nn.GELU, torch.optim.AdamW with its defaults, fp32, `loss.item()` every step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchdata import add_data_option, need

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192)
MICRO_BATCH = 16


def token_stream(data: Path | None):
    import numpy as np

    from llmstages.tokenizer import Tokenizer
    text_path = need(data, "tinyshakespeare.txt", "gpt2-tokenizer")  # exits 2 when either is missing
    ids = np.array(Tokenizer.from_file(text_path.parent / "gpt2-tokenizer").encode(text_path.read_text()),
                   dtype=np.int64)
    return ids % SHAPE["vocab_size"]  # fold into the bench vocabulary: same statistics for every variant


def batches(ids, steps: int):
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    T = SHAPE["block_size"]
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - T - 1, MICRO_BATCH)
        rows = torch.from_numpy(np.stack([ids[s:s + T + 1] for s in starts]))
        yield rows[:, :-1], rows[:, 1:]


# --- the plain baseline ------------------------------------------------------------------------------
def baseline_model():
    import torch
    import torch.nn as nn

    C, H, T, V, L = SHAPE["n_embd"], SHAPE["n_head"], SHAPE["block_size"], SHAPE["vocab_size"], SHAPE["n_layer"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(C, 3 * C)
            self.proj = nn.Linear(C, C)
            self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1))

        def forward(self, x):
            B, t, _ = x.shape
            q, k, v = self.qkv(x).view(B, t, 3, H, C // H).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
            att = att.masked_fill(self.mask[:t, :t], float("-inf")).softmax(dim=-1)
            return self.proj((att @ v).transpose(1, 2).reshape(B, t, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn, self.ln2 = nn.LayerNorm(C), Attention(), nn.LayerNorm(C)
            self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
            self.blocks = nn.Sequential(*[Block() for _ in range(L)])
            self.ln, self.head = nn.LayerNorm(C), nn.Linear(C, V, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
            return self.head(self.ln(self.blocks(x)))

    model = GPT()
    for module in model.modules():  # GPT-2's init, so the loss curves compare fairly
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model


def run_variant(name: str, steps: int, warmup: int, data: Path | None) -> dict:
    import torch
    import torch.nn.functional as F

    from llmstages.config import build_recipe
    from llmstages.model import GPT, GPTConfig, flops_per_token
    from llmstages.objectives import lm_loss
    from llmstages.optim import build_optimizer
    from llmstages.runtime import autocast, peak_flops, peak_rss_mb, set_threads

    threads = set_threads()
    torch.manual_seed(0)
    device = torch.device("cpu")
    precision = "bf16" if name == "bf16" else "fp32"
    ids = token_stream(data)
    if name == "baseline":
        model = baseline_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

        def step(x, y):
            loss = F.cross_entropy(model(x).view(-1, SHAPE["vocab_size"]), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss.item()  # what a plain loop does every step
    else:
        model = GPT(GPTConfig(**SHAPE))
        train_cfg = build_recipe({"train": {"lr": 1e-3, "weight_decay": 0.1}}).train
        optimizer = build_optimizer(model, train_cfg, device)
        forward = torch.compile(model) if name.endswith("compile") else model
        amp = autocast(device, precision)

        def step(x, y):
            with amp:
                loss = lm_loss(forward, {"input_ids": x, "targets": y})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()  # read only at the end, as the loop does between log steps

    model.train()
    data = list(batches(ids, warmup + steps))
    compile_start = time.perf_counter()
    for x, y in data[:warmup]:
        step(x, y)
    warmup_s = time.perf_counter() - compile_start
    losses = []
    start = time.perf_counter()
    for x, y in data[warmup:]:
        losses.append(step(x, y))
    seconds = time.perf_counter() - start
    losses = [float(v) for v in losses]
    tokens = steps * MICRO_BATCH * SHAPE["block_size"]
    tps = tokens / seconds
    flops = flops_per_token(GPTConfig(**SHAPE), SHAPE["block_size"])
    peak = peak_flops(device, precision)
    return {"tokens_per_s": round(tps, 1), "mfu": round(flops * tps / peak, 4), "peak_gflops": round(peak / 1e9, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "warmup_s": round(warmup_s, 1),
            "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="baseline,fp32,fp32-compile,bf16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every variant (median)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    add_data_option(parser)
    args = parser.parse_args()
    args.data = need(args.data, "tinyshakespeare.txt", "gpt2-tokenizer").parent  # fail before any variant runs
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.warmup, args.data)))
        return
    from llmstages.runtime import cpu_has_fast_bf16
    result = {"benchmark": "train", "shape": dict(SHAPE, micro_batch=MICRO_BATCH), "steps": args.steps,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "cpu_fast_bf16": cpu_has_fast_bf16(), "variants": {}}
    # The variants run interleaved, round after round (A B C A B C ...), each in a fresh process: this
    # machine's speed drifts by 10-20% over minutes (shared host), and interleaving spreads that drift
    # over every variant instead of favouring whichever ran in a quiet minute. Figures are medians.
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names:
            if name == "bf16" and not cpu_has_fast_bf16() and round_index > 0:
                continue  # slow here by design (no avx512_bf16/AMX): one round shows it
            out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--data", str(args.data)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                runs[name].append({"error": out.stderr.strip().splitlines()[-3:]})
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for name, samples in runs.items():
        good = [r for r in samples if "tokens_per_s" in r]
        if not good:
            result["variants"][name] = samples[-1] if samples else {"error": "not run"}
            continue
        middle = sorted(good, key=lambda r: r["tokens_per_s"])[len(good) // 2]  # the median run
        result["variants"][name] = dict(middle, runs=len(good),
                                        tokens_per_s_each=[r["tokens_per_s"] for r in good],
                                        mfu_median=statistics.median(r["mfu"] for r in good))
    base = result["variants"].get("baseline", {}).get("tokens_per_s")
    if base:
        for figures in result["variants"].values():
            if "tokens_per_s" in figures:
                figures["speedup_vs_baseline"] = round(figures["tokens_per_s"] / base, 2)
    print(json.dumps(result))
    failed = sorted({name for name, samples in runs.items() for r in samples if "error" in r})
    if failed:  # a half-measured comparison is not a result: make bench must fail
        sys.exit(f"bench_train: variant(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
