"""``ldjax squeeze``: the squeezing effect (arXiv 2407.10490, §3.3 and App. C) — the toy's cases,
checks, trends and figures; with ``--lm``, one DPO step's y⁻ term on a language model.

Usage::

    ldjax squeeze --out out/squeeze --draws 10000 --seed 0
    ldjax squeeze --lm [--data FILE] [--lm-params PATH] --out out/squeeze

Writes ``summary.json`` and ``squeeze_case{1..4}.png``, ``squeeze_trends.png`` under ``--out``
(copied to ``--figures-dir`` too if given) and prints a table.

With ``--lm``: the analysis of :mod:`ldjax.experiments.squeeze.lm` on a probe record (``--data``,
default ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl`` if it exists, else the synthetic set;
record ``--index``), with a checkpoint (``--lm-params``: an ``ldjax lm`` run or checkpoint folder,
or one written by :func:`ldjax.lm.checkpoint.save_lm`) or else a tiny LM pretrained here (saved as
``lm_pretrained/``). Writes ``lm_summary.json`` and ``squeeze_lm.png``.

The settings come from a preset (``--quick``), then ``--config FILE`` (a JSON of
:class:`~ldjax.experiments.squeeze.toy.ToyConfig`, or with ``--lm`` of
:class:`~ldjax.experiments.squeeze.lm.SqueezeLMConfig`), then the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from typing import Any

from ldjax.data.preferences import load_jsonl
from ldjax.data.synthetic import generate_preferences
from ldjax.experiments import common
from ldjax.experiments.common import int_at_least, nonneg_int, positive_float, positive_int
from ldjax.experiments.squeeze import lm, plots, toy
from ldjax.lm.checkpoint import load_lm, save_lm
from ldjax.lm.tokenizer import ByteTokenizer
from ldjax.training.config import preset

__all__ = ["add_arguments", "toy_config", "lm_config", "run", "run_lm", "main"]

PLOTTED_CASES = ("case1", "case2", "case3", "case4")


def _multiples(text: str) -> tuple:
    try:
        out = tuple(float(m) for m in str(text).split(",") if m.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if any(not m > 0 for m in out):
        raise argparse.ArgumentTypeError(f"multiples must be > 0, got {text!r}")
    return out


def _eta(text: str):
    if str(text).lower() == "auto":
        return None
    return positive_float(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``squeeze`` options to ``parser`` and return it."""
    common.add_common_arguments(
        parser,
        out=os.path.join("out", "squeeze"),
        config=None,
        quick=None,
        figures_dir=None,
        no_plots=None,
        progress=None,
    )
    parser.add_argument(
        "--draws",
        type=int_at_least(3),
        default=None,
        help="random instances for the guarantee and trend checks (default 10000)",
    )
    parser.add_argument(
        "--seed",
        type=nonneg_int,
        default=None,
        help="seed of the random instances, and of the tiny LM with --lm (default 0)",
    )
    parser.add_argument(
        "--ref-seed",
        type=nonneg_int,
        default=None,
        help="numpy seed of the reference toy cases (default 10086, the paper's)",
    )
    parser.add_argument(
        "--sweeps",
        type=positive_int,
        default=None,
        help="base instances for the one-factor (controlled) sweeps (default 300)",
    )
    g = parser.add_argument_group("language model (--lm)")
    g.add_argument(
        "--lm",
        action="store_true",
        help="one DPO step on a probe prompt of the LM instead of the toy",
    )
    g.add_argument(
        "--data",
        default=None,
        help="JSONL with prompt/chosen/rejected (default: $LDJAX_DATA/"
        "hh_probe/formal_prob_train.jsonl if it exists, else the synthetic set)",
    )
    g.add_argument("--index", type=nonneg_int, default=0, help="which record of --data (default 0)")
    g.add_argument(
        "--lm-params",
        default=None,
        help="model: an `ldjax lm` run or checkpoint folder (ldjax.lm.checkpoint); default: "
        "pretrain a tiny LM here",
    )
    g.add_argument(
        "--lm-heads",
        type=positive_int,
        default=None,
        help="attention heads of --lm-params when no config was saved with them",
    )
    g.add_argument(
        "--lm-pretrain-steps",
        type=positive_int,
        default=None,
        help="steps of the tiny LM's pretraining without --lm-params (default 300)",
    )
    g.add_argument(
        "--lm-eta",
        type=_eta,
        default=None,
        help="SGD step size of the DPO step, or 'auto' (default): the eta at which the y- term "
        "lowers log pi(y-_m) by --lm-eta-target nats per position (linear prediction)",
    )
    g.add_argument(
        "--lm-eta-target",
        type=positive_float,
        default=None,
        help="nats per response position for --lm-eta auto (default 0.05)",
    )
    g.add_argument(
        "--lm-eta-sweep",
        type=_multiples,
        default=None,
        help="multiples of eta also run (default 1,3,10,30; '' for none)",
    )
    g.add_argument("--lm-beta", type=positive_float, default=None, help="DPO beta (default 0.1)")
    g.add_argument(
        "--lm-max-len",
        type=positive_int,
        default=None,
        help="sequence length (default: the run's config, else min(128, model max_len))",
    )
    g.add_argument(
        "--lm-max-prompt-len",
        type=positive_int,
        default=None,
        help="prompt tokens kept (default: the run's config, else min(48, max_len // 2))",
    )
    return parser


def _base(args, presets, cls):
    cfg = preset(presets, "quick" if args.quick else "default")
    return cls.load(args.config, cfg) if args.config else cfg


def toy_config(args: argparse.Namespace) -> toy.ToyConfig:
    """The toy's config from the preset, ``--config`` and the flags (resolved once)."""
    cfg = _base(args, toy.PRESETS, toy.ToyConfig)
    over = {
        k: getattr(args, k)
        for k in ("draws", "seed", "ref_seed", "sweeps")
        if getattr(args, k) is not None
    }
    return cfg.replace(**over)


def lm_config(args: argparse.Namespace) -> lm.SqueezeLMConfig:
    """The LM experiment's config from the preset, ``--config`` and the flags (resolved once)."""
    cfg = _base(args, lm.PRESETS, lm.SqueezeLMConfig)
    flags = dict(
        pretrain_steps=args.lm_pretrain_steps,
        eta_target=args.lm_eta_target,
        eta_sweep=args.lm_eta_sweep,
        beta=args.lm_beta,
        max_len=args.lm_max_len,
        max_prompt_len=args.lm_max_prompt_len,
    )
    over = {k: v for k, v in flags.items() if v is not None}
    if args.lm_eta is not None:
        over["eta"] = args.lm_eta
    return cfg.replace(**over)


def _table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'case':<12}{'V':>5}{'y-':>5}{'y*':>5}{'lr':>5}{'eta_eff':>8}  "
        f"{'pi(y-)':>21}  {'pi(y*)':>15}"
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
        f"guarantees over {g['n']} draws: pi(y-) fell {g['pi_neg_fell']}, "
        f"pi(y*) rose {g['pi_star_rose']}, "
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
        + ", ".join(
            f"{k} {ct[k]['frac_expected_sign']:.2f} (mean rho {ct[k]['mean_rho']:+.2f})"
            for k in ("peakiness", "pi_neg", "eta_eff")
        )
    )
    return "\n".join(lines)


def _lm_records(args) -> tuple[list, str]:
    path = args.data or common.shared_data("hh_probe", "formal_prob_train.jsonl")
    if path is not None:
        return load_jsonl(path), path
    return generate_preferences(
        500, seed=0
    ), "synthetic (ldjax.data.synthetic.generate_preferences(500, seed=0))"


def _sweep_row(r: dict) -> dict:
    o = r["observed"]["rejected"]
    p, a, c = o["summary"]["y_neg"], o["summary"]["y_neg_actual"], o["check"]["y_neg"]
    return dict(
        eta=r["eta"],
        frac_argmax_rises_pred=p["frac_argmax_share_rises"],
        frac_argmax_rises_actual=a["frac_argmax_share_rises"],
        frac_argmax_rises_peak_not_target_pred=p["frac_argmax_share_rises_peak_not_target"],
        frac_argmax_rises_peak_not_target_actual=a["frac_argmax_share_rises_peak_not_target"],
        mean_argmax_share_before=p["mean_argmax_share_before"],
        mean_argmax_share_after_pred=p["mean_argmax_share_after"],
        mean_argmax_share_after_actual=a["mean_argmax_share_after"],
        seq_delta_logp_neg_linear=c["seq_delta_logp_linear"],
        seq_delta_logp_neg_actual=c["seq_delta_logp_actual"],
        entk_rel_error_y_neg=c["entk_step"],
        linear_rel_error_y_neg=c["linear"],
        argmax_verdict_agreement_y_neg=c["argmax_verdict_agreement"],
        linear_rel_error_both=o["check"]["both"]["linear"],
        argmax_verdict_agreement_both=o["check"]["both"]["argmax_verdict_agreement"],
    )


def run_lm(args: argparse.Namespace, cfg: lm.SqueezeLMConfig, out) -> dict[str, Any]:
    """``--lm``: one DPO step's decomposition on a probe prompt; writes into ``out`` and returns
    the summary."""
    t0 = time.time()
    records, source = _lm_records(args)
    if not 0 <= args.index < len(records):
        raise ValueError(
            f"--index {args.index} is out of range for {len(records)} records in {source}"
        )
    tok = ByteTokenizer()
    seq_from_run = None
    if args.lm_params:
        params, config, info = load_lm(args.lm_params, n_heads=args.lm_heads)
        seq_from_run = info.get("pipeline_seq")
        model = dict(source="checkpoint", **info)
    else:
        print(
            f"no --lm-params: pretraining a tiny LM for {cfg.pretrain_steps} steps "
            "on prompt + chosen "
            f"of {len(records)} records ...",
            flush=True,
        )
        config = cfg.lm_config()
        params, info = lm.pretrain_tiny(
            records,
            config=config,
            steps=cfg.pretrain_steps,
            batch_size=cfg.pretrain_batch,
            lr=cfg.pretrain_lr,
            seed=args.seed or 0,
            seq_cfg=cfg.seq,
            progress=common.progress_enabled(args),
        )
        saved = save_lm(os.path.join(out, "lm_pretrained"), params, config, info)
        model = dict(
            source="pretrained here (ldjax.experiments.squeeze.lm.pretrain_tiny)",
            saved=os.path.basename(saved),
            **info,
        )
    if config.vocab_size != tok.vocab_size:
        raise ValueError(
            f"the model's vocabulary has {config.vocab_size} entries; the byte tokenizer needs "
            f"{tok.vocab_size} (BPE models are not supported here)"
        )
    # sequence lengths: flags, else the loaded run's, else the config's (capped by the model)
    run_seq = seq_from_run or {}
    max_len = args.lm_max_len or run_seq.get("max_len") or min(cfg.max_len, config.max_len)
    mpl = (
        args.lm_max_prompt_len
        or run_seq.get("max_prompt_len")
        or min(cfg.max_prompt_len, max_len // 2)
    )
    cfg = cfg.replace(max_len=int(max_len), max_prompt_len=int(mpl))
    apply_fn = lm.cached_apply_fn(config)
    record = records[args.index]
    kw = dict(beta=cfg.beta, seq_cfg=cfg.seq)
    if cfg.eta is None:
        eta = lm.auto_eta(apply_fn, params, tok, record, target=cfg.eta_target, **kw)
        eta_rule = (
            f"auto: y- term lowers log pi(y-_m) by {cfg.eta_target} nats per position (linear)"
        )
    else:
        eta, eta_rule = cfg.eta, "given"
    result = lm.lm_squeeze(apply_fn, params, tok, record, eta=eta, **kw)
    sweep = []
    for m in cfg.eta_sweep:
        r = result if m == 1.0 else lm.lm_squeeze(apply_fn, params, tok, record, eta=eta * m, **kw)
        sweep.append(dict(multiple=m, **_sweep_row(r)))
    figures = []
    if not args.no_plots:
        figures.append(
            common.save_figure(
                plots.plot_lm_squeeze(result, tok), os.path.join(out, "squeeze_lm.png")
            )
        )
    summary = dict(
        settings=dict(
            data=source,
            index=args.index,
            prompt_tail=record["prompt"][-120:],
            chosen=record["chosen"][:200],
            rejected=record["rejected"][:200],
            seq=dataclasses.asdict(cfg.seq),
            beta=cfg.beta,
            eta=eta,
            eta_rule=eta_rule,
            reference="the policy itself (r+ = r- = 0: the first DPO step)",
            optimizer="plain SGD (ldjax.actual_step default)",
            config=cfg.to_dict(),
        ),
        model=model,
        result=lm.summarize(result),
        eta_sweep=sweep,
        table=lm.format_table(result),
        figures=[os.path.basename(f) for f in figures],
        runtime_s=round(time.time() - t0, 2),
    )
    common.write_json(os.path.join(out, "lm_summary.json"), summary)
    return summary


def _lm_table(summary: dict[str, Any]) -> str:
    m = summary["model"]
    src = (
        f"model: checkpoint {m.get('checkpoint', m.get('path'))}"
        if m["source"] == "checkpoint"
        else f"model: tiny LM pretrained here, {m['steps']} steps in {m['seconds']:.0f} s, "
        f"final loss {m['final_loss']:.3f}"
    )
    lines = [
        f"data: {summary['settings']['data']} [record {summary['settings']['index']}]",
        src,
        summary["table"],
        "eta sweep (y- term on x-; pred = exact softmax(z + dz-), "
        "actual = SGD step on the y- branch):",
        f"{'eta':>10}{'argmax up pred/act':>20}{'(peak!=y-) pred/act':>21}"
        f"{'share after pred/act':>22}"
        f"{'rel.err dz-':>12}{'verdict agree':>14}",
    ]
    for r in summary["eta_sweep"]:
        f = lambda v: " - " if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"{r['eta']:>10.3g}{f(r['frac_argmax_rises_pred']):>12}/{f(r['frac_argmax_rises_actual']):<7}"
            f"{f(r['frac_argmax_rises_peak_not_target_pred']):>13}/{f(r['frac_argmax_rises_peak_not_target_actual']):<7}"
            f"{r['mean_argmax_share_after_pred']:>13.3f}/{r['mean_argmax_share_after_actual']:<8.3f}"
            f"{r['entk_rel_error_y_neg']:>12.2e}{f(r['argmax_verdict_agreement_y_neg']):>14}"
        )
    return "\n".join(lines)


def run_toy(args: argparse.Namespace, cfg: toy.ToyConfig, out) -> dict[str, Any]:
    """The toy: cases, guarantees, trends and figures, written into ``out``; returns the summary."""
    t0 = time.time()
    cases = toy.run_cases(cfg.ref_seed)
    inst = toy.random_instances(cfg.draws, cfg.seed)
    guarantees = toy.check_guarantees(inst)
    trends = toy.trend_correlations(inst)
    controlled = toy.controlled_trends(
        n_base=cfg.sweeps, seed=cfg.seed, return_curves=not args.no_plots
    )
    figures = []
    if not args.no_plots:
        for i, name in enumerate(PLOTTED_CASES, 1):
            fig = plots.plot_case(cases[name], name=f"Case {i}")
            figures.append(common.save_figure(fig, os.path.join(out, f"squeeze_{name}.png")))
        fig = plots.plot_trends(toy.squeeze_measures(inst), trends, controlled=controlled)
        figures.append(common.save_figure(fig, os.path.join(out, "squeeze_trends.png")))
    ct = {
        k: (
            {kk: vv for kk, vv in v.items() if kk not in ("factor_values", "squeeze_values")}
            if isinstance(v, dict)
            else v
        )
        for k, v in controlled.items()
    }
    summary = dict(
        settings=dict(
            config=cfg.to_dict(),
            ref_seed=cfg.ref_seed,
            ref_rng="np.random.RandomState(ref_seed).randn "
            "(same stream as np.random.seed + np.random.randn)",
            seed=cfg.seed,
            draws=cfg.draws,
            random_rng="np.random.default_rng(seed)",
            random_ranges=dict(
                V=(3, 100), scale=(0.05, 2.0), lr=(0.01, 1.0), d=8, y_neg="uniform over classes"
            ),
            squeeze_definition="S = log q_B - log q'_B, q_B = pi(B)/(1 - pi(y-)), "
            "B = classes other than y- and y*",
        ),
        cases=cases,
        guarantees=guarantees,
        trends=trends,
        controlled_trends=ct,
        figures=[os.path.basename(f) for f in figures],
        runtime_s=round(time.time() - t0, 2),
    )
    common.write_json(os.path.join(out, "summary.json"), summary)
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Resolves the config, runs the toy (or ``--lm``) into a staging folder and moves the results
    into ``--out`` only when everything succeeded; returns the summary."""
    cfg = lm_config(args) if args.lm else toy_config(args)
    if args.figures_dir:
        common.check_writable(args.figures_dir, "--figures-dir")
    with common.staged_output(args.out) as stage:
        summary = (run_lm if args.lm else run_toy)(args, cfg, str(stage))
    if args.figures_dir:
        os.makedirs(args.figures_dir, exist_ok=True)
        for f in summary["figures"]:
            with common.atomic_path(os.path.join(args.figures_dir, f)) as tmp:
                shutil.copy(os.path.join(args.out, f), tmp)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv``, run, print the table; returns the exit code: 0 done, 2 a
    usage or input error, 1 a file system error, 130 interrupted (Ctrl-C: ``--out`` keeps its
    previous results; the run holds no checkpoints, a rerun starts again)."""
    parser = add_arguments(
        argparse.ArgumentParser(prog="ldjax squeeze", description=__doc__.splitlines()[0])
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax squeeze: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ldjax squeeze: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"ldjax squeeze: interrupted; {args.out} keeps its previous results, rerun to start "
            "again",
            file=sys.stderr,
        )
        return 130
    name = "lm_summary.json" if args.lm else "summary.json"
    print(_lm_table(summary) if args.lm else _table(summary))
    print(
        f"wrote {os.path.join(args.out, name)} and {len(summary['figures'])} figure(s) "
        f"in {summary['runtime_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
