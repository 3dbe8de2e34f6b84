"""Ablations of the modern recipe at equal training time (issue 12), and a vocabulary-size sweep.

    python bench/ablate.py [--budget 5m] [--rounds 1] [--only rope,muon] [--vocab 2048,4096,8192]
                           [--no-blocks] [--precision auto] [--clock steps|wall] [--quick]

Blocks: quickstart-modern, then quickstart-modern with one choice switched back to GPT-2's
(ABLATIONS below), then quickstart-gpt2, each for the same training time (--clock steps, the
default: the budget in steps at each row's measured step time; --clock wall: train.max_time; see
timed_runs.py); the runs interleave round by round. --vocab: quickstart-modern on datasets prepared with each tokenizer vocabulary size
(data.name quickstart-v<SIZE>; bits per byte compare across vocabularies, losses per token do not).

Prints a markdown table for the README (on stderr) and one JSON object (on stdout): per row the
val bits/byte (median over rounds; every round kept), its difference from the full modern recipe
(positive = worse without that choice), steps and tokens/s, and the machine.
--quick: seconds-long runs of a tiny model on Tiny Shakespeare: proves the script runs, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timed_runs import (QUICK_DATA, QUICK_MODEL, add_clock_args, machine, median, parse_budget, prepare,
                        step_times, train)

MODERN, GPT2 = "quickstart-modern", "quickstart-gpt2"
# Each choice of the modern preset and the setting that switches it back to GPT-2's.
ABLATIONS = {
    "rope": ("rotary -> learned positions", ["model.pos_emb=learned"]),
    "rmsnorm": ("RMSNorm -> LayerNorm", ["model.norm=layernorm"]),
    "relu2": ("ReLU² -> GELU", ["model.mlp=gelu"]),
    "qk_norm": ("QK-norm off", ["model.qk_norm=false"]),
    "untied": ("untied -> tied head", ["model.tie_embeddings=true"]),
    "softcap": ("logit soft-cap off", ["model.logit_softcap=0"]),
    "no_bias": ("biases on", ["model.bias=true"]),
    "muon": ("Muon -> AdamW", ["train.optimizer=adamw"]),
    "wsd": ("WSD -> cosine", ["train.schedule=cosine"]),
}


def rows(args) -> dict[str, tuple[str, str, list[str], list[str]]]:
    """name -> (what it is, recipe, data overrides, other overrides)."""
    out = {}
    if not args.no_blocks:
        out["modern"] = ("quickstart-modern", MODERN, [], [])
        for name, (what, overrides) in ABLATIONS.items():
            if not args.only or name in args.only.split(","):
                out[f"-{name}"] = (what, MODERN, [], overrides)
        out["gpt2"] = ("quickstart-gpt2 (every choice switched back)", GPT2, [], [])
    for size in [int(v) for v in args.vocab.split(",") if v]:
        data = [f"data.vocab_size={size}", f"data.name={'bench-quick' if args.quick else 'quickstart'}-v{size}"]
        out[f"vocab{size}"] = (f"quickstart-modern, vocabulary {size}", MODERN, data, [])
    return out


def markdown(result: dict) -> str:
    lines = ["| run | change | val bits/byte | vs modern | steps | ms/step |", "|---|---|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        bpb, delta, step_s = row["val_bpb"], row.get("vs_modern"), row.get("step_s")
        per_step = "" if step_s is None else f"{step_s * 1000:.0f}"
        figures = (f"{bpb:.4f} | {'' if delta is None else f'{delta:+.4f}'} | {row['steps']} | {per_step}"
                   if bpb is not None else "failed | | |")
        lines.append(f"| {name} | {row['what']} | {figures} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="5m", help="train.max_time of every run")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every run (medians reported)")
    parser.add_argument("--only", default="", help=f"some of {','.join(ABLATIONS)} (default: all)")
    parser.add_argument("--vocab", default="", help="vocabulary sizes to sweep, e.g. 2048,4096,8192")
    parser.add_argument("--no-blocks", action="store_true", help="only the vocabulary sweep")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    add_clock_args(parser)
    parser.add_argument("--store", default="store-bench", help="the bench's own store (data prepared once)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of seconds (figures mean nothing)")
    args = parser.parse_args()
    host = machine(args.precision)  # 'auto' resolved once here, so every run trains in the same precision
    args.precision = host["precision"]
    unknown = set(filter(None, args.only.split(","))) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ABLATIONS)}")

    budget = parse_budget("3s" if args.quick else args.budget)
    base_data = QUICK_DATA if args.quick else []
    common = ([f"train.precision={args.precision}"] + (QUICK_MODEL if args.quick else
                                                       [f"train.eval_every={args.eval_every}"]))
    store = Path(args.store)
    plan = rows(args)
    for data in {tuple(d) for _, _, d, _ in plan.values()}:  # every dataset prepared before anything is timed
        prepare(store, MODERN, base_data + list(data))

    step_s = ({name: None for name in plan} if args.clock == "wall" else
              step_times(store, {name: (recipe, base_data + data + common + overrides)
                                 for name, (_, recipe, data, overrides) in plan.items()}, args.step_rounds))
    runs: dict[str, list] = {name: [] for name in plan}
    for round_index in range(args.rounds):
        for name, (_, recipe, data, overrides) in plan.items():
            print(f"ablate: round {round_index + 1}, {name}", file=sys.stderr, flush=True)
            label = f"ablate-{name.lstrip('-')}-r{round_index + 1}"
            runs[name].append(train(store, recipe, label, budget, base_data + data + common + overrides, step_s[name]))

    result = {"benchmark": "ablate", "machine": host, "budget_s": budget,
              "rounds": args.rounds, "quick": args.quick, "clock": args.clock,
              "command": "python bench/ablate.py " + " ".join(sys.argv[1:]), "rows": {}}
    for name, (what, recipe, data, overrides) in plan.items():
        done = [r for r in runs[name] if r.final_bpb is not None]
        result["rows"][name] = {"what": what, "recipe": recipe, "overrides": data + overrides,
                                "val_bpb": median([r.final_bpb for r in done]),
                                "steps": median([r.steps for r in done]), "step_s": step_s[name],
                                "runs": [r.as_dict() for r in runs[name]]}
    modern = result["rows"].get("modern", {}).get("val_bpb")
    for row in result["rows"].values():
        if modern is not None and row["val_bpb"] is not None:
            row["vs_modern"] = round(row["val_bpb"] - modern, 4)
    print(markdown(result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
