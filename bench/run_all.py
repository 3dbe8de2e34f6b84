"""`make bench`: run every benchmark in bench/ and write their figures into one JSON file.

    python bench/run_all.py [--out bench/results/bench.json] [--only train,generate] [--data DIR]

Each bench script prints one JSON object; this collects them with the machine they ran on. The
output goes to the ignored bench/results/; docs/bench.json (tracked) is the copy the README's
performance table was made from, replaced by hand when the README is updated on purpose.
Exits 1 when any benchmark failed (its error is in the file), so `make bench` fails too.
Data: `--data` (passed on), else $LLMSTAGES_TEST_DATA, else ../shared/data (bench/benchdata.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "prepare": ["bench_prepare.py"],
    "prepare_scale": ["bench_prepare_scale.py"],
    "train": ["bench_train.py"],
    "generate": ["bench_generate.py"],
    "classify": ["bench_classify.py"],
    # packed vs padded instruction fine-tuning on the shared instruction data (a few minutes)
    "packing": ["bench_packing.py"],
    # `llmstages runs` / show / recipes / --help on the demo's store (or a made-up one): target under 0.5 s
    "browse": ["bench_browse.py"],
    # peak memory per process of DDP, FSDP and FSDP + activation checkpointing (2 processes, ~3 GB)
    "memory": ["bench_memory.py"],
    # finetune-spam's training speed, texts padded or packed (finetune.packing; needs the quickstart base)
    "spam_train": ["bench_spam_train.py"],
    # 5-fold cross-validation of finetune-spam vs TF-IDF baselines (needs the quickstart base and scikit-learn)
    "spam_cv": ["spam_cv.py"],
    # About 40 minutes: the old and the new pretraining recipe at 2.5, 5 and 10 minutes each.
    "recipes": ["bench_recipes.py"],
}
READS_DATA = {"prepare", "train", "classify", "packing", "spam_train"}


def machine() -> dict:
    import torch

    from llmstages.runtime import cpu_has_fast_bf16
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # the intra-op threads a run uses (runtime.set_threads): OMP_NUM_THREADS when set, else one per core
    info = {"cpu": cpu, "cores": cores, "threads": int(os.environ.get("OMP_NUM_THREADS") or cores),
            "cpu_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results" / "bench.json"))
    parser.add_argument("--only", default=",".join(BENCHES))
    parser.add_argument("--data", help="shared data folder, passed to the benchmarks that read data")
    args = parser.parse_args()
    unknown = [name for name in args.only.split(",") if name not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "benchmarks": {}}
    for name in args.only.split(","):
        script, *extra = BENCHES[name]
        if args.data and name in READS_DATA:
            extra = [*extra, "--data", args.data]
        path = HERE / script
        if not path.exists():
            results["benchmarks"][name] = {"error": f"{script} not found"}
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, str(path), *extra], capture_output=True, text=True)
        if out.returncode != 0:
            results["benchmarks"][name] = {"error": out.stderr.strip().splitlines()[-3:],
                                           "returncode": out.returncode}
        else:
            results["benchmarks"][name] = json.loads(out.stdout.strip().splitlines()[-1])
        results["benchmarks"][name]["bench_seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    failed = [name for name, figures in results["benchmarks"].items() if "error" in figures]
    if failed:
        print(f"bench: FAILED: {', '.join(failed)} (errors in {args.out})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
