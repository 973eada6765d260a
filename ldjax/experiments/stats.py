"""Statistics the experiments share: ranks and correlations (one implementation for all).

>>> from ldjax.experiments.stats import pearson, spearman
>>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 3)
0.8
>>> pearson([1, 2, 3], [2, 4, 6])
1.0
"""

from __future__ import annotations

import numpy as np

__all__ = ["rank", "pearson", "spearman"]


def rank(a) -> np.ndarray:
    """Ranks ``1..n`` of a flattened array, ties given their average rank
    (``scipy.stats.rankdata``)."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, np.float64)
    ranks[order] = np.arange(1, a.size + 1)
    _, inv = np.unique(a, return_inverse=True)
    sums = np.bincount(inv, weights=ranks)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def pearson(a, b) -> float:
    """Pearson correlation of two arrays of equal size (flattened).

    Raises:
      ValueError: the sizes differ, fewer than 2 values, or an array is constant (the
        correlation is undefined).
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(
            f"a correlation needs two arrays of equal size >= 2, got {a.size} and {b.size}"
        )
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if not den > 0:
        raise ValueError("the correlation is undefined for a constant array")
    return float(np.sum(a * b) / den)


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks (:func:`pearson`'s errors)."""
    return pearson(rank(a), rank(b))
