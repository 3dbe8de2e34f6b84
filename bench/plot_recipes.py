"""Draw bench_recipes.py's JSON: val bits/byte against training seconds, every run of every recipe.

    python bench/plot_recipes.py RECIPES.json [--out docs/recipes-equal-time.png]

One line per run (recipe x budget), each ending annealed at its budget, the old recipe's figure at its
longest budget as a dashed line: where a curve crosses it is that run's time to the target. Needs
matplotlib (`pip install 'llmstages[plot]'`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(result: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"gpt2": "tab:gray", "modern": "tab:blue"}
    longest = max(float(b.rstrip("s")) for recipe in result["recipes"].values() for b in recipe["runs"])
    for name, recipe in result["recipes"].items():
        for budget, runs in recipe["runs"].items():
            share = float(budget.rstrip("s")) / longest  # shorter budgets: thinner, lighter lines
            for run in runs:
                if not run.get("curve"):
                    continue
                seconds, bpb = zip(*run["curve"])
                ax.plot(seconds, bpb, color=colors.get(name), alpha=0.4 + 0.5 * share, linewidth=0.8 + 1.2 * share,
                        marker=".", markersize=3, label=f"{name}, {float(budget.rstrip('s')) / 60:g} min")
    target = result.get("target") or {}
    if target.get("val_bpb") is not None:
        ax.axhline(target["val_bpb"], color="black", linestyle="--", linewidth=0.8,
                   label=f"{target['recipe']} at {target['budget_s'] / 60:g} min: {target['val_bpb']:.3f}")
    machine = result.get("machine", {})
    ax.set(xlabel="training seconds (steps x measured step time)" if result.get("clock") == "steps"
           else "training seconds", ylabel="val bits/byte",
           title=f"quickstart-gpt2 vs quickstart-modern, {machine.get('cores', '?')} cores, "
                 f"{machine.get('precision', '?')}")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="the JSON that bench_recipes.py printed")
    parser.add_argument("--out", default="docs/recipes-equal-time.png")
    args = parser.parse_args()
    plot(json.loads(Path(args.result).read_text()), Path(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
