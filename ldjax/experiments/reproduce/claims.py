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

__all__ = [
    "Claim",
    "CLAIMS",
    "NATURAL_EXCLUDE",
    "OTHER_EXCLUDE",
    "measure",
    "repeated_ngram_share",
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


def repeated_ngram_share(texts: Sequence[str], n: int = 3) -> float:
    """Degeneration of decodes: mean over texts (with at least one word n-gram) of
    1 − #distinct n-grams / #n-grams; 0 = no repetition, → 1 = one n-gram repeated.
    NaN when no text has ``n`` words."""
    vals = []
    for t in texts:
        w = t.split()
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        if grams:
            vals.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(vals)) if vals else float("nan")


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


def measure(curves: Mapping[str, Mapping], extra: Mapping[str, float] | None = None) -> dict:
    """Flat measurements (module docstring) from ``curves[run][set][type][metric]`` = a 1-D
    sequence over evaluations (mean over prompts). ``extra`` entries are copied in."""
    m: dict = {}
    for run, sets in curves.items():
        for s, types in sets.items():
            for t, mets in types.items():
                for k, c in mets.items():
                    c = np.asarray(c, np.float64)
                    if c.ndim != 1 or c.size == 0:
                        raise ValueError(
                            f"curve {run}.{s}.{t}.{k} must be a non-empty 1-D sequence, "
                            f"got shape {c.shape}"
                        )
                    m[f"{run}.{s}.{t}.{k}.first"] = float(c[0])
                    m[f"{run}.{s}.{t}.{k}.last"] = float(c[-1])
                    m[f"{run}.{s}.{t}.{k}.change"] = float(c[-1] - c[0])
            others = [t for t in types if t not in OTHER_EXCLUDE and "logp_sum" in types[t]]
            if others:
                ch = [m[f"{run}.{s}.{t}.logp_sum.change"] for t in others]
                m[f"{run}.{s}.others.logp_sum.change"] = float(np.mean(ch))
                m[f"{run}.{s}.others.fall_share"] = float(np.mean([c < 0 for c in ch]))
    for k, v in (extra or {}).items():
        m[k] = float(v)
    return m


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim: ``check(m) -> (passed, numbers)`` on a measurement dict ``m``; ``numbers`` are
    the values shown in the table (name -> float). ``section`` groups the table."""

    id: str
    section: str
    text: str
    check: Callable[[Mapping[str, float]], tuple]


def _get(m, key):
    if key not in m:
        raise KeyError(f"measurement {key!r} is missing (have {len(m)} keys)")
    return m[key]


def _sign(run, s, t, metric, sign):
    def check(m):
        v = _get(m, f"{run}.{s}.{t}.{metric}.change")
        return (v > 0 if sign > 0 else v < 0), {
            f"{t} first": _get(m, f"{run}.{s}.{t}.{metric}.first"),
            f"{t} last": _get(m, f"{run}.{s}.{t}.{metric}.last"),
            "change": v,
        }

    return check


def _nonhum_lowest(m):
    types = sorted(
        {k.split(".")[2] for k in m if k.startswith("sft.train.") and k.endswith(".logp_sum.last")}
    )
    natural = [t for t in types if t not in NATURAL_EXCLUDE and t != "others"]
    low = _get(m, "sft.train.random_nonhum.logp_sum.last")
    vals = {t: m[f"sft.train.{t}.logp_sum.last"] for t in natural}
    if not vals:
        raise KeyError("no natural-language probe type measured in run 'sft'")
    lowest_nat = min(vals, key=vals.get)
    return low < vals[lowest_nat], {
        "random_nonhum last": low,
        "lowest natural-language type last": vals[lowest_nat],
    }


def _dpo_learns(m):
    lf, ll = _get(m, "dpo.loss.first"), _get(m, "dpo.loss.last")
    mf, ml = _get(m, "dpo.margin.first"), _get(m, "dpo.margin.last")
    return (ll < lf and ml > mf), {
        "DPO loss first": lf,
        "DPO loss last": ll,
        "margin first": mf,
        "margin last": ml,
    }


def _rejected_faster(m):
    r = _get(m, "dpo.train.rejected.logp_sum.change")
    c = _get(m, "dpo.train.chosen.logp_sum.change")
    return (r < 0 and r < c), {"Δ rejected": r, "Δ chosen": c}


def _most_fall(m):
    share = _get(m, "dpo.train.others.fall_share")
    return share > 0.5, {
        "share of other types that fall": share,
        "mean Δ of other types": _get(m, "dpo.train.others.logp_sum.change"),
    }


def _compare(key_a, key_b, name_a, name_b, greater: bool):
    """PASS when m[key_a] > m[key_b] (greater) or m[key_a] < m[key_b] (not greater)."""

    def check(m):
        a, b = _get(m, key_a), _get(m, key_b)
        return (a > b if greater else a < b), {name_a: a, name_b: b}

    return check


def _longer_sft_squeeze(m):
    # squeeze = how much the other types decay during DPO (−mean Δ log π); also the argmax path
    # rise.
    sl = -_get(m, "dpo_long.train.others.logp_sum.change")
    sb = -_get(m, "dpo.train.others.logp_sum.change")
    return sl > sb, {
        "decay of others, long SFT": sl,
        "decay of others, baseline SFT": sb,
        "Δ argmax path, long": _get(m, "dpo_long.train.chosen.argmax_path.change"),
        "Δ argmax path, baseline": _get(m, "dpo.train.chosen.argmax_path.change"),
    }


def _degeneration(m):
    e, b = _get(m, "dpo_extend.degeneration"), _get(m, "dpo.degeneration")
    if math.isnan(e) or math.isnan(b):
        return False, {"extend": e, "baseline": b}
    return e <= b, {"repeated 2-gram share, extend": e, "baseline": b}


CLAIMS: tuple = (
    Claim(
        "sft_chosen_rises",
        "SFT",
        "log π(y⁺_u) rises during SFT",
        _sign("sft", "train", "chosen", "logp_sum", +1),
    ),
    Claim(
        "sft_irr_train_rises",
        "SFT",
        "log π(y⁺_{j≠u}) (irr_train) rises during SFT",
        _sign("sft", "train", "irr_train", "logp_sum", +1),
    ),
    Claim(
        "sft_random_permute_falls",
        "SFT",
        "log π(y_rnd') (random_permute) falls during SFT",
        _sign("sft", "train", "random_permute", "logp_sum", -1),
    ),
    Claim(
        "sft_random_nonhum_falls",
        "SFT",
        "log π(y_rnd) (random_nonhum) falls during SFT",
        _sign("sft", "train", "random_nonhum", "logp_sum", -1),
    ),
    Claim(
        "sft_random_nonhum_lowest",
        "SFT",
        "after SFT, log π(y_rnd) is below every natural-language type",
        _nonhum_lowest,
    ),
    Claim(
        "dpo_learns",
        "DPO",
        "off-policy DPO learns: its training loss falls and the chosen-vs-rejected "
        "margin (implicit reward) grows (first vs last fifth of the steps)",
        _dpo_learns,
    ),
    Claim(
        "dpo_rejected_falls_faster",
        "DPO",
        "off-policy DPO: log π(y⁻) falls, and faster than log π(y⁺)",
        _rejected_faster,
    ),
    Claim("dpo_most_types_fall", "DPO", "off-policy DPO: most other probe types fall", _most_fall),
    Claim(
        "dpo_argmax_path_rises",
        "DPO",
        "off-policy DPO: teacher-forced argmax path Σ_m log max π_m along y⁺ rises (paper's 'y*')",
        _sign("dpo", "train", "chosen", "argmax_path", +1),
    ),
    Claim(
        "dpo_peakiness_rises",
        "DPO",
        "off-policy DPO: peakiness ‖A_o‖ on y⁺ rises",
        _sign("dpo", "train", "chosen", "A_norm", +1),
    ),
    Claim(
        "dpo_greedy_rises",
        "DPO",
        "off-policy DPO: log π of the greedy-decoded y* rises (reported beside the argmax path)",
        _sign("dpo", "train", "greedy", "logp_sum", +1),
    ),
    Claim(
        "longer_sft_more_squeeze",
        "Longer SFT",
        "a longer SFT before DPO → the other types decay more during DPO",
        _longer_sft_squeeze,
    ),
    Claim(
        "onpolicy_less_decay",
        "On-policy",
        "DPO with on-policy negatives → other types decay less than off-policy",
        _compare(
            "dpo_onpolicy.train.others.logp_sum.change",
            "dpo.train.others.logp_sum.change",
            "mean Δ others, on-policy",
            "mean Δ others, off-policy",
            True,
        ),
    ),
    Claim(
        "extend_rejected_higher",
        "Extend",
        "after SFT, log π(y⁻) is higher with extend than baseline",
        _compare(
            "sft_extend.train.rejected.logp_sum.last",
            "sft.train.rejected.logp_sum.last",
            "rejected after extend SFT",
            "rejected after baseline SFT",
            True,
        ),
    ),
    Claim(
        "extend_others_decay_slower",
        "Extend",
        "during DPO the other types decay more slowly after extend",
        _compare(
            "dpo_extend.train.others.logp_sum.change",
            "dpo.train.others.logp_sum.change",
            "mean Δ others, extend",
            "mean Δ others, baseline",
            True,
        ),
    ),
    Claim(
        "extend_ystar_rises_slower",
        "Extend",
        "during DPO the argmax path y* rises more slowly after extend",
        _compare(
            "dpo_extend.train.chosen.argmax_path.change",
            "dpo.train.chosen.argmax_path.change",
            "Δ argmax path, extend",
            "Δ argmax path, baseline",
            False,
        ),
    ),
    Claim(
        "extend_heldout_chosen",
        "Extend",
        "after DPO, held-out log π(y⁺) is at least the baseline's",
        _compare(
            "dpo_extend.test.chosen.logp_sum.last",
            "dpo.test.chosen.logp_sum.last",
            "held-out chosen, extend",
            "held-out chosen, baseline",
            True,
        ),
    ),
    Claim(
        "extend_less_degenerate",
        "Extend",
        "after DPO, greedy decodes (held-out prompts) repeat word 2-grams no more than baseline's",
        _degeneration,
    ),
)
"""Every claim of the table, in order."""


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> tuple[dict, dict]:
    """``(mean, std)`` of every key over seeds (keys present in all seeds; std ddof=0)."""
    if not per_seed:
        raise ValueError("no measurements")
    keys = set(per_seed[0]).intersection(*map(set, per_seed[1:]))
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
    std = {k: float(np.std([m[k] for m in per_seed])) for k in keys}
    return mean, std


def evaluate_claims(
    per_seed: Sequence[Mapping[str, float]], claims: Sequence[Claim] = CLAIMS
) -> list[dict]:
    """Each claim on the mean over seeds (its ``status``) and on each seed (``seeds_passed``).
    Rows: ``id, section, claim, status ("PASS"/"FAIL"/"MISSING"), numbers {name: [mean, std]},
    seeds_passed, n_seeds``; MISSING (with ``error``) when a needed measurement is absent."""
    mean, std = aggregate(per_seed)
    rows = []
    for c in claims:
        row = {"id": c.id, "section": c.section, "claim": c.text, "n_seeds": len(per_seed)}
        try:
            ok, nums = c.check(mean)
            per = [bool(c.check(m)[0]) for m in per_seed]
        except KeyError as e:
            row.update(status="MISSING", error=str(e), numbers={}, seeds_passed=0)
            rows.append(row)
            continue
        # std of each displayed number: evaluate the check on each seed and take the spread
        per_nums = [c.check(m)[1] for m in per_seed]
        row["numbers"] = {
            k: [float(v), float(np.std([p.get(k, np.nan) for p in per_nums]))]
            for k, v in nums.items()
        }
        row.update(status="PASS" if ok else "FAIL", seeds_passed=int(sum(per)))
        rows.append(row)
    return rows


def _fmt(v, s, n):
    if math.isnan(v):
        return "nan"
    return f"{v:.3g}" if n == 1 else f"{v:.3g} ± {s:.2g}"


def claims_markdown(rows: Sequence[dict], *, header: str = "") -> str:
    """The claims table as Markdown (one row per claim)."""
    lines = [header] if header else []
    n = rows[0]["n_seeds"] if rows else 1
    lines += [
        "| # | section | claim | measured"
        + (" (mean ± std over seeds)" if n > 1 else "")
        + " | result |"
        + (" seeds passed |" if n > 1 else ""),
        "|---|---|---|---|---|" + ("---|" if n > 1 else ""),
    ]
    for i, r in enumerate(rows, 1):
        nums = "; ".join(f"{k} = {_fmt(v, s, n)}" for k, (v, s) in r["numbers"].items()) or r.get(
            "error", ""
        )
        cell = f"| {i} | {r['section']} | {r['claim']} | {nums} | **{r['status']}** |"
        if n > 1:
            cell += f" {r['seeds_passed']}/{n} |"
        lines.append(cell)
    npass = sum(r["status"] == "PASS" for r in rows)
    lines += ["", f"{npass} of {len(rows)} claims pass."]
    return "\n".join(lines) + "\n"
