"""`llmstages recipes`, `runs` and `show`: tables of what is built in and what is in the store.

Browsing reads JSON and YAML only: nothing here imports torch (ckptmeta.py, not checkpoint.py), so these
commands answer in a fraction of a second; `verify`, which loads weights, imports it when it runs.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmstages.ckptmeta import lineage, read_meta, read_model_json
from llmstages.config import builtin_recipes, read_yaml
from llmstages.errors import UserError
from llmstages.jsonio import dumps
from llmstages.runlog import fmt
from llmstages.store import STEP_RE, RunInfo, Store, is_committed
from llmstages.store import verify as verify_folder

LOG_FIGURES = ("step", "loss", "val_loss", "val_bpb", "f1")  # the last-log columns `runs` shows
RUN_COLUMNS = ("run", "task", "checkpoints", "last step", "best", "last log")


def print_recipes(console: Console) -> None:
    table = Table(title="built-in recipes", show_lines=False)
    table.add_column("recipe", style="bold cyan")
    table.add_column("task")
    table.add_column("description")
    for path in builtin_recipes():
        raw = read_yaml(path)
        table.add_row(path.stem, str(raw.get("task", "pretrain")), str(raw.get("description", "")))
    console.print(table)


def print_runs(console: Console, store: Store, *, as_json: bool = False) -> None:
    """The runs as a table on a terminal; as plain tab-separated rows in a pipe (whole run names, for
    grep and cut), or one JSON object with `as_json`."""
    rows = [run_row(store, info) for info in store.runs()]
    if as_json:
        print(dumps({"store": str(store.root), "runs": rows}))
        return
    if not rows:
        console.print(f"no runs in {store.root} yet — start with `llmstages pretrain quickstart`")
        return
    cells = [[row["run"], row["task"], str(row["checkpoints"]), str(row["last_step"] or 0) if row["checkpoints"] else "-",
              _best(row["best"]), _last_log(row["last_log"])] for row in rows]
    if not console.is_terminal:  # a table in a pipe is cut to 80 columns: names would be wrapped or lost
        for line in [RUN_COLUMNS, *cells]:
            sys.stdout.write("\t".join(line) + "\n")
        return
    table = Table(title=f"runs in {store.root}")
    for col in RUN_COLUMNS:
        table.add_column(col, no_wrap=col == "run")
    for line in cells:
        table.add_row(*line)
    console.print(table)


def run_row(store: Store, info: RunInfo) -> dict:
    """One run as plain data: what `runs` prints, and `runs --json` gives."""
    log = {k: v for k, v in (info.last_log or {}).items() if k in LOG_FIGURES}
    return {"run": info.name, "task": _task(store, info.name), "checkpoints": len(info.steps),
            "last_step": info.steps[-1] if info.steps else None, "best": info.best, "last_log": log}


def _best(best: dict | None) -> str:
    return f"{best.get('metric')}={_figure(best.get('value'))} @ {best['step']}" if best else "-"


def _last_log(log: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items())


def _task(store: Store, run: str) -> str:
    """The task of a run's latest checkpoint ("?" when it has none or its meta cannot be read)."""
    latest = store.latest(run)
    with contextlib.suppress(UserError):
        return str(read_meta(latest).get("task", "?")) if latest is not None else "?"
    return "?"


def _figure(value) -> str:
    return fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def print_checkpoint(console: Console, store: Store, model: str, *, as_json: bool = False) -> None:
    """Model config, the dataset it was trained on, the metrics stored with the checkpoint, and its
    lineage (newest first)."""
    path = store.resolve(model)
    config = read_model_json(path)
    chain = lineage(path, store)
    if as_json:  # plain print: valid JSON (null for NaN), never wrapped or highlighted
        print(dumps({"path": str(path), "config": config, "lineage": chain}, default=str))
        return
    meta = chain[0]
    console.print(f"[bold]{path}[/bold]  task={meta.get('task')}  step={meta.get('step')}", highlight=False,
                  soft_wrap=True)
    if (data := dataset_line(path, meta)) is not None:
        console.print(data, highlight=False, soft_wrap=True)
    for key, what in (("members", f"an ensemble of {meta.get('ensemble')} classifiers (the median of their "
                                  "probabilities decides), the model below each one's:"),
                      ("soup", "the average of the weights of:")):
        if isinstance(meta.get(key), list):
            console.print(f"{what} {', '.join(map(str, meta[key]))}", highlight=False, soft_wrap=True)
    table = Table(title="model", show_header=False)
    for key, value in config.items():
        if key in LORA_FIELDS and not config.get("lora_rank"):
            continue  # a model without adapters: its LoRA settings say nothing
        if value not in (None, [], 0) or key in ("n_layer", "n_head"):
            table.add_row(key, str(value))
    console.print(table)
    if isinstance(meta.get("metrics"), dict) and meta["metrics"]:
        metrics = Table(title="metrics", show_header=False)
        for key, value in meta["metrics"].items():
            if not isinstance(value, (int, float, str)):
                continue  # logged samples and matrices: see log.jsonl
            metrics.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(metrics)
    console.print("[bold]lineage[/bold] (newest first):")
    for depth, item in enumerate(chain):
        what = "(not found)" if item.get("missing") else f"task={item.get('task')} step={item.get('step')}"
        console.print(f"  {'  ' * depth}{'└─ ' if depth else ''}{item['ref']}  {what}", highlight=False,
                      soft_wrap=True)


def dataset_line(path: Path, meta: dict) -> str | None:
    """`data: <prepared dataset folder> (source ...)`: the dataset a checkpoint was trained on, found in
    its store by fingerprint; None for a model with no data recorded (hf: imports)."""
    fingerprint = meta.get("data_fingerprint")
    settings = meta.get("data_settings") if isinstance(meta.get("data_settings"), dict) else {}
    if not isinstance(fingerprint, str) or not fingerprint:
        return None
    root = path.parent.parent.parent  # STORE/runs/RUN/step-N
    found = sorted((root / "data").glob(f"*-{fingerprint[:12]}")) if (root / "data").is_dir() else []
    where = f"data/{found[0].name}" if found else f"dataset {fingerprint[:12]} (not in this store)"
    source = settings.get("source")
    source = ", ".join(map(str, source)) if isinstance(source, list) else source
    return f"data: {where}" + (f"  source: {source}" if source else "")


def verify_store(console: Console, store: Store, run: str | None = None) -> bool:
    """Check every checkpoint of `run` (default: of every run, and every prepared dataset) and print one
    line per folder, each problem under it. True when everything verifies."""
    from llmstages.checkpoint import verify_checkpoint  # loads weights: torch, imported only here

    if run is not None and not store.run_dir(run).is_dir():
        raise UserError(f"no run {run!r} in {store.root}", hint="`llmstages runs` lists the runs")
    runs = [run] if run is not None else [info.name for info in store.runs()]
    # every step-N folder, also one that no longer looks committed (a truncated file, a lost MANIFEST):
    # commits are one rename, so such a folder was damaged after it was written
    folders = [(f"{name}/{path.name}", path, verify_checkpoint) for name in runs
               for path in sorted(store.run_dir(name).iterdir()) if STEP_RE.fullmatch(path.name)]
    data_root = store.data_dir("x").parent
    if run is None and data_root.is_dir():
        folders += [(f"data/{p.name}", p, verify_folder) for p in sorted(data_root.iterdir())
                    if p.is_dir() and not p.name.startswith(".") and is_committed(p)]
    bad = 0
    for label, path, check in folders:
        problems = check(path)
        bad += bool(problems)
        console.print(f"{'[red]BAD[/red]' if problems else '[green]ok[/green] '}  {label}", highlight=False)
        for problem in problems:
            console.print(f"      {problem}", highlight=False, soft_wrap=True)
    console.print(f"{len(folders)} folder{'s' if len(folders) != 1 else ''} checked, {bad} bad", highlight=False)
    return bad == 0
