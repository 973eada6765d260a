"""``ldjax squeeze``: the squeezing-effect toy of PAPER.md §4 — cases, checks, trends, figures.

Usage::

    python -m ldjax.squeeze.cli --out out/squeeze --draws 10000 --seed 0

Writes ``summary.json`` and ``squeeze_case{1..4}.png``, ``squeeze_trends.png``
under ``--out`` (copied to ``--figures-dir`` too if given) and prints a table.
For a subcommand, call :func:`add_arguments` on a subparser and :func:`run` on
the parsed namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

__all__ = ["add_arguments", "run", "main"]

PLOTTED_CASES = ("case1", "case2", "case3", "case4")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``squeeze`` options to ``parser`` and return it."""
    parser.add_argument("--out", default=os.path.join("out", "squeeze"),
                        help="output directory for summary.json and figures (default: out/squeeze)")
    parser.add_argument("--draws", type=int, default=10000,
                        help="random instances for the guarantee and trend checks (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instances (default: 0)")
    parser.add_argument("--ref-seed", type=int, default=10086,
                        help="numpy seed of the reference toy cases (default: 10086, the paper's)")
    parser.add_argument("--sweeps", type=int, default=300,
                        help="base instances for the one-factor (controlled) sweeps (default: 300)")
    parser.add_argument("--figures-dir", default=None,
                        help="also copy the PNGs here (e.g. benchmarks/results)")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    return parser


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'case':<12}{'V':>5}{'y-':>5}{'y*':>5}{'lr':>5}{'eta_eff':>8}  {'pi(y-)':>21}  {'pi(y*)':>15}"
        f"  {'entropy':>15}  {'others up/down':>14}",
    ]
    for name, c in summary["cases"].items():
        lines.append(
            f"{name:<12}{c['V']:>5}{c['y_neg']:>5}{c['y_star']:>5}{c['lr']:>5g}{c['eta_eff']:>8.2f}"
            f"  {c['pi_neg_before']:>9.3g} -> {c['pi_neg_after']:<8.2g}"
            f"  {c['pi_star_before']:>6.3f} -> {c['pi_star_after']:<5.3f}"
            f"  {c['entropy_before']:>6.3f} -> {c['entropy_after']:<5.3f}"
            f"  {c['n_others_rose']:>6}/{c['n_others_fell']:<6}"
        )
    g = summary["guarantees"]
    lines.append(
        f"guarantees over {g['n']} draws: pi(y-) fell {g['pi_neg_fell']}, pi(y*) rose {g['pi_star_rose']}, "
        f"threshold-ordered {g['threshold_ordered']}, all but y* fell {g['all_others_fell']}; "
        f"ratio formula max rel err {g['ratio_max_rel_err']:.2e}"
    )
    rho = summary["trends"]["spearman"]["squeeze"]
    lines.append(
        "Spearman of squeeze S (random draws): "
        + ", ".join(f"{k} {v:+.3f}" for k, v in rho.items())
    )
    ct = summary["controlled_trends"]
    lines.append(
        "one-factor sweeps, share with expected sign: "
        + ", ".join(f"{k} {ct[k]['frac_expected_sign']:.2f} (mean rho {ct[k]['mean_rho']:+.2f})"
                    for k in ("peakiness", "pi_neg", "eta_eff"))
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run everything for parsed ``args`` (see :func:`add_arguments`); returns the summary dict."""
    from ldjax.squeeze import toy

    if args.draws < 3:
        raise ValueError(f"--draws must be >= 3; got {args.draws}")
    if args.sweeps < 1:
        raise ValueError(f"--sweeps must be >= 1; got {args.sweeps}")
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    cases = toy.run_cases(args.ref_seed)
    inst = toy.random_instances(args.draws, args.seed)
    guarantees = toy.check_guarantees(inst)
    trends = toy.trend_correlations(inst)
    controlled = toy.controlled_trends(n_base=args.sweeps, seed=args.seed, return_curves=not args.no_plots)

    figures = []
    if not args.no_plots:
        from ldjax.squeeze import plots

        for i, name in enumerate(PLOTTED_CASES, 1):
            figures.append(plots.plot_case(cases[name], os.path.join(args.out, f"squeeze_{name}.png"),
                                           name=f"Case {i}"))
        figures.append(plots.plot_trends(toy.squeeze_measures(inst), trends,
                                         os.path.join(args.out, "squeeze_trends.png"), controlled=controlled))
        if args.figures_dir:
            os.makedirs(args.figures_dir, exist_ok=True)
            for f in figures:
                shutil.copy(f, os.path.join(args.figures_dir, os.path.basename(f)))

    ct = {k: ({kk: vv for kk, vv in v.items() if kk not in ("factor_values", "squeeze_values")}
              if isinstance(v, dict) else v) for k, v in controlled.items()}
    summary = dict(
        settings=dict(
            ref_seed=args.ref_seed,
            ref_rng="np.random.RandomState(ref_seed).randn (same stream as np.random.seed + np.random.randn)",
            seed=args.seed,
            draws=args.draws,
            random_rng="np.random.default_rng(seed)",
            random_ranges=dict(V=(3, 100), scale=(0.05, 2.0), lr=(0.01, 1.0), d=8, y_neg="uniform over classes"),
            squeeze_definition="S = log q_B - log q'_B, q_B = pi(B)/(1 - pi(y-)), B = classes other than y- and y*",
        ),
        cases=cases,
        guarantees=guarantees,
        trends=trends,
        controlled_trends=ct,
        figures=[os.path.basename(f) for f in figures],
        runtime_s=round(time.time() - t0, 2),
    )
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(_jsonable(summary), fh, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv``, run, print the table; returns the exit code."""
    parser = add_arguments(argparse.ArgumentParser(prog="ldjax squeeze", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    summary = run(args)
    print(_table(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {len(summary['figures'])} figures "
          f"in {summary['runtime_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
