"""Packed vs padded instruction fine-tuning: training throughput on the shared instruction data.

    python bench/bench_packing.py [--size mini] [--steps 20] [--rounds 3] [--micro-batch 8] [--data DIR]

The records of instruction-data.json in the Alpaca template, tokenized with GPT-2's tokenizer (ids
folded into --vocab-size, as bench_train.py does; the lengths are GPT-2's), fitted to the context as
`finetune --task instruct` does, then trained for --steps optimizer steps of one micro-batch each
after --warmup steps, from the same random model, in two variants:

    padded   one example per row, each micro-batch padded to its longest row (finetune.packing=false)
    packed   examples packed into rows of up to block_size tokens, block-diagonal attention (packing=true)

The timed batches are collated before the clock starts (both variants), so the figures are the
model's forward, backward and optimizer step. Each variant runs in its own subprocess, interleaved round after round (A B A B ...), and the figures
are medians over --rounds. Prints one JSON object: per variant real tokens/s (padding not counted),
examples/s, positions/s (what the model computes, padding included) and the padding share of the
timed batches; `speedup` is packed over padded in real tokens/s and in examples/s. --data follows
bench/benchdata.py's rule; a missing file exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchdata import add_data_option, need

VARIANTS = ("padded", "packed")


def examples(data: Path, vocab_size: int, block_size: int, limit: int):
    """The instruction records as fitted training examples (prompt + response + eot, prompt length)."""
    import numpy as np

    from llmstages.stages.instruct import fit_records
    from llmstages.templates import format_prompt
    from llmstages.tokenizer import Tokenizer

    records = json.loads((data / "instruction-data.json").read_text(encoding="utf-8"))[:limit or None]
    tok = Tokenizer.from_file(data / "gpt2-tokenizer")
    prompts = tok.encode_batch([format_prompt("alpaca", r["instruction"], r.get("input", "")) for r in records])
    responses = tok.encode_batch([r["output"] for r in records])
    ids = [np.array(p + r + [tok.eot_id], dtype=np.int64) % vocab_size for p, r in zip(prompts, responses)]
    return fit_records(ids, [len(p) for p in prompts], block_size).examples


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    from llmstages.config import build_recipe
    from llmstages.data.packing import PackedBatches
    from llmstages.model import GPT, build_config, num_params
    from llmstages.objectives import lm_loss
    from llmstages.optim import build_optimizer
    from llmstages.runtime import peak_rss_mb, set_threads
    from llmstages.stages.instruct import EpochBatches

    threads = set_threads()
    torch.manual_seed(0)
    config = build_config(args.size, vocab_size=args.vocab_size)
    rows = examples(args.data, args.vocab_size, config.block_size, args.examples)
    pad = 0
    if name == "packed":
        batches = PackedBatches(rows, args.micro_batch, seed=0, block_size=config.block_size, mask_prompt=True,
                                pad_id=pad)
    else:
        batches = EpochBatches(rows, args.micro_batch, seed=0, mask_prompt=True, pad_id=pad)
    model = GPT(config).train()
    optimizer = build_optimizer(model, build_recipe({"train": {"lr": 1e-4}}).train, torch.device("cpu"))

    def step(batch: dict) -> None:
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = [batches(i) for i in range(args.warmup, args.warmup + args.steps)]  # collated before timing
    for i in range(args.warmup):
        step(batches(i))
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - start
    real = sum(b["n_tokens"] for b in timed)
    positions = sum(b["input_ids"].numel() for b in timed)
    n_examples = sum(int(b["segments"].max(dim=1).values.add(1).sum()) if "segments" in b else len(b["input_ids"])
                     for b in timed)
    return {"tokens_per_s": round(real / seconds, 1), "examples_per_s": round(n_examples / seconds, 2),
            "positions_per_s": round(positions / seconds, 1), "padding_share": round(1 - real / positions, 4),
            "examples_per_step": round(n_examples / len(timed), 2), "params": num_params(model),
            "peak_rss_mb": round(peak_rss_mb(), 1), "threads": threads, "training_examples": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mini", help="a named model size (tiny for a smoke run)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of both variants (median)")
    parser.add_argument("--examples", type=int, default=0, help="use the first N records (0 = all)")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, this process
    add_data_option(parser)
    args = parser.parse_args()
    args.data = need(args.data, "instruction-data.json", "gpt2-tokenizer").parent  # fail before any variant
    if args.one:
        print(json.dumps(run_variant(args.one, args)))
        return
    from llmstages.model import build_config
    from llmstages.runtime import cpu_has_fast_bf16
    result = {"benchmark": "packing", "size": args.size, "block_size": build_config(args.size, vocab_size=1).block_size,
              "micro_batch": args.micro_batch, "steps": args.steps, "precision": "fp32",
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "cpu_fast_bf16": cpu_has_fast_bf16(), "variants": {}}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("size", "vocab_size", "micro_batch", "steps", "warmup", "examples", "data")]
    for _ in range(args.rounds):  # interleaved: this machine's speed drifts over minutes
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", name, *passed], capture_output=True, text=True)
            if out.returncode != 0:
                runs[name].append({"error": out.stderr.strip().splitlines()[-3:]})
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for name, samples in runs.items():
        good = [r for r in samples if "tokens_per_s" in r]
        if not good:
            result["variants"][name] = samples[-1]
            continue
        middle = sorted(good, key=lambda r: r["tokens_per_s"])[len(good) // 2]  # the median run
        result["variants"][name] = dict(middle, runs=len(good), tokens_per_s_each=[r["tokens_per_s"] for r in good],
                                        examples_per_s_median=statistics.median(r["examples_per_s"] for r in good))
    padded, packed = result["variants"]["padded"], result["variants"]["packed"]
    if "tokens_per_s" in padded and "tokens_per_s" in packed:
        result["speedup"] = {"tokens_per_s": round(packed["tokens_per_s"] / padded["tokens_per_s"], 2),
                             "examples_per_s": round(packed["examples_per_s_median"] / padded["examples_per_s_median"], 2)}
    print(json.dumps(result))
    failed = sorted(name for name, samples in runs.items() if any("error" in r for r in samples))
    if failed:  # a half-measured comparison is not a result: make bench must fail
        sys.exit(f"bench_packing: variant(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
