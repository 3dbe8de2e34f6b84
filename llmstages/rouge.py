"""ROUGE-L (Lin 2004): overlap of a generated text with a reference by their longest common subsequence.

Tokens are made as Google's `rouge-score` package makes them without stemming: lowercase, every
character that is not a letter or digit becomes a space, split on whitespace. So "The cat sat." and
"the cat  sat" score 1.0, and the figures compare with those reported by that package.

    precision = LCS / len(candidate)    recall = LCS / len(reference)    F = 2PR / (P + R)
"""

from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """'The cat, sat!' -> ['the', 'cat', 'sat']."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming in O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of `candidate` against `reference` (0 when either has no tokens)."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
