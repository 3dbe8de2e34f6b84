"""Benchmark `llmstages prepare` on the 48 Gutenberg books (38 MB); prints ONE JSON object on stdout.

    python bench/bench_prepare.py [--data DIR] [--repeat 3]   (DIR: see bench/benchdata.py)

Three measurements, each in a fresh subprocess (so each has its own peak RSS), on the same text:

  cold    the quickstart recipe from scratch: read + hash 48 files, train the 8192-token BPE on an
          8 MB sample, tokenize, write shards, commit (what a user waits for the first time).
  fixed   the same with the tokenizer from `cold` given as a file: everything prepare does except
          training (reading, checking, splitting, batching, writing, hashing, committing).
  bare    `Tokenizer.encode_batch` on the same 48 documents (as prepare reads them), nothing else.

`overhead_ratio` = fixed tokens/s / bare tokens/s: how much of the bare tokenizer's throughput is left
after all the work prepare adds (1.0 = none lost; above 1 when cutting books into pieces balances the
cores better than whole books do). With --repeat N, each figure is the median of N runs. cpu_seconds
(user + system, all threads) shows the work done independently of other load on the machine; the
load averages before and after say how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdata import add_data_option, need

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads): the work, whatever else runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(mode: str, store: str, tokenizer: str | None) -> dict:
    """One measurement, in this process."""
    from rich.console import Console

    from llmstages.config import load_recipe
    from llmstages.store import Store

    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    if mode in ("cold", "fixed"):
        from llmstages.stages.prepare import prepare

        overrides = [f"data.tokenizer={tokenizer}"] if mode == "fixed" else []
        started, cpu = time.perf_counter(), cpu_seconds()
        dataset = prepare(load_recipe("quickstart", overrides), Store(store), console=quiet, force=True)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        stats = dataset.manifest["stats"]
        return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2), "tokenizer_seconds": dataset.manifest["tokenizer"]["seconds"],
                "encode_seconds": stats["encode_seconds"], "tokens": stats["tokens"],
                "documents": stats["documents"], "bytes": stats["bytes"],
                "tokens_per_s": round(stats["tokens"] / seconds), "bytes_per_token_val": stats["bytes_per_token"],
                "tokenizer": str(dataset.path / "tokenizer.json"), "peak_rss_mb": peak_rss_mb()}
    # bare: the documents exactly as prepare reads them, then one encode_batch call.
    from llmstages.data.plan import make_plan
    from llmstages.data.readers import Record, read_records
    from llmstages.tokenizer import Tokenizer

    recipe = load_recipe("quickstart")
    plan = make_plan(recipe, Store(store))
    texts = [r.fields["text"] for f in plan.files["train"]
             for r in read_records(f.path, f.display, plan.formats[f.path], recipe.data) if isinstance(r, Record)]
    tok = Tokenizer.from_file(tokenizer)
    started, cpu = time.perf_counter(), cpu_seconds()
    ids = tok.encode_batch(texts)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    tokens = sum(map(len, ids)) + len(ids)  # + one end-of-text per document, as prepare writes
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2), "tokens": tokens, "documents": len(texts),
            "tokens_per_s": round(tokens / seconds), "peak_rss_mb": peak_rss_mb()}


def child(mode: str, store: str, data: str, tokenizer: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, "--store", store]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    env = dict(os.environ, LLMSTAGES_DATA=data, PYTHONPATH=str(REPO))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"bench child {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def median_of(runs: list[dict]) -> dict:
    result = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result[key] = statistics.median(r[key] for r in runs)
    if len(runs) > 1:
        result["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_option(parser)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median reported)")
    parser.add_argument("--one", choices=("cold", "fixed", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.store, args.tokenizer)))
        return
    data = str(need(args.data, "gutenberg").parent)  # passed to the recipe as its LLMSTAGES_DATA mirror
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        cold = median_of([child("cold", f"{tmp}/store", data) for _ in range(args.repeat)])
        saved = Path(tmp) / "tokenizer.json"  # outside the store: --force must not replace it
        saved.write_bytes(Path(cold["tokenizer"]).read_bytes())
        fixed = median_of([child("fixed", f"{tmp}/store", data, str(saved)) for _ in range(args.repeat)])
        bare = median_of([child("bare", f"{tmp}/store", data, str(saved)) for _ in range(args.repeat)])
    for result in (cold, fixed):
        result.pop("tokenizer", None)
    import tokenizers
    print(json.dumps({
        "benchmark": "prepare: 48 Gutenberg books, 8192-token byte-level BPE",
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "tokenizers_version": tokenizers.__version__,
        "repeat": args.repeat,
        "cold": cold,
        "fixed_tokenizer": fixed,
        "bare_encode_batch": bare,
        "tokens_match": fixed["tokens"] == bare["tokens"],
        "overhead_ratio": round(fixed["tokens_per_s"] / bare["tokens_per_s"], 3),
        "cold_wall_s": cold["seconds"],
    }))


if __name__ == "__main__":
    main()
