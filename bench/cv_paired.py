"""Paired comparison of two classifiers scored on the same messages (used by spam_cv.py).

Fold means and their spread say how far apart two systems are on average; they do not say whether
the gap is larger than chance. On the same messages the question is answered by the messages only
one of them gets wrong: if both were equally good, each such message would be equally likely to be
the other's mistake (McNemar's test, here exact: a two-sided binomial test with p = 1/2).
"""

from __future__ import annotations

from math import comb


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value for `only_first` against `only_second` discordant messages
    (1.0 when there are none)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(per_fold: list[dict], system: str, other: str) -> dict | None:
    """Messages only `system` gets wrong, only `other` gets wrong, both, and the McNemar p-value, over
    the folds given; None when a fold lacks the per-message `wrong` lists (results of older versions)."""
    if not all("wrong" in row[s] for row in per_fold for s in (system, other)):
        return None
    mine = {i for row in per_fold for i in row[system]["wrong"]}
    theirs = {i for row in per_fold for i in row[other]["wrong"]}
    only_mine, only_theirs = len(mine - theirs), len(theirs - mine)
    return {f"{system}_only": only_mine, f"{other}_only": only_theirs, "both": len(mine & theirs),
            "mcnemar_p": mcnemar_p(only_mine, only_theirs)}


def always_wrong(runs_per_fold: list[list[dict]], system: str, others: tuple[str, ...]) -> dict | None:
    """Across runs of the same folds (e.g. seeds): the messages every run of `system` gets wrong, and
    how many of them each of `others` gets wrong too (errors no seed removes: what bounds a margin).
    None when a run lacks the per-message lists."""
    if not all("wrong" in row[s] for rows in runs_per_fold for row in rows for s in (system,) + others):
        return None
    per_run = [{i for row in rows for i in row[system]["wrong"]} for rows in runs_per_fold]
    every = set.intersection(*per_run)
    first = runs_per_fold[0]
    out = {f"{system}_every_run": len(every), f"{system}_some_run": len(set.union(*per_run))}
    for other in others:
        out[f"also_{other}"] = len(every & {i for row in first for i in row[other]["wrong"]})
    return out
