"""Experiment loggers beside log.jsonl: TensorBoard and Weights & Biases (`train.loggers: [tensorboard]`).

Each is imported only when a recipe names it, so neither is a dependency; a named one that is not
installed stops the run before its first step with the pip command that installs it. They receive the
same records as log.jsonl (runlog.RunLog.write), as scalars under the same plain names (loss, val_loss,
lr, ...) at the record's step; text and lists (sample generations) stay in log.jsonl only.

    tensorboard   event files in runs/<run>/tensorboard/ (`tensorboard --logdir store/runs`), written with
                  torch.utils.tensorboard's SummaryWriter
    wandb         wandb.init(project=$WANDB_PROJECT or "llmstages", name=<run>, dir=runs/<run>, config=recipe);
                  WANDB_MODE=offline keeps it on this machine (`wandb sync` uploads it later)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from llmstages.errors import UserError

LOGGERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


class Logger(Protocol):
    def log(self, step: int, figures: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    def log(self, step: int, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llmstages"), name=run_name, dir=str(run_dir),
                              config=config)

    def log(self, step: int, figures: dict[str, float]) -> None:
        self.run.log(figures, step=step)

    def close(self) -> None:
        self.run.finish()


def _missing(name: str, package: str) -> UserError:
    return UserError(f"train.loggers names {name}, but the {package} package is not installed; nothing was trained",
                     hint=f"pip install {package}   (or pip install 'llmstages[{name}]'), or remove {name} from "
                          "train.loggers")


def require_packages(names: list[str]) -> None:
    """Refuse, before anything is written, a logger whose package is not installed (found without importing)."""
    import importlib.util
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise _missing(name, name)


def open_loggers(names: list[str], run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """The loggers a recipe names (train.loggers), each started; a missing package is a UserError."""
    loggers: list[Logger] = []
    try:
        for name in dict.fromkeys(names):  # each once, in the order given
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
            elif name == "wandb":
                loggers.append(WandbLogger(run_dir, run_name, config))
            else:  # the recipe schema allows only LOGGERS; a caller passing another name is a bug
                raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS)}")
    except BaseException:
        close_all(loggers)
        raise
    return loggers


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a log.jsonl record, without its step: what a logger can plot."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def close_all(loggers: list[Logger]) -> None:
    for logger in loggers:
        logger.close()
