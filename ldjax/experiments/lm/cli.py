"""``ldjax lm pretrain|sft|dpo|pipeline|one-step``: the LM finetuning experiments end to end.

Data (``--data FILE``): a JSON-lines file, either the paper's probe layout (``prompt`` + the 13
response fields, e.g. ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl``) or plain
``prompt``/``chosen``/``rejected`` records (missing model-free probe types are added by
:func:`ldjax.data.probes.build_probes`). Without ``--data`` the embedded synthetic dataset
(:func:`ldjax.data.synthetic.generate_preferences`) is used, so everything runs on a fresh clone.

Commands (each writes under ``--out``; ``--resume`` continues interrupted phases from their orbax
checkpoints and reuses finished ones):

* ``pretrain``  next-token pretraining (cached: ``--cache-dir``, ``--no-cache``);
* ``sft``       pretrain → SFT with probe tracking and figures;
* ``dpo``       pretrain → SFT → preference phase (``--loss``, ``--on-policy``) with tracking;
* ``pipeline``  the same as ``dpo`` plus the one-step check, all figures and ``summary.json``;
* ``one-step``  one exact decomposition of an SFT step on the pretrained model.

The config is the preset (``--quick``: :data:`ldjax.lm.config.QUICK`, else ``DEFAULT``), then
``--config FILE`` (a partial JSON of :class:`~ldjax.lm.config.PipelineConfig`), then the flags.
The pipeline itself lives in :mod:`ldjax.experiments.lm.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ldjax.experiments import common
from ldjax.experiments.common import nonneg_int
from ldjax.experiments.lm.pipeline import (
    load_records,
    one_step,
    prepare_data,
    pretrained_params,
    run_pipeline,
)
from ldjax.lm.config import PREFERENCE_LOSSES, PRESETS, PipelineConfig, load_config
from ldjax.training.checkpoint import CheckpointError
from ldjax.training.config import preset

__all__ = ["main", "build_config"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldjax lm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=["pretrain", "sft", "dpo", "pipeline", "one-step"])
    common.add_common_arguments(
        p,
        out="runs/lm",
        data="JSONL file (probe layout or prompt/chosen/rejected); default: synthetic",
        config=None,
        quick=None,
        seed=None,
        progress=None,
        resume=None,
        cache=None,
    )
    p.add_argument(
        "--loss", choices=PREFERENCE_LOSSES, help="preference loss (default: the config's)"
    )
    p.add_argument(
        "--on-policy", action="store_true", help="sample y- from the current policy (SPIN-style)"
    )
    p.add_argument(
        "--extend", action="store_true", help="SFT on chosen and rejected (the paper's remedy)"
    )
    p.add_argument(
        "--squeeze-monitor",
        type=nonneg_int,
        default=None,
        metavar="K",
        help="sft/dpo/pipeline: run the live squeezing monitor every K steps of SFT and the "
        "preference phase (logged to the phase history, panels in the squeeze figures; "
        "config track.monitor_every; 0 = off)",
    )
    p.add_argument(
        "--index", type=nonneg_int, default=0, help="one-step: which tracked training record"
    )
    p.add_argument(
        "--token-maps",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="one-step: also write the token maps (ldjax.token_influence) of the K probes the "
        "step moves most, for the SFT step and the DPO step (heatmaps, pushes, arrays)",
    )
    p.add_argument(
        "--optimizer-step",
        action="store_true",
        help="one-step: also predict one REAL optimizer step (RMSprop, clipping, schedule) of SFT "
        "and of DPO at the phases' learning rates, against the step itself",
    )
    return p


def build_config(args) -> PipelineConfig:
    """The config of parsed CLI arguments: the preset, then ``--config``, then flags."""
    base = preset(PRESETS, "quick" if args.quick else "default")
    cfg = load_config(args.config, base) if args.config else base
    if args.seed is not None:
        cfg = cfg.replace(
            seed=args.seed,
            pretrain={"seed": args.seed},
            sft={"seed": args.seed},
            preference={"seed": args.seed},
        )
    if args.loss:
        cfg = cfg.replace(preference={"loss": args.loss})
    if args.on_policy:
        cfg = cfg.replace(preference={"on_policy": True})
    if args.extend:
        cfg = cfg.replace(sft={"extend": True})
    if getattr(args, "squeeze_monitor", None) is not None:
        cfg = cfg.replace(track={"monitor_every": args.squeeze_monitor})
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ldjax lm ...``; returns the exit status: 0 done, 2 a usage or input error
    (named), 1 a failure during the run (a damaged checkpoint, a file system error), 130
    interrupted (Ctrl-C; the checkpoints written so far stay, ``--resume`` continues)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0)
        return int(e.code or 0)
    out = Path(args.out)
    cache = (
        None if args.no_cache else Path(args.cache_dir) if args.cache_dir else common.cache_dir()
    )
    try:
        return _run(args, out, cache)
    except KeyboardInterrupt:
        print(
            f"ldjax lm: interrupted; the checkpoints in {out} are kept, rerun the same command "
            "with --resume to continue",
            file=sys.stderr,
        )
        return 130


def _run(args, out: Path, cache: Path | None) -> int:
    try:
        if args.resume_older_checkpoint and not args.resume:
            raise ValueError("--resume-older-checkpoint needs --resume")
        common.check_writable(out)
        if cache is not None:
            common.check_writable(cache, "--cache-dir")
        cfg = build_config(args)
        records, source = load_records(args.data, cfg)
        data = prepare_data(records, cfg, source)
        if args.command == "one-step" and not 0 <= args.index < len(data.track_train):
            raise ValueError(f"--index must be in [0, {len(data.track_train)})")
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax lm: error: {e}", file=sys.stderr)
        return 2
    progress = common.progress_enabled(args)
    resume = dict(resume=args.resume, resume_older=args.resume_older_checkpoint)
    t0 = time.time()
    try:
        if args.command == "one-step":
            params, _ = pretrained_params(
                cfg, data, out, cache_dir=cache, progress=progress, **resume
            )
            r = one_step(
                cfg,
                data,
                params,
                out,
                args.index,
                token_maps=args.token_maps,
                optimizer_step=args.optimizer_step,
            )
            print(r["table"])
            if "optimizer_table" in r:
                print(r["optimizer_table"])
            print(f"figure: {r['figure']}")
            for f in r.get("token_map_figures", []):
                print(f"token map: {f}")
            return 0
        upto = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "pipeline": "dpo"}[args.command]
        s = run_pipeline(
            cfg,
            data,
            out,
            upto=upto,
            cache_dir=cache,
            progress=progress,
            one_step=args.command == "pipeline",
            **resume,
        )
    except CheckpointError as e:
        print(f"ldjax lm: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"ldjax lm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ldjax lm: error: {e}", file=sys.stderr)
        return 1
    print(
        f"ldjax lm {args.command}: {time.time() - t0:.1f} s; "
        f"timings {json.dumps(s['timings'], default=float)}"
    )
    for f in s["figures"]:
        print(f"figure: {f}")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
