"""`make demo`: every stage of llmstages on a laptop CPU, then one table of what it got.

    python -m llmstages.demo [--store store-demo] [--smoke]      run it; results stay in the demo's store
    python -m llmstages.demo --publish docs [--store store-demo]   copy the last results to the README's figures

prepare -> pretrain (quickstart) -> finetune spam -> finetune instruct -> generate / classify /
instruct samples -> evaluate, each as the `llmstages` command a user would type (printed before it
runs). Data comes from $LLMSTAGES_DATA when set, otherwise from the recipes' public URLs (checked
against their sha256). The demo owns its store folder and starts it afresh each time. `--smoke`
runs the same pipeline on a cut-down recipe (tiny model, a few steps) in a minute or two; CI runs it.

The results (demo-results.json, and loss.png in the quickstart run) stay in the demo's store (ignored by
git), so a demo run never changes tracked files. The README's figures (docs/demo-results.json,
docs/quickstart-loss.png) change only when someone means them to: `make demo-docs` runs `--publish docs`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmstages.runlog import RunLog

console = Console(stderr=True)

SPAM_SAMPLES = ["Congratulations! You have won a FREE cruise. Call 09061701461 now to claim your prize!",
                "Are we still meeting for lunch tomorrow? I'll be at the station around 12.",
                "URGENT: your mobile number has been awarded a 2000 bonus. Text CLAIM to 81010"]
INSTRUCT_SAMPLES = ["Give three tips for staying healthy.", "What is the opposite of 'ancient'?"]
BASE_PROMPT = "It was a dark and stormy night, and"
DEMO_MARKER = ".llmstages-demo"  # the demo only ever empties a folder that holds this file

# Cut-down settings for --smoke: the same commands, tiny sizes.
SMOKE = {
    "pretrain": ["model.size=tiny", "model.block_size=128", "train.max_steps=20", "train.eval_every=10",
                 "train.save_every=10", "train.micro_batch_size=8", "train.global_batch_size=8",
                 "train.eval_batches=2", "train.log_every=5", "train.warmup_steps=2",
                 "data.source=gutenberg/pg11_alice_in_wonderland.txt,gutenberg/pg46_christmas_carol.txt",
                 "data.mirror=", "data.vocab_size=1024"],
    "spam": ["train.max_steps=10", "train.epochs=0", "train.eval_every=5", "train.save_every=5",
             "train.log_every=5", "train.warmup_steps=1", "train.micro_batch_size=8", "train.global_batch_size=8",
             "train.eval_batches=4"],
    "instruct": ["train.max_steps=6", "train.epochs=0", "train.eval_every=3", "train.save_every=3",
                 "train.log_every=3", "train.warmup_steps=1", "finetune.eval_samples=1", "train.micro_batch_size=4",
                 "train.global_batch_size=4", "train.eval_batches=2"],
}


class Demo:
    def __init__(self, store: Path, smoke: bool):
        self.store = store
        self.smoke = smoke
        self.times: dict[str, float] = {}

    def llmstages(self, stage: str, *args: str, capture: bool = False) -> str:
        """Run one `llmstages` command (shown as typed), timing it under `stage`; stdout when captured."""
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        console.rule(f"[bold]{stage}")
        console.print(f"$ llmstages {shown}", style="cyan", highlight=False)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "llmstages", "--store", str(self.store), *args],
                                stdout=subprocess.PIPE if capture else None, text=True)
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start
        if result.returncode != 0:
            console.print(f"[red]demo stopped: `llmstages {shown}` exited with {result.returncode}[/red]")
            sys.exit(result.returncode)
        return result.stdout or ""

    def extra(self, stage: str) -> list[str]:
        return SMOKE[stage] if self.smoke else []


def run_log(store: Path, run: str) -> list[dict]:
    return RunLog(store / "runs" / run).records()


def training_log(store: Path, run: str) -> list[dict]:
    """The log of the run's training: its first member's where the run is a soup (finetune.soup), whose
    own log holds only the test figures of the average."""
    member = f"{run}-member1"
    return run_log(store, member if (store / "runs" / member).is_dir() else run)


def train_tokens_per_s(records: list[dict]) -> float | None:
    """Training throughput of a run: mean of its logged windows, the first (warm-up) left out."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rates = rates[1:] or rates
    return sum(rates) / len(rates) if rates else None


def dataset_folder(store: Path, prefix: str) -> Path:
    found = sorted((store / "data").glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"demo: no prepared dataset {prefix} in {store}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="store-demo", help="the demo's own store (emptied first)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (CI)")
    parser.add_argument("--publish", metavar="DOCS", help="run nothing: copy the results of the last demo in "
                        "--store into DOCS (the README's figures)")
    args = parser.parse_args(argv)
    store = Path(args.store)
    if args.publish:
        return publish(store, Path(args.publish))
    if store.exists():
        if any(store.iterdir()) and not (store / DEMO_MARKER).exists():
            console.print(f"[red]demo: {store} exists and is not a store the demo made; nothing was removed[/red]\n"
                          "  fix: give the demo a folder of its own with --store DIR (it is emptied on every run)")
            return 2
        console.print(f"demo: starting afresh, removing its store {store}")
        shutil.rmtree(store)
    store.mkdir(parents=True)
    (store / DEMO_MARKER).write_text("made by `python -m llmstages.demo`, which empties this folder on every run\n")
    if not os.environ.get("LLMSTAGES_DATA"):
        if args.smoke:
            console.print("[red]demo --smoke: needs $LLMSTAGES_DATA (its cut-down recipe names mirror files)[/red]")
            return 2
        console.print("demo: $LLMSTAGES_DATA is not set: data is downloaded from the recipes' public URLs")
    demo = Demo(store, args.smoke)
    wall = time.perf_counter()

    # 1. data and the base model
    demo.llmstages("prepare", "prepare", "quickstart", *demo.extra("pretrain"))
    demo.llmstages("pretrain", "pretrain", "quickstart", *demo.extra("pretrain"))
    base_log = run_log(store, "quickstart")
    base_eval = [r for r in base_log if "val_bpb" in r][-1]

    # 2. fine-tuning
    demo.llmstages("finetune spam", "finetune", "--task", "spam", *demo.extra("spam"))
    spam_test = json.loads((store / "runs" / "finetune-spam" / "test_metrics.json").read_text())
    demo.llmstages("finetune instruct", "finetune", "--task", "instruct", *demo.extra("instruct"))

    # 3. evaluation: instruct response loss on held-out examples, before (base) and after
    held_out = dataset_folder(store, "finetune-instruct") / "test.jsonl"
    limit = ["--limit", "10"] if args.smoke else []
    after = json.loads(demo.llmstages("evaluate", "evaluate", "finetune-instruct", "--data", str(held_out),
                                      "--json", *limit, capture=True))
    before = json.loads(demo.llmstages("evaluate", "evaluate", "quickstart", "--data", str(held_out),
                                       "--template", "alpaca", "--json", *limit, capture=True))

    # 4. using the models
    generation = json.loads(demo.llmstages("generate", "generate", "quickstart", BASE_PROMPT, "-n", "60",
                                           "--temperature", "0.8", "--top-k", "50", "--seed", "1", "--json",
                                           capture=True))
    classified = demo.llmstages("classify", "classify", "finetune-spam", *SPAM_SAMPLES, "--json", capture=True)
    answers = [json.loads(demo.llmstages("generate", "generate", "finetune-instruct", text, "-t", "0", "-n", "60",
                                         "--json", capture=True)) for text in INSTRUCT_SAMPLES]

    # 5. the results
    total = time.perf_counter() - wall
    prepare_stats = json.loads((dataset_folder(store, "quickstart") / "manifest.json").read_text())["stats"]
    results = {
        "smoke": args.smoke,
        "precision": demo_precision(),  # what train.precision: auto (the recipes' default) picked here
        "base": {"val_bpb": base_eval["val_bpb"], "val_loss": base_eval["val_loss"], "step": base_eval["step"],
                 "train_tokens_per_s": train_tokens_per_s(base_log)},
        "spam": {"test_accuracy": spam_test["accuracy"], "test_macro_f1": spam_test["f1"],
                 "test_spam_f1": spam_test["per_class"].get("spam", {}).get("f1"), "confusion": spam_test["confusion"],
                 "train_tokens_per_s": train_tokens_per_s(training_log(store, "finetune-spam"))},
        "instruct": {"response_loss_before": before["loss"], "response_loss_after": after["loss"],
                     "rouge_l_before": before.get("rouge_l"), "rouge_l_after": after.get("rouge_l"),
                     "ended_at_eot_before": before.get("ended_at_eot"), "ended_at_eot_after": after.get("ended_at_eot"),
                     "examples": after.get("examples"),
                     "train_tokens_per_s": train_tokens_per_s(run_log(store, "finetune-instruct"))},
        "prepare_tokens_per_s": prepare_stats.get("tokens_per_s"),
        "generate_tokens_per_s": generation["tokens_per_s"],
        "stage_seconds": {k: round(v, 1) for k, v in demo.times.items()},
        "total_seconds": round(total, 1),
        "samples": {"generate": generation["completion"], "classify": classified.strip(),
                    "instruct": [{"instruction": a["prompt"], "response": a["completion"]} for a in answers]},
    }
    print_results(results)
    (store / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results: {store / RESULTS} and {store / LOSS_PLOT}; `make demo-docs` copies them to the "
                  "README's figures in docs/", highlight=False)
    return 0


def demo_precision() -> dict:
    """The precision the demo's runs trained in and why: the figures depend on it (README)."""
    from llmstages.runtime import cpu_has_fast_bf16, resolve_device, resolve_precision

    device = resolve_device("auto")
    return {"device": device.type, "precision": resolve_precision("auto", device),
            "cpu_fast_bf16": cpu_has_fast_bf16()}


RESULTS = "demo-results.json"
LOSS_PLOT = "runs/quickstart/loss.png"


def publish(store: Path, docs: Path) -> int:
    """Copy the last demo's results and loss plot into `docs` (the README's figures); a smoke run's
    figures get a -smoke suffix, so they never replace the full demo's."""
    results = store / RESULTS
    if not results.is_file():
        console.print(f"[red]demo --publish: {results} does not exist[/red]\n  fix: run the demo first "
                      "(`make demo`), or give its store with --store DIR")
        return 2
    suffix = "-smoke" if json.loads(results.read_text()).get("smoke") else ""
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, docs / f"demo-results{suffix}.json")
    copied = [docs / f"demo-results{suffix}.json"]
    if (store / LOSS_PLOT).is_file():
        shutil.copyfile(store / LOSS_PLOT, docs / f"quickstart-loss{suffix}.png")
        copied.append(docs / f"quickstart-loss{suffix}.png")
    console.print(f"copied {', '.join(map(str, copied))} from {store}", highlight=False)
    return 0


def print_results(r: dict) -> None:
    def num(value, fmt="{:.4g}"):
        return "-" if value is None else fmt.format(value)

    t = r["stage_seconds"]
    table = Table(title="llmstages demo" + (" (smoke: tiny sizes, not meaningful figures)" if r["smoke"] else ""))
    for col in ("stage", "result", "tokens/s", "wall time (s)"):
        table.add_column(col)
    table.add_row("prepare", ("2" if r["smoke"] else "48") + " Gutenberg books -> token shards", num(r["prepare_tokens_per_s"], "{:,.0f}"),
                  num(t.get("prepare"), "{:.0f}"))
    table.add_row("pretrain", f"val bits/byte {num(r['base']['val_bpb'], '{:.3f}')} "
                  f"(loss {num(r['base']['val_loss'], '{:.3f}')}) at step {r['base']['step']}",
                  num(r["base"]["train_tokens_per_s"], "{:,.0f}"), num(t.get("pretrain"), "{:.0f}"))
    table.add_row("finetune spam", f"test accuracy {num(r['spam']['test_accuracy'], '{:.2%}')}, "
                  f"spam F1 {num(r['spam']['test_spam_f1'], '{:.3f}')}",
                  num(r["spam"]["train_tokens_per_s"], "{:,.0f}"), num(t.get("finetune spam"), "{:.0f}"))
    table.add_row("finetune instruct", f"held-out response loss {num(r['instruct']['response_loss_before'], '{:.3f}')}"
                  f" -> {num(r['instruct']['response_loss_after'], '{:.3f}')}, ROUGE-L "
                  f"{num(r['instruct']['rouge_l_before'], '{:.3f}')} -> {num(r['instruct']['rouge_l_after'], '{:.3f}')}",
                  num(r["instruct"]["train_tokens_per_s"], "{:,.0f}"), num(t.get("finetune instruct"), "{:.0f}"))
    table.add_row("generate", "60 tokens, KV cache", num(r["generate_tokens_per_s"], "{:,.0f}"),
                  num(t.get("generate"), "{:.0f}"))
    table.add_row("evaluate + classify", "", "", num(t.get("evaluate", 0) + t.get("classify", 0), "{:.0f}"))
    table.add_row("[bold]total", "", "", f"[bold]{r['total_seconds']:.0f}")
    console.print(table)
    console.print(f"[bold]base model:[/bold] {BASE_PROMPT}{r['samples']['generate']}", highlight=False)
    for sample in r["samples"]["instruct"]:
        console.print(f"[bold]instruction:[/bold] {sample['instruction']}\n[bold]response:[/bold] {sample['response']}",
                      highlight=False)


if __name__ == "__main__":
    sys.exit(main())
