"""Several fine-tunings of one classifier recipe, combined: `finetune.soup: N` averages their weights (a
weight soup, Wortsman et al. 2022, "Model soups"); `finetune.ensemble: N` keeps them side by side and
decides by the median of their probabilities (ensemble.py).

The recipe is fine-tuned N times, the runs alike but for the seed (the class head's initialisation,
the order of the batches): runs `<run>-member1` ... `<run>-memberN` with train.seed, seed + 1, ...
Each member is an ordinary run (resumed, verified, scored on the test split like any), so a kill
between or inside members loses nothing: `--resume` continues the member that was training and starts
the ones not begun. Then the members' final models are combined into run `<run>`, one checkpoint that
`classify`, `evaluate` and the test split use.

Why it helps: fine-tuned from one base, the members stay close enough in weight space that their mean
is a good model, and it keeps what the members agree on; an ensemble keeps every member, so a
message one member gets wrong is outvoted by the two that get it right. On the spam CV folds (README,
"Cross-validated") one seed makes 31-42 errors (seeds 9-18), the soup of two 33-39, three members
voting 31-36.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from rich.console import Console

from llmstages.averaging import commit_average, commit_ensemble
from llmstages.config import Recipe, dump_yaml
from llmstages.distributed import init_distributed, is_main_process
from llmstages.errors import UserError
from llmstages.loop import TrainResult
from llmstages.runstart import check_run_start
from llmstages.stages.classify import report_test_split
from llmstages.stages.prepare import get_or_prepare
from llmstages.store import Store


# finetune.combination -> how the members' final checkpoints become the run's: the commit, what the
# console says of it, and the meta.json key listing the members
COMBINE = {"soup": (commit_average, "averaged the weights of", "soup"),
           "ensemble": (commit_ensemble, "kept the models of", "members")}


def member_runs(recipe: Recipe) -> list[str]:
    return [f"{recipe.run}-member{k}" for k in range(1, recipe.finetune.members + 1)]


def member_recipe(recipe: Recipe, k: int) -> Recipe:
    """The recipe of member k (1-based): its own run name and seed, and no members of its own."""
    member = copy.deepcopy(recipe)
    member.run = f"{recipe.run}-member{k}"
    member.train.seed = recipe.train.seed + k - 1
    member.finetune.soup = member.finetune.ensemble = 1
    return member


def check_soup_start(store: Store, recipe: Recipe, resume: bool) -> None:
    """A fresh soup must not mix with checkpoints already there (the soup's or a member's); a resume
    needs at least one member checkpoint."""
    members = member_runs(recipe)
    if not resume:
        for run in (recipe.run, *members):
            check_run_start(store, run, resume=False)
    elif all(store.latest(run) is None for run in members):
        raise UserError(f"run {recipe.run!r} has no member checkpoint to resume from ({', '.join(members)})",
                        hint=f"start it without --resume (store: {store.root})")


def finetune_soup(recipe: Recipe, store: Store, finetune_one: Callable[..., TrainResult], *, resume: bool,
                  allow_change: bool, console: Console) -> TrainResult:
    """Train (or resume) every member with `finetune_one` (stages.finetune.finetune), then commit their
    average (soup) or their ensemble as run `recipe.run` and score it on the test split. Returns the
    combined model's TrainResult."""
    check_soup_start(store, recipe, resume)
    kind = recipe.finetune.combination
    started, results = time.perf_counter(), []
    joined = not torch.distributed.is_initialized()
    dctx = init_distributed(recipe.train.device)[0]  # under torchrun: one process group for all the members
    try:
        for k, run in enumerate(member_runs(recipe), 1):
            member = member_recipe(recipe, k)
            console.print(f"[bold]{kind} member {k} of {recipe.finetune.members}[/bold]: run {run}, "
                          f"train.seed={member.train.seed}", highlight=False)
            results.append(finetune_one(member, store, resume=resume and store.latest(run) is not None,
                                        allow_change=allow_change, console=console))
            dctx.barrier()  # rank 0 scored the member's test split; the next member starts together
    finally:
        if joined:
            dctx.close()
    if not is_main_process():
        return results[-1]
    paths = [store.resolve(result.run) for result in results]  # each one's best, else its last
    combine, done, key = COMBINE[kind]
    path = combine(store, recipe.run, paths, {key: [str(p) for p in paths]})
    (store.run_dir(recipe.run) / "recipe.yaml").write_text(dump_yaml(recipe))
    console.print(f"{kind}: {done} {', '.join(f'{p.parent.name}/{p.name}' for p in paths)} in {path}",
                  highlight=False)
    train_seconds = sum(r.train_seconds for r in results)
    tokens = sum(r.tokens for r in results)
    result = TrainResult(recipe.run, results[-1].step, path, {}, None, time.perf_counter() - started, tokens,
                         tokens / train_seconds if train_seconds else 0.0, train_seconds=train_seconds)
    report_test_split(result, get_or_prepare(recipe, store, console), store, console=console, path=path)
    return result
