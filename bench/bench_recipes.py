"""The old pretraining recipe against the new one at equal wall-clock budgets (issue 12).

    python bench/bench_recipes.py [--budgets 2.5m,5m,10m] [--variant NAME=KEY=VAL,KEY=VAL ...]
                                  [--rounds 1] [--eval-every 20] [--precision auto] [--clock steps|wall]
                                  [--quick]

Trains `quickstart-gpt2` (GPT-2 blocks, AdamW, cosine) and `quickstart-modern` (plus each --variant:
quickstart-modern with those overrides, e.g. --variant wide=model.n_embd=256) on the same machine
and prepared data, each once per budget, so every run ends annealed at its budget. --clock steps
(the default): each recipe's step time is measured first and a budget is round(BUDGET / step time)
steps (robust to a busy host); --clock wall: train.max_time=BUDGET (see timed_runs.py). The runs
are interleaved (budget by budget, recipe by recipe, round by round), so a drift of the machine's
speed spreads over all of them. Evaluations run every --eval-every steps and
are not counted in the budget (their seconds are reported per run).

Prints one JSON object: per recipe, the val bits/byte at each budget (median over rounds) and the
training seconds to reach the old recipe's figure at the longest budget, two ways:
  time_to_target_s              from the eval points of the recipe's longest run, interpolated
                                (those points are not annealed: an upper bound)
  time_to_target_annealed_s     from the annealed ends of its runs at each budget, interpolated
and the speedups (old budget / each time to target), with the machine (CPU model, fast bf16, precision).
--quick: seconds-long budgets, a tiny model and Tiny Shakespeare: proves the script runs, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timed_runs import (QUICK_DATA, QUICK_MODEL, add_clock_args, machine, median, parse_budget, prepare,
                        step_times, time_to, time_to_from_budgets, train)

OLD, NEW = "quickstart-gpt2", "quickstart-modern"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME=KEY=VAL,KEY=VAL` -> (NAME, [KEY=VAL, ...])."""
    name, _, settings = text.partition("=")
    overrides = [s.strip() for s in settings.split(",") if s.strip()]
    if not name or not overrides or not all("=" in s for s in overrides):
        raise SystemExit(f"--variant {text!r}: write it as NAME=KEY=VAL,KEY=VAL (e.g. wide=model.n_embd=256)")
    return name, overrides


def parse_given(text: str) -> tuple[str, float]:
    """`NAME=SECONDS` -> (NAME, seconds per step)."""
    name, _, seconds = text.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise SystemExit(f"--step-s {text!r}: write it as NAME=SECONDS, e.g. gpt2=0.55") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2.5m,5m,10m", help="train.max_time values, comma-separated")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VAL,KEY=VAL",
                        help="quickstart-modern with these overrides (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every run (medians reported)")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    add_clock_args(parser)
    parser.add_argument("--step-s", action="append", default=[], metavar="NAME=SECONDS",
                        help="--clock steps: a recipe's step time measured before (its measuring is skipped)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME@BUDGET",
                        help="leave out one run, e.g. modern@10m when its shorter budgets already pass the target")
    parser.add_argument("--reuse", action="store_true",
                        help="--clock steps: read finished runs of the same label and step count from the store")
    parser.add_argument("--store", default="store-bench", help="the bench's own store (data prepared once)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of seconds (figures mean nothing)")
    args = parser.parse_args()
    host = machine(args.precision)  # 'auto' resolved once here, so every run trains in the same precision
    args.precision = host["precision"]

    budgets = [parse_budget(b) for b in ("2s,4s" if args.quick else args.budgets).split(",")]
    common = [f"train.precision={args.precision}", f"train.eval_every={args.eval_every}"]
    if args.quick:
        common = QUICK_DATA + [f"train.precision={args.precision}"] + QUICK_MODEL
    recipes = {"gpt2": (OLD, []), "modern": (NEW, [])}
    for text in args.variant:
        name, overrides = parse_variant(text)
        recipes[name] = (NEW, overrides)
    store = Path(args.store)
    prepare(store, OLD, QUICK_DATA if args.quick else [])

    given = dict(parse_given(text) for text in args.step_s)
    to_measure = {name: (recipe, common + o) for name, (recipe, o) in recipes.items() if name not in given}
    step_s = ({name: None for name in recipes} if args.clock == "wall" else
              {**given, **(step_times(store, to_measure, args.step_rounds) if to_measure else {})})
    skipped = {(name, parse_budget(budget)) for name, _, budget in (t.partition("@") for t in args.skip)}
    runs: dict[str, dict[float, list]] = {name: {b: [] for b in budgets} for name in recipes}
    for round_index in range(args.rounds):
        for budget in budgets:
            for name, (recipe, overrides) in recipes.items():
                if (name, budget) in skipped:
                    continue
                print(f"bench_recipes: round {round_index + 1}, {budget:g}s, {name}", file=sys.stderr, flush=True)
                label = f"bench-{name}-{budget:g}s-r{round_index + 1}"
                runs[name][budget].append(train(store, recipe, label, budget, common + overrides, step_s[name],
                                                reuse=args.reuse))

    longest = max(budgets)
    result = {"benchmark": "recipes", "machine": host, "budgets_s": budgets,
              "rounds": args.rounds, "eval_every": args.eval_every, "quick": args.quick, "clock": args.clock,
              "command": "python bench/bench_recipes.py " + " ".join(sys.argv[1:]), "recipes": {}}
    for name, (recipe, overrides) in recipes.items():
        finals = {b: median([r.final_bpb for r in runs[name][b]]) for b in budgets}
        result["recipes"][name] = {
            "recipe": recipe, "overrides": overrides, "step_s": step_s[name],
            "val_bpb": {f"{b:g}s": finals[b] for b in budgets},
            "runs": {f"{b:g}s": [r.as_dict() for r in runs[name][b]] for b in budgets}}
    target = result["recipes"]["gpt2"]["val_bpb"][f"{longest:g}s"]
    result["target"] = {"recipe": "gpt2", "budget_s": longest, "val_bpb": target}
    for name, figures in result["recipes"].items():
        if target is None:
            break
        own_longest = max(b for b in budgets if runs[name][b])
        longest_run = runs[name][own_longest][0]  # the first round's longest run: its eval curve
        along_curve = time_to(longest_run.curve, target)
        annealed = time_to_from_budgets([(b, v) for b, v in zip(budgets, [median([r.final_bpb for r in
                                         runs[name][b]]) for b in budgets]) if v is not None], target)
        for key, seconds in (("", along_curve), ("_annealed", annealed)):
            figures[f"time_to_target{key}_s"] = round(seconds, 1) if seconds is not None else None
            figures[f"speedup{key}"] = round(longest / seconds, 2) if seconds else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
