"""ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Lin, 2004), with rouge-score's default tokenisation: lower-case,
every run of characters other than a-z and 0-9 is a separator, no stemming."""

from __future__ import annotations

import re
from collections import Counter

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return [t for t in _SEPARATORS.split(text.lower()) if t]


def _f(overlap: int, candidate: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / candidate, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _ngram_f(candidate: list[str], reference: list[str], n: int) -> float:
    c = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
    r = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    return _f(sum((c & r).values()), sum(c.values()), sum(r.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge(candidate: str, reference: str) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"} F-measures of one candidate against one reference."""
    c, r = tokenize(candidate), tokenize(reference)
    return {
        "rouge1": _ngram_f(c, r, 1),
        "rouge2": _ngram_f(c, r, 2),
        "rougeL": _f(_lcs(c, r), len(c), len(r)),
    }
