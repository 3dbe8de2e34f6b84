"""How fast the browsing commands answer: `llmstages runs`, `show`, `recipes` and `--help`, each as a
user runs it (a new process), median wall time of --repeats. Prints one JSON object.

    python bench/bench_browse.py [--store store-demo] [--runs 20] [--repeats 5]

The store: --store when given; else the demo's (store-demo/, after `make demo`) when it has runs; else a
made-up store of --runs runs with three checkpoints each (their JSON files only: browsing reads nothing
else). The target is under 0.5 s per command on a quiet machine (issue 16); `imports_torch` says whether
a command imported torch, which alone takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmstages.store import Store

TARGET_S = 0.5
PROBE = ("import sys\nfrom llmstages.cli import main\ncode = main(sys.argv[1:])\n"
         "print('TORCH=' + str('torch' in sys.modules), file=sys.stderr)\nsys.exit(code)\n")


def made_up_store(root: Path, runs: int) -> Store:
    """`runs` runs with three committed checkpoints each: meta.json, model.json and a log line."""
    store = Store(root)
    config = {"vocab_size": 8192, "n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 256}
    for i in range(runs):
        run = f"run-{i:03d}"
        for step in (100, 200, 300):
            with store.commit(run, step) as tmp:
                (tmp / "meta.json").write_text(json.dumps({"task": "pretrain", "run": run, "step": step,
                                                           "metrics": {"val_loss": 5.0}}))
                (tmp / "model.json").write_text(json.dumps(config))
        (store.run_dir(run) / "log.jsonl").write_text(json.dumps({"step": 300, "loss": 5.1, "val_loss": 5.0}) + "\n")
    return store


def timed(store: Store, args: list[str], repeats: int) -> dict:
    seconds, torch_seen = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, "--store", str(store.root), *args], capture_output=True,
                             text=True, env=dict(os.environ, COLUMNS="120"))
        seconds.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"bench_browse: `llmstages {' '.join(args)}` failed:\n{out.stderr[-2000:]}")
        torch_seen |= "TORCH=True" in out.stderr
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "imports_torch": torch_seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a store with runs (default: store-demo/ when it has runs)")
    parser.add_argument("--runs", type=int, default=20, help="runs in the made-up store")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = Store(Path(__file__).resolve().parent.parent / "store-demo")
        store = Store(args.store) if args.store else demo if demo.runs() else made_up_store(Path(tmp), args.runs)
        infos = store.runs()
        if not infos:
            raise SystemExit(f"bench_browse: no runs in {store.root}")
        commands = {"runs": ["runs"], "show": ["show", infos[0].name], "recipes": ["recipes"], "help": ["--help"]}
        figures = {name: timed(store, cmd, args.repeats) for name, cmd in commands.items()}
        print(json.dumps({"benchmark": "browse", "store": str(store.root), "runs": len(infos),
                          "repeats": args.repeats, "target_s": TARGET_S, "commands": figures,
                          "under_target": all(f["median_s"] < TARGET_S for f in figures.values())}))


if __name__ == "__main__":
    main()
