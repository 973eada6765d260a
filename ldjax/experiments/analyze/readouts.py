"""Readouts of an influence matrix: which training examples help or harm each probe most, and the
influence averaged by class pair (MNIST) or by probe response type (LM).

Every function takes plain arrays (a :class:`ldjax.Influence`'s ``delta``, or the on-disk arrays
it reads lazily) and returns arrays or dicts; nothing here computes gradients or writes files.

The score of a (u, o) pair is the predicted one-step change of the probe's own readout:

* classifiers: ``S[u, o] = Δ log π(y_o | x_o)`` after one step on u, the change of the probe's
  true-class log-probability (``delta[u, o, y_o]``; ``= −delta_loss_o``);
* sequences: ``S[u, o] = Δ log π(y_o | x_o)`` summed over the response tokens (``delta``).

Helpful training examples raise it (``S > 0``), harmful ones lower it (``S < 0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["scores", "top_k", "aggregate", "sort_order", "top_k_table", "top_abs"]


def scores(delta, targets_o=None) -> np.ndarray:
    """The score matrix ``S (N_u, N_o)`` of an influence result (module docstring).

    Args:
      delta: ``(N_u, N_o, V)`` (classifiers: ``targets_o (N_o,)`` picks each probe's class) or
        ``(N_u, N_o)`` (sequences: returned as float64).
      targets_o: ``(N_o,)`` int, the probes' classes; classifiers only.
    """
    d = np.asarray(delta, np.float64)
    if d.ndim == 2:
        return d
    if d.ndim != 3:
        raise ValueError(f"delta must be (N_u, N_o) or (N_u, N_o, V), got shape {d.shape}")
    if targets_o is None:
        raise ValueError("classifier influence (N_u, N_o, V) needs targets_o (N_o,)")
    y = np.asarray(targets_o).astype(int)
    if y.shape != (d.shape[1],):
        raise ValueError(f"targets_o has shape {y.shape}; expected ({d.shape[1]},) (N_o,)")
    return np.take_along_axis(d, y[None, :, None], axis=-1)[..., 0]


def top_k(score, k: int) -> dict:
    """The ``k`` most helpful and most harmful training examples of every probe.

    Args:
      score: ``(N_u, N_o)`` (:func:`scores`).
      k: how many (at most ``N_u``).

    Returns:
      A dict: ``helpful`` and ``harmful``, ``(N_o, k)`` int, indices into U, the largest ``S``
      first and the most negative first; ``helpful_score`` and ``harmful_score``, ``(N_o, k)``,
      their scores. Ties keep the smaller index first (a stable sort).

    Example:
      >>> import numpy as np
      >>> r = top_k(np.array([[0.1, -2.0], [0.5, 1.0], [-0.3, 0.0]]), 1)
      >>> r["helpful"].tolist(), r["harmful"].tolist()
      ([[1], [1]], [[2], [0]])
    """
    s = np.asarray(score, np.float64)
    if s.ndim != 2:
        raise ValueError(f"score must be (N_u, N_o), got shape {s.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = min(int(k), s.shape[0])
    up = np.argsort(-s, axis=0, kind="stable")[:k].T
    down = np.argsort(s, axis=0, kind="stable")[:k].T
    cols = np.arange(s.shape[1])[:, None]
    return dict(
        helpful=up,
        harmful=down,
        helpful_score=s.T[cols, up],
        harmful_score=s.T[cols, down],
    )


def aggregate(score, groups_u: Sequence, groups_o: Sequence, *, order_u=None, order_o=None):
    """The mean score over every pair of groups: ``M[a, b] = mean{S[u, o] : g_u = a, g_o = b}``.

    Args:
      score: ``(N_u, N_o)``.
      groups_u, groups_o: a group label per training example ``(N_u,)`` and per probe ``(N_o,)``
        (MNIST: the classes; LM: one group for U, the response type of each probe).
      order_u, order_o: the groups' order in the result (default: sorted).

    Returns:
      ``{"mean": (A, B), "count": (A, B) int, "groups_u": [...], "groups_o": [...]}``; a pair
      of groups without members has mean NaN.
    """
    s = np.asarray(score, np.float64)
    gu, go = np.asarray(groups_u), np.asarray(groups_o)
    if gu.shape != (s.shape[0],) or go.shape != (s.shape[1],):
        raise ValueError(
            f"groups_u {gu.shape} and groups_o {go.shape} must be ({s.shape[0]},) and "
            f"({s.shape[1]},) for a score of shape {s.shape}"
        )
    lu = list(order_u) if order_u is not None else sorted(set(gu.tolist()))
    lo = list(order_o) if order_o is not None else sorted(set(go.tolist()))
    mean = np.full((len(lu), len(lo)), np.nan)
    count = np.zeros((len(lu), len(lo)), int)
    for i, a in enumerate(lu):
        rows = s[gu == a]
        for j, b in enumerate(lo):
            block = rows[:, go == b]
            count[i, j] = block.size
            if block.size:
                mean[i, j] = block.mean()
    return dict(mean=mean, count=count, groups_u=lu, groups_o=lo)


def sort_order(groups: Sequence, order=None) -> np.ndarray:
    """Indices that sort items by group (in ``order``, default sorted), stable within a group."""
    g = np.asarray(groups)
    levels = list(order) if order is not None else sorted(set(g.tolist()))
    rank = {v: i for i, v in enumerate(levels)}
    return np.argsort(np.array([rank[v] for v in g.tolist()]), kind="stable")


def top_k_table(top: dict, probes: Sequence[dict], train: Sequence[dict], k: int = 3) -> list:
    """Top-k training examples of every probe as records (JSON-able), e.g. for the LM's text
    readout: ``[{"probe": i, **probes[i], "helpful": [{"u", "score", **train[u]}, ...],
    "harmful": [...]}]``."""
    out = []
    for i, probe in enumerate(probes):
        row = dict(probe=i, **probe)
        for side in ("helpful", "harmful"):
            row[side] = [
                dict(u=int(u), score=float(sc), **train[int(u)])
                for u, sc in zip(top[side][i][:k], top[f"{side}_score"][i][:k])
            ]
        out.append(row)
    return out


def top_abs(s, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` entries of ``s (N_u, N_o)`` largest in ``|s|``: ``(u, o)`` index arrays ``(k',)``,
    ``k' = min(k, s.size)``, largest first; ties go to the smaller ``u``, then the smaller ``o``
    (a stable sort of the row-major order)."""
    s = np.asarray(s)
    if s.ndim != 2:
        raise ValueError(f"s must be (N_u, N_o), got shape {s.shape}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    flat = np.argsort(-np.abs(s.astype(np.float64)).ravel(), kind="stable")[: min(k, s.size)]
    u, o = np.unravel_index(flat, s.shape)
    return u.astype(int), o.astype(int)
