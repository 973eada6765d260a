"""The paper's LM claims (arXiv 2407.10490, §4) as PASS/FAIL checks on measured numbers.

Measurements are a flat ``{key: float}`` dict per seed (:func:`measure` builds it from probe
curves). Keys:

* ``<run>.<set>.<type>.<metric>.first`` / ``.last`` — the mean over prompts of ``metric``
  (``logp_sum`` = log π(y|x), ``argmax_path`` = Σ_m log max_v π_m along the response,
  ``A_norm`` = mean ‖A_m‖_F over response positions) at the first and last evaluation of the run;
  ``.change`` = last − first.
* ``<run>.<set>.others.logp_sum.change`` — the mean change of log π over the "other" probe types
  (every type but chosen, rejected and the greedy y*).
* ``<run>.<set>.others.fall_share`` — the share of those types whose log π fell.
* ``<run>.degeneration`` — share of repeated word n-grams in greedy decodes after the run.
* ``<run>.loss.first`` / ``.last``, ``<run>.margin.first`` / ``.last`` (DPO runs) — the training
  objective and the implicit-reward margin (log π/π_ref of y⁺ minus that of y⁻) averaged over the
  first and the last fifth of the run's steps (:func:`history_measurements`).

Runs: ``sft`` (baseline SFT), ``sft_extend`` (SFT on y⁺ and y⁻), ``sft_long`` (longer SFT),
``dpo`` (off-policy DPO after ``sft``), ``dpo_extend``, ``dpo_onpolicy``, ``dpo_long``.

A claim (:class:`Claim`) is a predicate over the measurements; :func:`evaluate_claims`
applies every claim to each seed and to the mean over seeds, and returns JSON-able rows;
:func:`claims_markdown` renders them. A FAIL is reported as measured, never hidden.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ldjax.experiments import stats as S

__all__ = [
    "Claim",
    "CLAIMS",
    "NATURAL_EXCLUDE",
    "OTHER_EXCLUDE",
    "measure",
    "scalar_measurements",
    "count_outcomes",
    "repeated_ngram_share",
    "repeated_ngram_shares",
    "history_measurements",
    "evaluate_claims",
    "claims_markdown",
    "aggregate",
]

OTHER_EXCLUDE = ("chosen", "rejected", "greedy")
"""Types left out of "the other types" (the DPO pair itself and the decoded y*)."""

NATURAL_EXCLUDE = ("random_permute", "random_nonhum", "greedy")
"""Types that are not natural language (shuffled words) or not a fixed probe (y*)."""

METRICS = ("logp_sum", "argmax_path", "A_norm")


def repeated_ngram_shares(texts: Sequence[str], n: int = 3) -> np.ndarray:
    """Degeneration of each decode: 1 − #distinct word n-grams / #n-grams (0 = no repetition,
    → 1 = one n-gram repeated); NaN for a text with fewer than ``n`` words. Shape ``(len(texts),)``.
    """
    vals = []
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        vals.append(1.0 - len(set(grams)) / len(grams) if grams else np.nan)
    return np.asarray(vals, np.float64)


def repeated_ngram_share(texts: Sequence[str], n: int = 3) -> float:
    """The mean of :func:`repeated_ngram_shares` over texts with at least one n-gram; NaN when
    no text has ``n`` words."""
    v = repeated_ngram_shares(texts, n)
    v = v[np.isfinite(v)]
    return float(np.mean(v)) if v.size else float("nan")


def history_measurements(
    run: str, history: Mapping[str, Sequence[float]], keys: Sequence[str] = ("loss", "margin")
) -> dict:
    """``{<run>.<key>.first, <run>.<key>.last}``: the mean of ``history[key]`` over the first and
    the last fifth of the steps (at least one step each) — a training curve's start and end,
    smoothed over batches."""
    out = {}
    for k in keys:
        if k not in history:
            raise ValueError(f"history of run {run!r} has no {k!r} (keys: {sorted(history)})")
        v = np.asarray(history[k], np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(
                f"history {run}.{k} must be a non-empty 1-D sequence, got shape {v.shape}"
            )
        w = max(1, v.size // 5)
        out[f"{run}.{k}.first"] = float(np.mean(v[:w]))
        out[f"{run}.{k}.last"] = float(np.mean(v[-w:]))
    return out


def _vec(v):
    """A measurement as a float (a per-run number) or a tuple of per-prompt floats."""
    a = np.asarray(v, np.float64)
    return float(a) if a.ndim == 0 else tuple(float(x) for x in a)


def measure(curves: Mapping[str, Mapping], extra: Mapping[str, object] | None = None) -> dict:
    """Flat measurements (module docstring) from ``curves[run][set][type][metric]``: an ``(E,)``
    sequence over evaluations (a mean over prompts) or an ``(E, N)`` array (per prompt; then each
    measurement is a tuple of N per-prompt values, and the decision uses prompts as units).
    ``extra`` entries (floats, or per-prompt sequences) are copied in.

    ``others.logp_sum.change`` is, per prompt, the mean change over the other types;
    ``others.fall_share`` per prompt the share of other types whose log π fell."""
    m: dict = {}
    for run, sets in curves.items():
        for s, types in sets.items():
            for t, mets in types.items():
                for k, c in mets.items():
                    c = np.asarray(c, np.float64)
                    if c.ndim not in (1, 2) or c.shape[0] == 0 or c.size == 0:
                        raise ValueError(
                            f"curve {run}.{s}.{t}.{k} must be a non-empty (E,) or (E, N) array, "
                            f"got shape {c.shape}"
                        )
                    m[f"{run}.{s}.{t}.{k}.first"] = _vec(c[0])
                    m[f"{run}.{s}.{t}.{k}.last"] = _vec(c[-1])
                    m[f"{run}.{s}.{t}.{k}.change"] = _vec(c[-1] - c[0])
            others = [t for t in types if t not in OTHER_EXCLUDE and "logp_sum" in types[t]]
            if others:
                ch = np.stack([np.asarray(m[f"{run}.{s}.{t}.logp_sum.change"]) for t in others])
                m[f"{run}.{s}.others.logp_sum.change"] = _vec(ch.mean(0))
                m[f"{run}.{s}.others.fall_share"] = _vec((ch < 0).mean(0))
    for k, v in (extra or {}).items():
        m[k] = _vec(v)
    return m


def scalar_measurements(m: Mapping[str, object]) -> dict:
    """Every measurement as one float: per-prompt tuples replaced by their mean over prompts
    (NaN-aware) — the per-seed numbers of the JSON."""
    out = {}
    for k, v in m.items():
        a = np.asarray(v, np.float64)
        out[k] = (
            float(a) if a.ndim == 0 else float(np.nanmean(a)) if np.isfinite(a).any() else np.nan
        )
    return out


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim about the paired effects of a seed's measurements ``m``.

    ``effects(m) -> {name: (d, direction)}``: each condition of the claim as paired differences
    ``d`` (a float, or ``(N,)`` over prompts) whose sign should be ``direction`` (+1/−1); the
    claim holds when every condition does (:func:`ldjax.experiments.stats.combine_decisions`).
    ``context(m) -> {name: value}``: the levels shown beside the effect (means over prompts).
    ``section`` groups the table."""

    id: str
    section: str
    text: str
    effects: Callable[[Mapping], dict]
    context: Callable[[Mapping], dict]


def measurement(m, key):
    if key not in m:
        raise KeyError(f"measurement {key!r} is missing (have {len(m)} keys)")
    return np.asarray(m[key], np.float64)


def finite_mean(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _sign(run, s, t, metric, sign, label):
    def effects(m):
        return {f"Δ {label}": (measurement(m, f"{run}.{s}.{t}.{metric}.change"), sign)}

    def context(m):
        return {
            f"{t} first": finite_mean(measurement(m, f"{run}.{s}.{t}.{metric}.first")),
            f"{t} last": finite_mean(measurement(m, f"{run}.{s}.{t}.{metric}.last")),
        }

    return effects, context


def _natural_lowest(m):
    """(random_nonhum last, the natural-language type with the lowest mean last log π, its
    last log π) in run ``sft``."""
    types = sorted(
        {k.split(".")[2] for k in m if k.startswith("sft.train.") and k.endswith(".logp_sum.last")}
    )
    natural = [t for t in types if t not in NATURAL_EXCLUDE and t != "others"]
    low = measurement(m, "sft.train.random_nonhum.logp_sum.last")
    vals = {t: measurement(m, f"sft.train.{t}.logp_sum.last") for t in natural}
    if not vals:
        raise KeyError("no natural-language probe type measured in run 'sft'")
    lowest = min(vals, key=lambda t: finite_mean(vals[t]))
    return low, lowest, vals[lowest]


def _nonhum_lowest_effects(m):
    low, _, nat = _natural_lowest(m)
    return {"y_rnd − lowest natural type (last log π)": (low - nat, -1)}


def _nonhum_lowest_context(m):
    low, _, nat = _natural_lowest(m)
    return {
        "random_nonhum last": finite_mean(low),
        "lowest natural-language type last": finite_mean(nat),
    }


def _dpo_learns_effects(m):
    return {
        "DPO loss last − first": (
            measurement(m, "dpo.loss.last") - measurement(m, "dpo.loss.first"),
            -1,
        ),
        "margin last − first": (
            measurement(m, "dpo.margin.last") - measurement(m, "dpo.margin.first"),
            +1,
        ),
    }


def _dpo_learns_context(m):
    return {
        "DPO loss first": finite_mean(measurement(m, "dpo.loss.first")),
        "DPO loss last": finite_mean(measurement(m, "dpo.loss.last")),
        "margin first": finite_mean(measurement(m, "dpo.margin.first")),
        "margin last": finite_mean(measurement(m, "dpo.margin.last")),
    }


def _rejected_faster_effects(m):
    r = measurement(m, "dpo.train.rejected.logp_sum.change")
    c = measurement(m, "dpo.train.chosen.logp_sum.change")
    return {"Δ rejected": (r, -1), "Δ rejected − Δ chosen": (r - c, -1)}


def _rejected_faster_context(m):
    return {
        "Δ rejected": finite_mean(measurement(m, "dpo.train.rejected.logp_sum.change")),
        "Δ chosen": finite_mean(measurement(m, "dpo.train.chosen.logp_sum.change")),
    }


def _most_fall_effects(m):
    return {
        "share of other types that fall − ½": (
            measurement(m, "dpo.train.others.fall_share") - 0.5,
            +1,
        )
    }


def _most_fall_context(m):
    return {
        "share of other types that fall": finite_mean(
            measurement(m, "dpo.train.others.fall_share")
        ),
        "mean Δ of other types": finite_mean(measurement(m, "dpo.train.others.logp_sum.change")),
    }


def _compare(key_a, key_b, name_a, name_b, greater: bool, label: str = ""):
    """The claim m[key_a] > m[key_b] (greater) or m[key_a] < m[key_b]: effect a − b."""

    def effects(m):
        return {
            label or f"{name_a} − {name_b}": (
                measurement(m, key_a) - measurement(m, key_b),
                1 if greater else -1,
            )
        }

    def context(m):
        return {
            name_a: finite_mean(measurement(m, key_a)),
            name_b: finite_mean(measurement(m, key_b)),
        }

    return effects, context


def _longer_sft_effects(m):
    # squeeze = how much the other types decay during DPO (−mean Δ log π)
    sl = -measurement(m, "dpo_long.train.others.logp_sum.change")
    sb = -measurement(m, "dpo.train.others.logp_sum.change")
    return {"decay of others, long − baseline SFT": (sl - sb, +1)}


def _longer_sft_context(m):
    return {
        "decay of others, long SFT": -finite_mean(
            measurement(m, "dpo_long.train.others.logp_sum.change")
        ),
        "decay of others, baseline SFT": -finite_mean(
            measurement(m, "dpo.train.others.logp_sum.change")
        ),
        "Δ argmax path, long": finite_mean(
            measurement(m, "dpo_long.train.chosen.argmax_path.change")
        ),
        "Δ argmax path, baseline": finite_mean(
            measurement(m, "dpo.train.chosen.argmax_path.change")
        ),
    }


def _claim(id, section, text, pair):
    return Claim(id, section, text, pair[0], pair[1])


CLAIMS: tuple = (
    _claim(
        "sft_chosen_rises",
        "SFT",
        "log π(y⁺_u) rises during SFT",
        _sign("sft", "train", "chosen", "logp_sum", +1, "log π(y⁺)"),
    ),
    _claim(
        "sft_irr_train_rises",
        "SFT",
        "log π(y⁺_{j≠u}) (irr_train) rises during SFT",
        _sign("sft", "train", "irr_train", "logp_sum", +1, "log π(y⁺_{j≠u})"),
    ),
    _claim(
        "sft_random_permute_falls",
        "SFT",
        "log π(y_rnd') (random_permute) falls during SFT",
        _sign("sft", "train", "random_permute", "logp_sum", -1, "log π(y_rnd')"),
    ),
    _claim(
        "sft_random_nonhum_falls",
        "SFT",
        "log π(y_rnd) (random_nonhum) falls during SFT",
        _sign("sft", "train", "random_nonhum", "logp_sum", -1, "log π(y_rnd)"),
    ),
    _claim(
        "sft_random_nonhum_lowest",
        "SFT",
        "after SFT, log π(y_rnd) is below every natural-language type",
        (_nonhum_lowest_effects, _nonhum_lowest_context),
    ),
    _claim(
        "dpo_learns",
        "DPO",
        "off-policy DPO learns: its training loss falls and the chosen-vs-rejected "
        "margin (implicit reward) grows (first vs last fifth of the steps)",
        (_dpo_learns_effects, _dpo_learns_context),
    ),
    _claim(
        "dpo_rejected_falls_faster",
        "DPO",
        "off-policy DPO: log π(y⁻) falls, and faster than log π(y⁺)",
        (_rejected_faster_effects, _rejected_faster_context),
    ),
    _claim(
        "dpo_most_types_fall",
        "DPO",
        "off-policy DPO: most other probe types fall",
        (_most_fall_effects, _most_fall_context),
    ),
    _claim(
        "dpo_argmax_path_rises",
        "DPO",
        "off-policy DPO: teacher-forced argmax path Σ_m log max π_m along y⁺ rises (paper's 'y*')",
        _sign("dpo", "train", "chosen", "argmax_path", +1, "argmax path"),
    ),
    _claim(
        "dpo_peakiness_rises",
        "DPO",
        "off-policy DPO: peakiness ‖A_o‖ on y⁺ rises",
        _sign("dpo", "train", "chosen", "A_norm", +1, "‖A‖"),
    ),
    _claim(
        "dpo_greedy_rises",
        "DPO",
        "off-policy DPO: log π of the greedy-decoded y* rises (reported beside the argmax path)",
        _sign("dpo", "train", "greedy", "logp_sum", +1, "log π(y*)"),
    ),
    _claim(
        "longer_sft_more_squeeze",
        "Longer SFT",
        "a longer SFT before DPO → the other types decay more during DPO",
        (_longer_sft_effects, _longer_sft_context),
    ),
    _claim(
        "onpolicy_less_decay",
        "On-policy",
        "DPO with on-policy negatives → other types decay less than off-policy",
        _compare(
            "dpo_onpolicy.train.others.logp_sum.change",
            "dpo.train.others.logp_sum.change",
            "mean Δ others, on-policy",
            "mean Δ others, off-policy",
            True,
            "Δ others, on-policy − off-policy",
        ),
    ),
    _claim(
        "extend_rejected_higher",
        "Extend",
        "after SFT, log π(y⁻) is higher with extend than baseline",
        _compare(
            "sft_extend.train.rejected.logp_sum.last",
            "sft.train.rejected.logp_sum.last",
            "rejected after extend SFT",
            "rejected after baseline SFT",
            True,
            "log π(y⁻), extend − baseline",
        ),
    ),
    _claim(
        "extend_others_decay_slower",
        "Extend",
        "during DPO the other types decay more slowly after extend",
        _compare(
            "dpo_extend.train.others.logp_sum.change",
            "dpo.train.others.logp_sum.change",
            "mean Δ others, extend",
            "mean Δ others, baseline",
            True,
            "Δ others, extend − baseline",
        ),
    ),
    _claim(
        "extend_ystar_rises_slower",
        "Extend",
        "during DPO the argmax path y* rises more slowly after extend",
        _compare(
            "dpo_extend.train.chosen.argmax_path.change",
            "dpo.train.chosen.argmax_path.change",
            "Δ argmax path, extend",
            "Δ argmax path, baseline",
            False,
            "Δ argmax path, extend − baseline",
        ),
    ),
    _claim(
        "extend_heldout_chosen",
        "Extend",
        "after DPO, held-out log π(y⁺) is higher than the baseline's",
        _compare(
            "dpo_extend.test.chosen.logp_sum.last",
            "dpo.test.chosen.logp_sum.last",
            "held-out chosen, extend",
            "held-out chosen, baseline",
            True,
            "held-out log π(y⁺), extend − baseline",
        ),
    ),
    _claim(
        "extend_less_degenerate",
        "Extend",
        "after DPO, greedy decodes (held-out prompts) repeat word 2-grams less than baseline's",
        _compare(
            "dpo_extend.degeneration",
            "dpo.degeneration",
            "repeated 2-gram share, extend",
            "baseline",
            False,
            "repeated 2-gram share, extend − baseline",
        ),
    ),
)
"""Every claim of the table, in order."""


def aggregate(per_seed: Sequence[Mapping[str, object]]) -> tuple[dict, dict]:
    """``(mean, std)`` over seeds of every key's per-seed value (per-prompt values averaged over
    prompts first; keys present in all seeds; std ddof=0)."""
    if not per_seed:
        raise ValueError("no measurements")
    flat = [scalar_measurements(m) for m in per_seed]
    keys = set(flat[0]).intersection(*map(set, flat[1:]))
    mean = {k: float(np.mean([m[k] for m in flat])) for k in keys}
    std = {k: float(np.std([m[k] for m in flat])) for k in keys}
    return mean, std


def _stack(ds, name):
    """Per-seed paired differences -> ``(S, P)``; every seed must have the same P."""
    arrs = [np.atleast_1d(np.asarray(d, np.float64)) for d in ds]
    sizes = {a.size for a in arrs}
    if len(sizes) != 1:
        raise ValueError(
            f"effect {name!r}: seeds have different numbers of prompts {sorted(sizes)}"
        )
    return np.stack(arrs)


def evaluate_claims(
    per_seed: Sequence[Mapping[str, object]], claims: Sequence[Claim] = CLAIMS, level: float = 0.95
) -> list[dict]:
    """Each claim decided on its paired effects over seeds × prompts
    (:func:`ldjax.experiments.stats.decide`; the rule is documented in
    :mod:`ldjax.experiments.stats`).

    Rows: ``id, section, claim, n_seeds, status`` (PASS / FAIL / INCONCLUSIVE, or MISSING with
    ``error`` when a needed measurement is absent), ``effects``: one dict per condition with
    ``name, direction, effect, lo, hi, se, df, n_seeds, n_prompts, method, status``, the
    per-seed effects ``seed_effects`` (means over prompts) and ``d`` (the ``(S, P)`` paired
    differences the decision used); ``numbers {name: [mean, std over seeds]}`` (the context
    levels); ``seeds_passed``: seeds whose own effects all have the claimed sign."""
    rows = []
    for c in claims:
        row = {"id": c.id, "section": c.section, "claim": c.text, "n_seeds": len(per_seed)}
        try:
            effs = [c.effects(m) for m in per_seed]
            ctx = [c.context(m) for m in per_seed]
        except KeyError as e:
            row.update(status="MISSING", error=str(e), effects=[], numbers={}, seeds_passed=0)
            rows.append(row)
            continue
        out = []
        try:
            decided = [
                (name, S.decide(_stack([e[name][0] for e in effs], name), direction, level))
                for name, (_, direction) in effs[0].items()
            ]
        except ValueError as e:  # e.g. no finite difference: no decode had two words
            row.update(status="MISSING", error=str(e), effects=[], numbers={}, seeds_passed=0)
            rows.append(row)
            continue
        for name, r in decided:
            d = np.asarray(_stack([e[name][0] for e in effs], name))
            out.append(
                {
                    "name": name,
                    **r,
                    "seed_effects": [finite_mean(x) for x in d],
                    "d": [[float(v) for v in x] for x in d],
                }
            )
        seeds_ok = sum(
            all(np.sign(o["seed_effects"][i]) == o["direction"] for o in out)
            for i in range(len(per_seed))
        )
        row.update(
            status=S.combine_decisions([o["status"] for o in out]),
            effects=out,
            numbers={
                k: [float(np.mean([x[k] for x in ctx])), float(np.std([x[k] for x in ctx]))]
                for k in ctx[0]
            },
            seeds_passed=int(seeds_ok),
        )
        rows.append(row)
    return rows


def _num(v):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _fmt(v, s, n):
    if math.isnan(v):
        return "nan"
    return f"{v:.3g}" if n == 1 else f"{v:.3g} ± {s:.2g}"


def _effect_cell(e) -> str:
    lo = "−∞" if math.isinf(e["lo"]) else _num(e["lo"])
    hi = "∞" if math.isinf(e["hi"]) else _num(e["hi"])
    arrow = ">" if e["direction"] > 0 else "<"
    return (
        f"{e['name']} = {_num(e['effect'])} [{lo}, {hi}] "
        f"(claim {arrow} 0; {e['n_seeds']}×{e['n_prompts']}, ν={e['df']:.3g})"
    )


def count_outcomes(rows: Sequence[dict]) -> dict:
    """``{"PASS": n, "FAIL": n, "INCONCLUSIVE": n, "MISSING": n}``."""
    out = {k: 0 for k in (*S.OUTCOMES, "MISSING")}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def claims_markdown(rows: Sequence[dict], *, header: str = "") -> str:
    """The claims table as Markdown: one row per claim with each condition's effect, its 95 %
    interval (``[lo, hi]``; ``S×P`` seeds × prompts, ν degrees of freedom), the context levels,
    the decision and the seeds whose own effect has the claimed sign."""
    lines = [header] if header else []
    n = rows[0]["n_seeds"] if rows else 1
    lines += [
        "| # | section | claim | effect [95 % interval] | levels"
        + (" (mean ± std over seeds)" if n > 1 else "")
        + " | result | seeds with the claimed sign |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        effs = "; ".join(_effect_cell(e) for e in r["effects"]) or r.get("error", "")
        nums = "; ".join(f"{k} = {_fmt(v, s, n)}" for k, (v, s) in r["numbers"].items())
        lines.append(
            f"| {i} | {r['section']} | {r['claim']} | {effs} | {nums} | **{r['status']}** | "
            f"{r['seeds_passed']}/{n} |"
        )
    cnt = count_outcomes(rows)
    tail = f"{cnt['PASS']} PASS, {cnt['FAIL']} FAIL, {cnt['INCONCLUSIVE']} INCONCLUSIVE"
    if cnt["MISSING"]:
        tail += f", {cnt['MISSING']} MISSING"
    lines += [
        "",
        f"{tail} of {len(rows)} claims. Decision rule (`ldjax.experiments.stats`): PASS when the "
        "95 % interval of the paired effect excludes 0 on the claimed side, FAIL when it "
        "excludes 0 on the other side, INCONCLUSIVE otherwise; seeds and prompts are crossed "
        "random effects (t-interval with Satterthwaite's ν).",
    ]
    return "\n".join(lines) + "\n"
