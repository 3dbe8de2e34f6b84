"""What a run tells the user while it trains: log.jsonl, loss.png, the progress bar, the summary table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RunLog:
    """Appends one JSON object per logged step or eval to `log.jsonl`; redraws `loss.png`; hands the
    record's numbers to the experiment loggers a recipe names (loggers.py: TensorBoard, W&B)."""

    def __init__(self, run_dir: Path, loggers: list | None = None):
        self.path = run_dir / "log.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.loggers = list(loggers or [])  # loggers.Logger objects, started by the caller

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we resume from (and a line cut by a kill)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.loggers and "step" in record:
            from llmstages.loggers import scalars
            figures = scalars(record)
            for logger in self.loggers:
                logger.log(record["step"], figures)

    def close(self) -> None:
        """Flush and close the experiment loggers (log.jsonl itself is closed after every write)."""
        from llmstages.loggers import close_all
        loggers, self.loggers = self.loggers, []
        close_all(loggers)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def plot(self, title: str = "") -> Path | None:
        """Draw training and validation loss (and bits per byte when logged) into loss.png."""
        return plot_losses(self.records(), self.plot_path, title)


def plot_losses(records: list[dict], out: Path, title: str = "") -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # plotting is optional: pip install 'llmstages[plot]'
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    bpb = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    if bpb:
        ax2 = ax.twinx()
        ax2.plot(*zip(*bpb), "s--", color="tab:green", label="val bits/byte", markersize=3, linewidth=1)
        ax2.set_ylabel("bits per byte")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def fmt(value: float | int | str | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value != value or math.isinf(value):
        return str(value)
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


class TrainProgress:
    """A rich progress bar on a terminal; plain lines (one per log step) in logs and pipes."""

    def __init__(self, console: Console, total: int | None, start: int, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.fields = ""
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, figures: dict, total: int | None = None) -> None:
        """`total`: the run's step count, when it changes as it goes (a time budget's estimate)."""
        if not self.enabled:
            return
        info = "  ".join(f"{k} {fmt(v)}" for k, v in figures.items() if v is not None)
        if self.live:
            self.progress.update(self.task, completed=step, info=info, **({"total": total} if total else {}))
        else:
            self.console.print(f"step {step}  {info}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def raw(self, text: str) -> None:
        """Text printed exactly as given: no markup, no wrapping (a command to copy and paste)."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def summary_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for key, value in rows.items():
        table.add_row(key, fmt(value) if isinstance(value, (int, float)) else str(value))
    return table
