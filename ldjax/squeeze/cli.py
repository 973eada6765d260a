"""``ldjax squeeze``: the squeezing-effect toy of PAPER.md §4 — cases, checks, trends, figures.

Usage::

    python -m ldjax.squeeze.cli --out out/squeeze --draws 10000 --seed 0
    python -m ldjax.squeeze.cli --lm [--data FILE] [--lm-params PATH] --out out/squeeze

Writes ``summary.json`` and ``squeeze_case{1..4}.png``, ``squeeze_trends.png``
under ``--out`` (copied to ``--figures-dir`` too if given) and prints a table.

With ``--lm``: the same analysis on the language model (:mod:`ldjax.squeeze.lm`): one DPO step's
decomposition on a probe record (``--data``, default ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl``
if it exists, else the synthetic set; record ``--index``), with a checkpoint (``--lm-params``: an
``ldjax lm`` run/checkpoint folder or an ``.npz``) or else a tiny LM pretrained here for
``--lm-pretrain-steps`` steps on prompt + chosen texts (saved as ``lm_pretrained.npz``). Writes
``lm_summary.json`` and ``squeeze_lm.png``.
For a subcommand, call :func:`add_arguments` on a subparser and :func:`run` on
the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

__all__ = ["add_arguments", "run", "run_lm", "main"]

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
    g = parser.add_argument_group("language model (--lm)")
    g.add_argument("--lm", action="store_true",
                   help="one DPO step on a probe prompt of the LM instead of the toy")
    g.add_argument("--data", default=None,
                   help="JSONL with prompt/chosen/rejected (default: $LDJAX_DATA/hh_probe/"
                        "formal_prob_train.jsonl if it exists, else the synthetic set)")
    g.add_argument("--index", type=int, default=0, help="which record of --data (default 0)")
    g.add_argument("--lm-params", default=None,
                   help="model: an `ldjax lm` run or orbax checkpoint folder, or an .npz (ldjax.squeeze.lm.save_lm); "
                        "default: pretrain a tiny LM here")
    g.add_argument("--lm-heads", type=int, default=None,
                   help="attention heads of --lm-params when no config.json / lm_config says so")
    g.add_argument("--lm-pretrain-steps", type=int, default=300,
                   help="steps of the tiny LM's pretraining without --lm-params (default 300, ~1-1.5 min on 2 cores)")
    g.add_argument("--lm-eta", default="auto",
                   help="SGD step size of the DPO step, or 'auto' (default): the eta at which the y- term "
                        "lowers log pi(y-_m) by --lm-eta-target nats per position (linear prediction)")
    g.add_argument("--lm-eta-target", type=float, default=0.05,
                   help="nats per response position for --lm-eta auto (default 0.05)")
    g.add_argument("--lm-eta-sweep", default="1,3,10,30",
                   help="multiples of eta also run, to show how the squeeze and the prediction error grow "
                        "(default 1,3,10,30; '' for none)")
    g.add_argument("--lm-beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    g.add_argument("--lm-max-len", type=int, default=None,
                   help="sequence length (default: the run's config, else min(128, model max_len))")
    g.add_argument("--lm-max-prompt-len", type=int, default=None,
                   help="prompt tokens kept (default: the run's config, else min(48, max_len // 2))")
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


def _default_data() -> str | None:
    root = os.environ.get("LDJAX_DATA")
    if root:
        p = os.path.join(root, "hh_probe", "formal_prob_train.jsonl")
        if os.path.exists(p):
            return p
    return None


def _lm_records(args) -> tuple[list, str]:
    from ldjax.data.preferences import load_jsonl

    path = args.data or _default_data()
    if path is not None:
        return load_jsonl(path), path
    from ldjax.data.synthetic import generate_preferences

    return generate_preferences(500, seed=0), "synthetic (ldjax.data.synthetic.generate_preferences(500, seed=0))"


def _sweep_row(r: dict) -> dict:
    o = r["observed"]["rejected"]
    p, a, c = o["summary"]["y_neg"], o["summary"]["y_neg_actual"], o["check"]["y_neg"]
    return dict(
        eta=r["eta"],
        frac_argmax_rises_pred=p["frac_argmax_share_rises"], frac_argmax_rises_actual=a["frac_argmax_share_rises"],
        frac_argmax_rises_peak_not_target_pred=p["frac_argmax_share_rises_peak_not_target"],
        frac_argmax_rises_peak_not_target_actual=a["frac_argmax_share_rises_peak_not_target"],
        mean_argmax_share_before=p["mean_argmax_share_before"],
        mean_argmax_share_after_pred=p["mean_argmax_share_after"],
        mean_argmax_share_after_actual=a["mean_argmax_share_after"],
        seq_delta_logp_neg_linear=c["seq_delta_logp_linear"], seq_delta_logp_neg_actual=c["seq_delta_logp_actual"],
        entk_rel_error_y_neg=c["entk_step"], linear_rel_error_y_neg=c["linear"],
        argmax_verdict_agreement_y_neg=c["argmax_verdict_agreement"],
        linear_rel_error_both=o["check"]["both"]["linear"],
        argmax_verdict_agreement_both=o["check"]["both"]["argmax_verdict_agreement"],
    )


def run_lm(args: argparse.Namespace) -> dict[str, Any]:
    """``--lm``: one DPO step's decomposition on a probe prompt; returns (and writes) the summary."""
    from ldjax.data.preferences import SeqConfig
    from ldjax.lm.tokenizer import ByteTokenizer
    from ldjax.squeeze import lm

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    records, source = _lm_records(args)
    if not 0 <= args.index < len(records):
        raise ValueError(f"--index {args.index} is out of range for {len(records)} records in {source}")
    tok = ByteTokenizer()
    pipeline_seq = None
    if args.lm_params:
        params, config, info = lm.load_lm(args.lm_params, n_heads=args.lm_heads)
        pipeline_seq = info.get("pipeline_seq")
        model = dict(source="checkpoint", **info)
    else:
        if args.lm_pretrain_steps < 1:
            raise ValueError(f"--lm-pretrain-steps must be >= 1; got {args.lm_pretrain_steps}")
        print(f"no --lm-params: pretraining a tiny LM for {args.lm_pretrain_steps} steps on prompt + chosen "
              f"of {len(records)} records ...", flush=True)
        config = lm.TINY_LM
        params, info = lm.pretrain_tiny(records, steps=args.lm_pretrain_steps, seed=args.seed, progress=True)
        saved = lm.save_lm(os.path.join(args.out, "lm_pretrained.npz"), params, config, info)
        model = dict(source="pretrained here (ldjax.squeeze.lm.pretrain_tiny)", saved=saved, **info)
    if config.vocab_size != tok.vocab_size:
        raise ValueError(f"the model's vocabulary has {config.vocab_size} entries; the byte tokenizer needs "
                         f"{tok.vocab_size} (BPE models are not supported here)")
    max_len = args.lm_max_len or (pipeline_seq or {}).get("max_len") or min(lm.SQUEEZE_SEQ.max_len, config.max_len)
    mpl = args.lm_max_prompt_len or (pipeline_seq or {}).get("max_prompt_len") or min(lm.SQUEEZE_SEQ.max_prompt_len,
                                                                                         max_len // 2)
    seq = SeqConfig(max_len=int(max_len), max_prompt_len=int(mpl))
    apply_fn = lm.cached_apply_fn(config)
    record = records[args.index]
    kw = dict(beta=args.lm_beta, seq_cfg=seq)
    if str(args.lm_eta).lower() == "auto":
        eta = lm.auto_eta(apply_fn, params, tok, record, target=args.lm_eta_target, **kw)
        eta_rule = f"auto: y- term lowers log pi(y-_m) by {args.lm_eta_target} nats per position (linear)"
    else:
        try:
            eta = float(args.lm_eta)
        except ValueError:
            raise ValueError(f"--lm-eta must be 'auto' or a positive number; got {args.lm_eta!r}") from None
        if not eta > 0:
            raise ValueError(f"--lm-eta must be > 0; got {eta}")
        eta_rule = "given"
    result = lm.lm_squeeze(apply_fn, params, tok, record, eta=eta, **kw)
    mults = [float(m) for m in str(args.lm_eta_sweep).split(",") if m.strip()]
    sweep = []
    for m in mults:
        r = result if m == 1.0 else lm.lm_squeeze(apply_fn, params, tok, record, eta=eta * m, **kw)
        sweep.append(dict(multiple=m, **_sweep_row(r)))
    figures = []
    if not args.no_plots:
        figures.append(lm.plot_lm_squeeze(result, os.path.join(args.out, "squeeze_lm.png"), tok))
        if args.figures_dir:
            os.makedirs(args.figures_dir, exist_ok=True)
            for f in figures:
                shutil.copy(f, os.path.join(args.figures_dir, os.path.basename(f)))
    summary = dict(
        settings=dict(data=source, index=args.index, prompt_tail=record["prompt"][-120:],
                      chosen=record["chosen"][:200], rejected=record["rejected"][:200],
                      seq=dataclasses.asdict(seq), beta=args.lm_beta, eta=eta, eta_rule=eta_rule,
                      reference="the policy itself (r+ = r- = 0: the first DPO step)",
                      optimizer="plain SGD (ldjax.actual_step default)"),
        model=model,
        result=lm.summarize(result),
        eta_sweep=sweep,
        table=lm.format_table(result),
        figures=[os.path.basename(f) for f in figures],
        runtime_s=round(time.time() - t0, 2),
    )
    with open(os.path.join(args.out, "lm_summary.json"), "w") as fh:
        json.dump(_jsonable(summary), fh, indent=1)
    return summary


def _lm_table(summary: dict[str, Any]) -> str:
    m = summary["model"]
    src = (f"model: checkpoint {m.get('checkpoint', m.get('path'))}" if m["source"] == "checkpoint" else
           f"model: tiny LM pretrained here, {m['steps']} steps in {m['seconds']:.0f} s, final loss {m['final_loss']:.3f}")
    lines = [f"data: {summary['settings']['data']} [record {summary['settings']['index']}]", src,
             summary["table"], "eta sweep (y- term on x-; pred = exact softmax(z + dz-), actual = SGD step on the y- branch):",
             f"{'eta':>10}{'argmax up pred/act':>20}{'(peak!=y-) pred/act':>21}{'share after pred/act':>22}"
             f"{'rel.err dz-':>12}{'verdict agree':>14}"]
    for r in summary["eta_sweep"]:
        f = lambda v: " - " if v is None else f"{v:.2f}"
        lines.append(f"{r['eta']:>10.3g}{f(r['frac_argmax_rises_pred']):>12}/{f(r['frac_argmax_rises_actual']):<7}"
                     f"{f(r['frac_argmax_rises_peak_not_target_pred']):>13}/{f(r['frac_argmax_rises_peak_not_target_actual']):<7}"
                     f"{r['mean_argmax_share_after_pred']:>13.3f}/{r['mean_argmax_share_after_actual']:<8.3f}"
                     f"{r['entk_rel_error_y_neg']:>12.2e}{f(r['argmax_verdict_agreement_y_neg']):>14}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run everything for parsed ``args`` (see :func:`add_arguments`); returns the summary dict."""
    from ldjax.squeeze import toy

    if getattr(args, "lm", False):
        return run_lm(args)

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
    if args.lm:
        print(_lm_table(summary))
        print(f"wrote {os.path.join(args.out, 'lm_summary.json')} and {len(summary['figures'])} figure(s) "
              f"in {summary['runtime_s']:.1f} s")
        return 0
    print(_table(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {len(summary['figures'])} figures "
          f"in {summary['runtime_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
