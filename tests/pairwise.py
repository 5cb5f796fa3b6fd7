"""Test cases that cover every pair of factor levels at least once, instead of the full product.

``cases(factors)`` takes {name: levels} and returns a list of tuples (one value per factor, in
the dict's order). By default it is a greedy all-pairs covering array (deterministic: the same
list on every run); with ``LOWRANK_FUSED_EXHAUSTIVE=1`` (what a GPU session's test stage sets)
it is the full product. A bug that needs one factor level, or one combination of two, is still
caught; one that needs three specific levels at once may need the exhaustive run.
"""
from __future__ import annotations

import itertools
import os

ENV = "LOWRANK_FUSED_EXHAUSTIVE"


def exhaustive() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def _pair(f, a, g, b) -> tuple:
    """The pair (factor f at level a, factor g at level b), in factor order."""
    return (f, a, g, b) if f < g else (g, b, f, a)


def all_pairs(factors: dict) -> list[tuple]:
    """A greedy covering array of strength 2: each row starts from the first pair not covered
    yet and fills the other factors with the level that covers the most new pairs."""
    levels = [list(v) for v in factors.values()]
    n = len(levels)
    if n < 2:
        return [(v,) for v in levels[0]] if levels else []
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(n), 2)
                 for a in range(len(levels[i])) for b in range(len(levels[j]))}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(n):
            if k in row:
                continue

            def gain(level, k=k):
                return sum(_pair(k, level, f, v) in uncovered for f, v in row.items())
            row[k] = max(range(len(levels[k])), key=lambda lv: (gain(lv), -lv))
        for f, g in itertools.combinations(range(n), 2):
            uncovered.discard((f, row[f], g, row[g]))
        rows.append(tuple(levels[k][row[k]] for k in range(n)))
    return rows


def cases(factors: dict) -> list[tuple]:
    """The full product under LOWRANK_FUSED_EXHAUSTIVE=1, else ``all_pairs``."""
    if exhaustive():
        return list(itertools.product(*factors.values()))
    return all_pairs(factors)
