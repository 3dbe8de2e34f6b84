"""The start of a training run, before anything is built: a fresh RunState or the one a resume loads
(with the model's weights), the checks that a start or resume is allowed, and the run folder made
ready (partial writes cleaned, the log cut back to the checkpoint, the recipe written)."""

from __future__ import annotations

import importlib.util
import shutil
import sys

from llmstages.checkpoint import check_disk, load_for_resume
from llmstages.config import Recipe, dump_yaml
from llmstages.distributed import DistContext
from llmstages.errors import UserError
from llmstages.loggers import TENSORBOARD_DIR
from llmstages.model import GPT
from llmstages.runlog import RunLog
from llmstages.runstate import RunState
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer


def start_or_resume(model: GPT, tokenizer: Tokenizer, recipe: Recipe, data_fingerprint: str, store: Store,
                    dctx: DistContext, resume: bool, allow_change: bool) -> tuple[RunState, tuple[dict, dict] | None]:
    """A fresh RunState, or the one of the run's latest checkpoint (its weights loaded into `model`),
    with the saved train state (tensors, info) that the optimizer and the RNGs are restored from."""
    run, run_dir = recipe.run, store.run_dir(recipe.run)
    check_run_start(store, run, resume)
    saved = None
    if resume:
        saved = load_for_resume(store, recipe, model, tokenizer, data_fingerprint, allow_change=allow_change,
                                warn=lambda text: dctx.is_main and print(text, file=sys.stderr))
    state = RunState.from_saved(*saved) if saved is not None else RunState()
    check_disk(store, run, model)
    forget_other_best(store, run, state, recipe.train.best_metric, dctx.is_main)
    if dctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        store.clean_partial(run)
        # Resume: drop what was logged after the checkpoint. A fresh start in a folder without
        # checkpoints (a run killed before its first one): drop the old run's log entirely.
        log = RunLog(run_dir)
        log.truncate_after(state.step)
        if importlib.util.find_spec("matplotlib") is None:  # said once here, not at every evaluation
            print("note: matplotlib is not installed, so no loss.png is drawn (log.jsonl has every figure); "
                  "pip install 'llmstages[plot]' draws it", file=sys.stderr)
        if not resume:
            log.plot_path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # the old run's train.loggers events
        if not resume or allow_change:
            (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    dctx.barrier()
    return state, saved


def forget_other_best(store: Store, run: str, state: RunState, metric: str, is_main: bool) -> None:
    """A resume with --allow-change to another train.best_metric (or to none): the best checkpoint by
    the old metric is no longer the best. Its value goes on every rank (the new metric must not be
    compared with it, and patience counts afresh), and best.json on the main one (a run name then means
    the latest checkpoint until an evaluation marks a new best)."""
    if state.best is not None and state.best.get("metric") != metric:
        state.best, state.evals_since_best = None, 0
    old = store.read_best(run) if is_main else None
    if old is not None and old.get("metric") != metric:
        (store.run_dir(run) / "best.json").unlink(missing_ok=True)
        print(f"note: train.best_metric is now {metric}; the best checkpoint by {old.get('metric')} "
              f"(step {old['step']}) is no longer marked best", file=sys.stderr)


def check_run_start(store: Store, run: str, resume: bool) -> None:
    """A resume needs a checkpoint; a fresh start must not mix with an existing run's checkpoints.
    Stages call this before they prepare data, so a refused start writes nothing; `start_or_resume`
    calls it again (the store may have changed while the data was prepared)."""
    if resume and store.latest(run) is None:
        raise UserError(f"run {run!r} has no checkpoint to resume from",
                        hint=f"start it without --resume (store: {store.root})")
    if not resume and store.checkpoints(run):
        raise UserError(f"run {run!r} already has checkpoints in {store.run_dir(run)}",
                        hint="continue it with --resume, or start a new run with run=NEW_NAME")
