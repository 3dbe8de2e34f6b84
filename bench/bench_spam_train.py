"""Fine-tuning speed of `finetune-spam` with its texts padded or packed (finetune.packing). Prints one JSON object.

    python bench/bench_spam_train.py [--base RUN_OR_CHECKPOINT] [--steps 150] [--rounds 2] [--data DIR]
    python bench/bench_spam_train.py --quick          # a tiny base and a few steps: proves it runs

The shipped recipe (adversarial training included) fine-tunes the base on the shared SMS file for
--steps steps, once per variant per round, the variants interleaved (padded, packed, padded, ...)
in one process, so a drift of the machine's speed spreads over both. Packed batches hold the same
texts as padded ones (the same loss; tests/test_packing_classify.py), in fewer, fuller rows. No evaluation runs and the only
checkpoint is the last; the figure is the loop's training time (train_seconds: without the final
checkpoint and the test-split scoring). Reported per variant: the median training seconds, steps/s,
texts/s, and the positions the batches compute per real token (1.0 = no padding; from the same
batches); and padded / packed time, with the machine (CPU model, fast bf16) and the precision used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from benchdata import add_data_option, need
from run_all import machine
from spam_cv import QUICK, read_messages, tiny_base

VARIANTS = {"padded": "finetune.packing=false", "packed": "finetune.packing=true"}


def positions_per_token(train, block_size: int, batch_size: int, steps: int, seed: int, pack: bool) -> float:
    """Positions in the first `steps` training batches (rows x their width) per real token."""
    from llmstages.classification import ClassBatches
    batches = ClassBatches(train, batch_size, block_size, 0, seed, pack=pack)
    held = real = 0
    for index in range(steps):
        batch = batches(index)
        held, real = held + batch["input_ids"].numel(), real + batch["n_tokens"]
    return held / real


def run_variant(sms: Path, base: str, overrides: list[str], store, run: str):
    """One fine-tuning of the recipe; returns (TrainResult, recipe)."""
    from rich.console import Console

    from llmstages.config import load_recipe
    from llmstages.stages.finetune import finetune

    recipe = load_recipe("finetune-spam", overrides)
    d = recipe.data
    d.source, d.sha256, d.mirror = [str(sms)], [], []
    recipe.run = run
    recipe.init_from = base
    return finetune(recipe, store, console=Console(file=StringIO())), recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the base: a run name or checkpoint folder (default: the recipe's init_from)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny random base, 6 steps, 1 round")
    add_data_option(parser)
    args = parser.parse_args()
    sms = need(args.data, "sms_spam/SMSSpamCollection.tsv")

    from llmstages.config import load_recipe
    from llmstages.runtime import resolve_precision, set_threads
    from llmstages.store import Store

    set_threads()
    steps, rounds = (6, 1) if args.quick else (args.steps, args.rounds)
    common = (QUICK if args.quick else []) + [
        "train.epochs=0", f"train.max_steps={steps}", "train.eval_every=0", f"train.save_every={steps}",
        f"train.log_every={steps}", "finetune.dapt_steps=0"]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        if args.quick:
            base = tiny_base(store, read_messages(sms, load_recipe("finetune-spam", []))[0])
        else:
            base = str(Store().resolve(args.base or load_recipe("finetune-spam", []).init_from))
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(rounds):
            for name, flag in VARIANTS.items():
                result, recipe = run_variant(sms, base, common + [flag], store, f"speed-{name}-{r}")
                seconds[name].append(result.train_seconds)
                print(f"round {r + 1}/{rounds} {name}: {result.train_seconds:.1f} s", file=sys.stderr, flush=True)
        from llmstages.ckptmeta import CONFIG
        from llmstages.stages.prepare import get_or_prepare
        from llmstages.weights import read_model_config
        cfg = recipe.train
        train = get_or_prepare(recipe, store).records("train")  # prepared by the runs above
        block = read_model_config(Path(base) / CONFIG).block_size
        density = {name: positions_per_token(train, block, cfg.micro_batch_size, steps, cfg.seed, name == "packed")
                   for name in VARIANTS}
    out = {"benchmark": "spam_train", "machine": machine(), "base": base, "steps": steps, "rounds": rounds,
           "micro_batch_size": cfg.micro_batch_size, "precision": resolve_precision(cfg.precision, torch.device("cpu")),
           "adversarial_eps": recipe.finetune.adversarial_eps, "variants": {}}
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        out["variants"][name] = {
            "train_seconds": [round(x, 2) for x in seconds[name]], "median_s": round(median, 2),
            "steps_per_s": round(steps / median, 3), "texts_per_s": round(steps * cfg.micro_batch_size / median, 1),
            "positions_per_token": round(density[name], 3)}
    out["packed_speedup"] = round(out["variants"]["padded"]["median_s"] / out["variants"]["packed"]["median_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
