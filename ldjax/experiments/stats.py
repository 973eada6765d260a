"""Statistics the experiments share: ranks and correlations, and the PASS / FAIL / INCONCLUSIVE
decision rule of the claims tables (one implementation for all).

>>> from ldjax.experiments.stats import pearson, spearman
>>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 3)
0.8
>>> pearson([1, 2, 3], [2, 4, 6])
1.0

**The decision rule** (:func:`paired_interval`, :func:`decide`, :func:`combine_decisions`).
A claim's effect is a *paired difference* ``d[s, p]``: for seed ``s`` (training randomness: init,
batch order) and tracked prompt ``p`` (the sample of prompts), e.g. Δ log π(y⁻|x_p) in run ``s``,
or log π_extend(y⁻|x_p) − log π_baseline(y⁻|x_p) (same seed, same prompt). Claims about a per-run
number (a loss, a decode statistic) have one column, ``P = 1``. The effect size is the grand mean
``d̄`` — the mean over seeds of each seed's mean over prompts — with a 95 % interval

    d̄ ± t_{0.975, ν} · √V.

Seeds and prompts are *crossed* (every seed is measured on the same prompts), so ``d`` is modelled
as ``μ + a_s + b_p + e_sp`` with random seed effects ``a`` (σ²_a), prompt effects ``b`` (σ²_b) and
residual ``e`` (σ²_e), and ``Var(d̄) = σ²_a/S + σ²_b/P + σ²_e/(SP)``. From the two-way ANOVA mean
squares (``MS_S``: between seed means, ν_S = S−1; ``MS_P``: between prompt means, ν_P = P−1;
``MS_E``: interaction, ν_E = (S−1)(P−1)), the unbiased estimate is

    V = (MS_S' + MS_P' − MS_E) / (S·P),   MS_S' = max(MS_S, MS_E),  MS_P' = max(MS_P, MS_E)

(the max truncates a negative variance component at 0), and ν is Satterthwaite's degrees of
freedom of that combination of mean squares. Special cases, all the textbook paired t-tests:

* ``P = 1`` (a per-run number): V = var_s(d)/S, ν = S − 1 — the paired t over seeds;
* ``S = 1`` (one seed): V = var_p(d)/P, ν = P − 1 — the paired t over prompts (training randomness
  is then not represented, and the row says ``n_seeds = 1``);
* no prompt effect (MS_P ≤ MS_E): V = MS_S/(SP) = var_s(seed means)/S, ν = S − 1 — the t over the
  seeds' per-prompt means; no seed effect (MS_S ≤ MS_E): the t over the prompts' seed means;
* ``S = P = 1``: no interval can be estimated: ``(−∞, ∞)``, INCONCLUSIVE.

Why not the alternatives. A bootstrap over 3 seeds has 10 distinct resamples and its percentile
interval is the z-interval with a 2/3 variance — far too narrow; a hierarchical bootstrap over
seeds × prompts inherits that at the seed level. A sign test over 3 seeds can never reach 5 %
(its smallest two-sided p is 0.25), and a sign test over the S·P cells treats them as
independent, ignoring that a seed moves all its prompts together. The crossed t-interval uses
both sources of variation, is exact in the balanced normal model, and degrades to the paired t
over whichever unit is present. Its weakness: with S = 3 and a large seed effect, ν ≈ 2 and
t = 4.3 — wide intervals, i.e. honest INCONCLUSIVE rows.

Outcomes (:func:`decide`), for a claimed direction ``+1`` (the effect is positive) or ``−1``:
**PASS** when the interval excludes 0 on the claimed side, **FAIL** when it excludes 0 on the
other side, **INCONCLUSIVE** otherwise. A claim made of several conditions (``A and B``) is
:func:`combine_decisions`: PASS if all pass, FAIL if any fails, else INCONCLUSIVE.

>>> from ldjax.experiments.stats import decide
>>> decide([[1.0, 1.2, 0.9], [1.1, 0.8, 1.0]], +1)["status"]
'PASS'
>>> decide([[1.0, -1.2, 0.9], [-1.1, 0.8, 1.0]], +1)["status"]
'INCONCLUSIVE'
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _st

__all__ = [
    "rank",
    "pearson",
    "spearman",
    "paired_interval",
    "decide",
    "combine_decisions",
    "OUTCOMES",
    "LEVEL",
]

OUTCOMES = ("PASS", "FAIL", "INCONCLUSIVE")
"""The three decisions of :func:`decide`."""

LEVEL = 0.95
"""Two-sided confidence level of the claims' intervals."""


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


def _as_matrix(d) -> np.ndarray:
    """``(S, P)`` float array from a scalar, an ``(S,)`` vector (one number per seed) or an
    ``(S, P)`` matrix; prompts (columns) with a non-finite value in any seed are dropped."""
    a = np.asarray(d, np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a[:, None]
    elif a.ndim != 2:
        raise ValueError(f"paired differences must be (S,) or (S, P), got shape {a.shape}")
    a = a[:, np.all(np.isfinite(a), axis=0)]
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"no finite paired differences (shape {np.shape(d)})")
    return a


def paired_interval(d, level: float = LEVEL) -> dict:
    """Effect size and two-sided ``level`` interval of paired differences ``d`` (module docstring).

    Args:
      d: ``(S, P)`` differences, seeds × prompts (or ``(S,)``: one number per seed; a scalar).
        Columns with a non-finite entry are dropped (a prompt must be measured in every seed).
      level: confidence level in (0, 1).

    Returns:
      ``{"effect": d̄, "lo", "hi", "se": √V, "df": ν, "n_seeds": S, "n_prompts": P, "method"}``;
      ``method`` names the case (``"crossed"``, ``"seeds"``, ``"prompts"``, ``"none"``).

    >>> r = paired_interval([2.0, 3.0, 4.0])           # 3 seeds, one number each
    >>> r["effect"], r["df"], round(r["lo"], 3), round(r["hi"], 3)
    (3.0, 2.0, 0.516, 5.484)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = _as_matrix(d)
    S, P = a.shape
    m = float(a.mean())
    out = {"effect": m, "n_seeds": S, "n_prompts": P}
    if S == 1 and P == 1:
        return {**out, "lo": -np.inf, "hi": np.inf, "se": np.inf, "df": 0.0, "method": "none"}
    if P == 1 or S == 1:
        v = a.ravel()
        n = v.size
        terms = [(1.0, float(np.var(v, ddof=1)) / n, n - 1.0)]
        method = "seeds" if P == 1 else "prompts"
    else:
        rows, cols = a.mean(1), a.mean(0)
        ms_s = P * float(np.sum((rows - m) ** 2)) / (S - 1)
        ms_p = S * float(np.sum((cols - m) ** 2)) / (P - 1)
        resid = a - rows[:, None] - cols[None, :] + m
        df_e = (S - 1.0) * (P - 1.0)
        ms_e = float(np.sum(resid**2)) / df_e
        n = S * P
        terms = []
        if ms_s > ms_e:
            terms.append((1.0, ms_s / n, S - 1.0))
        if ms_p > ms_e:
            terms.append((1.0, ms_p / n, P - 1.0))
        if len(terms) == 2:
            terms.append((-1.0, ms_e / n, df_e))
        elif not terms:
            terms.append((1.0, ms_e / n, df_e))
        method = "crossed"
    var = sum(c * v for c, v, _ in terms)
    den = sum((c * v) ** 2 / df for c, v, df in terms)
    df = float(var**2 / den) if den > 0 else float(sum(df for _, _, df in terms))
    se = float(np.sqrt(max(var, 0.0)))
    half = float(_st.t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0
    return {**out, "lo": m - half, "hi": m + half, "se": se, "df": df, "method": method}


def decide(d, direction: int, level: float = LEVEL) -> dict:
    """PASS / FAIL / INCONCLUSIVE for the claim "the effect of ``d`` has the sign ``direction``"
    (module docstring): :func:`paired_interval`'s dict plus ``"status"`` and ``"direction"``.

    PASS: the interval lies strictly on the claimed side of 0; FAIL: strictly on the other side;
    INCONCLUSIVE: it contains 0 (or cannot be estimated).

    >>> decide([-0.5, -0.7, -0.6], -1)["status"]
    'PASS'
    >>> decide([-0.5, -0.7, -0.6], +1)["status"]
    'FAIL'
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    r = paired_interval(d, level)
    lo, hi = r["lo"], r["hi"]
    if direction > 0:
        status = "PASS" if lo > 0 else "FAIL" if hi < 0 else "INCONCLUSIVE"
    else:
        status = "PASS" if hi < 0 else "FAIL" if lo > 0 else "INCONCLUSIVE"
    return {**r, "direction": int(direction), "status": status}


def combine_decisions(statuses) -> str:
    """A conjunction of conditions: PASS if every one passes, FAIL if any fails, else
    INCONCLUSIVE.

    >>> combine_decisions(["PASS", "INCONCLUSIVE"]), combine_decisions(["PASS", "FAIL"])
    ('INCONCLUSIVE', 'FAIL')
    """
    statuses = list(statuses)
    if not statuses:
        raise ValueError("no decisions to combine")
    bad = [s for s in statuses if s not in OUTCOMES]
    if bad:
        raise ValueError(f"unknown decisions {bad}; expected one of {OUTCOMES}")
    if "FAIL" in statuses:
        return "FAIL"
    return "PASS" if all(s == "PASS" for s in statuses) else "INCONCLUSIVE"
