"""``ldjax reproduce followups``: gradient entanglement, likelihood displacement (CHES) and lazy
likelihood displacement in GRPO, in ldjax's decomposition, with a claims table.

1. an SFT'd small LM (cached: :func:`ldjax.experiments.followups.model.sft_model`);
2. one DPO step on each preference pair alone, measured
   (:mod:`ldjax.experiments.followups.pairs`): the entanglement and displacement analyses;
3. GRPO and its NTHR-style variant on arithmetic prompts with the string-checked reward, for
   ``grpo.seeds`` sampling seeds (:mod:`ldjax.experiments.followups.grpo`);
4. ``<out>/claims.md``, ``<out>/claims.json`` (rows decided by :mod:`ldjax.experiments.stats`)
   and ``<out>/figures/followups_*.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from ldjax.data.synthetic import generate_preferences
from ldjax.experiments import common
from ldjax.experiments.common import positive_int, save_figure, write_text
from ldjax.experiments.followups import claims as FC
from ldjax.experiments.followups import displacement, entanglement, grpo, pairs, plots
from ldjax.experiments.followups.config import PRESETS, load_config
from ldjax.experiments.followups.model import sft_model
from ldjax.experiments.reproduce.claims import claims_markdown, evaluate_claims
from ldjax.training.config import preset

__all__ = ["main", "run_followups"]


def run_followups(
    cfg, out, *, cache_dir: Path | None = None, progress: bool = False, command: str = "", log=print
) -> dict:
    """Everything of the module docstring; returns the JSON document (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.time()
    timings = {}
    t = time.time()
    params, lm, info = sft_model(cfg, cache_dir=cache_dir, progress=progress)
    timings["sft"] = time.time() - t
    log(
        f"SFT model: {info['n_params']} parameters, {timings['sft']:.1f} s "
        f"({'cache' if info.get('from_cache') else 'trained'})"
    )

    t = time.time()
    pos, neg = pairs.encode_pairs(generate_preferences(cfg.pairs.n_pairs, 0), cfg)
    pm = pairs.measure_pairs(
        params, lm, pos, neg, beta=cfg.pairs.beta, eta=cfg.pairs.eta, step_nats=cfg.pairs.step_nats
    )
    timings["pairs"] = time.time() - t
    ent, dis = entanglement.analyse(pm), displacement.analyse(pm)
    log(
        f"pairs: {cfg.pairs.n_pairs} DPO steps measured in {timings['pairs']:.1f} s (η = "
        f"{pm['eta']:.3g})"
    )

    t = time.time()
    runs = []
    for s in range(cfg.grpo.seeds):
        runs.append(grpo.run_grpo(params, lm, cfg, s, progress=progress, log=log))
    timings["grpo"] = time.time() - t
    log(f"GRPO: {cfg.grpo.seeds} seeds × 2 variants in {timings['grpo']:.1f} s")

    pair_rows = evaluate_claims([FC.pair_measurements(pm)], FC.PAIR_CLAIMS)
    grpo_rows = evaluate_claims([FC.grpo_measurements(r) for r in runs], FC.GRPO_CLAIMS)
    figs = {
        "followups_entanglement.png": plots.plot_entanglement(pm, ent),
        "followups_displacement.png": plots.plot_displacement(pm, dis),
        "followups_grpo.png": plots.plot_grpo(runs),
    }
    total = time.time() - t0
    load1 = os.getloadavg()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({jax.default_backend()}), load "
        f"average (1 min) {load0[0]:.1f} at start / {load1[0]:.1f} at end"
    )
    with common.staged_output(out) as stage:
        fig_paths = []
        for name, fig in figs.items():
            save_figure(fig, stage / "figures" / name, footer=f"{command} — {machine}")
            fig_paths.append(str(out / "figures" / name))
        doc = {
            "command": command,
            "machine": machine,
            "seconds": total,
            "timings": timings,
            "sft": info,
            "claims": pair_rows + grpo_rows,
            "pairs": common.jsonable({k: v for k, v in pm.items()}),
            "entanglement": common.jsonable({k: v for k, v in ent.items() if k != "falls"}),
            "displacement": common.jsonable(dis),
            "grpo": common.jsonable([{k: v for k, v in r.items()} for r in runs]),
            "figures": fig_paths,
            "config": cfg.to_dict(),
        }
        write_text(stage / "claims.json", json.dumps(common.jsonable(doc), indent=1) + "\n")
        header = (
            "# Claims table — `ldjax reproduce followups`\n\n"
            f"Command: `{command}`  \nMachine: {machine}; wall time {total:.0f} s  \n"
            f"SFT model: {info['n_params']} parameters, {info.get('steps', '?')} steps; "
            f"pairs: {cfg.pairs.n_pairs} synthetic "
            f"preference pairs, one DPO step each (β {cfg.pairs.beta}, η {pm['eta']:.3g}); "
            f"GRPO: {cfg.grpo.seeds} seeds × {cfg.grpo.n_track} tracked prompts, "
            f"{cfg.grpo.steps} steps of {cfg.grpo.prompts_per_step} prompts × "
            f"{cfg.grpo.group_size} samples.\n\n## Entanglement and displacement (one SFT "
            "model; the 'prompts' are the pairs)\n"
        )
        md = claims_markdown(pair_rows, header=header)
        md += "\n## GRPO and NTHR (seeds × tracked prompts)\n\n" + claims_markdown(grpo_rows)
        write_text(stage / "claims.md", md)
    return doc


def _parser():
    p = argparse.ArgumentParser(
        prog="ldjax reproduce followups", description=__doc__.split("\n\n")[0]
    )
    common.add_common_arguments(
        p,
        out="runs/followups",
        quick="tiny model and few steps (CI, ≤ 3 min on 2 quiet cores)",
        config=None,
        progress=None,
        cache=None,
        figures_dir=None,
    )
    p.add_argument("--seeds", type=positive_int, default=None, help="GRPO seeds (default: config)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ldjax reproduce followups ...``; exit status 0 done, 2 a usage or input error, 1 a
    failure during the run, 130 interrupted (``--out`` keeps its previous results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    cache = (
        None if args.no_cache else Path(args.cache_dir) if args.cache_dir else common.cache_dir()
    )
    try:
        common.check_writable(args.out)
        base = preset(PRESETS, "quick" if args.quick else "default")
        cfg = load_config(args.config, base) if args.config else base
        if args.seeds is not None:
            cfg = cfg.replace(grpo=cfg.grpo.replace(seeds=args.seeds))
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax reproduce followups: error: {e}", file=sys.stderr)
        return 2
    command = "ldjax reproduce followups " + " ".join(shlex.quote(a) for a in argv)
    print(command)
    try:
        doc = run_followups(
            cfg, args.out, cache_dir=cache, progress=common.progress_enabled(args), command=command
        )
    except KeyboardInterrupt:
        print(
            f"ldjax reproduce followups: interrupted; {args.out} keeps its previous results",
            file=sys.stderr,
        )
        return 130
    except (ValueError, OSError) as e:
        print(f"ldjax reproduce followups: error: {e}", file=sys.stderr)
        return 1
    print((Path(args.out) / "claims.md").read_text(encoding="utf-8"))
    print(f"done in {doc['seconds']:.1f} s; {doc['machine']}")
    for f in doc["figures"]:
        print(f"figure: {f}")
        if args.figures_dir:
            Path(args.figures_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, Path(args.figures_dir) / Path(f).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
