"""``ldjax reproduce lm``: the paper's LLM claims (arXiv 2407.10490, §4) in one command, with a
claims table.

On the probe set (``--data``; default ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl`` if present,
else the embedded synthetic set; any prompt/chosen/rejected JSONL works, the model-free probe
types being built by :func:`ldjax.data.probes.build_probes`), for each seed:

1. pretrain (cached and reused: :func:`ldjax.experiments.lm.cli.pretrained_params`);
2. a *long* SFT of ``--long-sft`` × the configured SFT steps, stopped at the configured length
   (an orbax checkpoint, then resumed: the first part is exactly the baseline SFT when the SFT
   schedule is ``constant``, the default) — so one run gives the baseline SFT and the longer SFT;
3. extend SFT (y⁺ and y⁻, the paper's remedy) from the same pretrained model;
4. the same off-policy DPO after baseline SFT, after extend SFT and after the long SFT, and DPO
   with on-policy negatives after baseline SFT;
5. probes tracked on training and held-out prompts in every phase
   (:class:`ldjax.experiments.lm.tracking.ProbeTracker`); after each DPO, greedy decodes of the
   held-out prompts for the degeneration measure.

Then :mod:`ldjax.experiments.reproduce.claims` turns the curves into measurements and PASS/FAIL
rows: ``<out>/claims.md``, ``<out>/claims.json`` and figures ``<out>/figures/reproduce_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ldjax.experiments import common
from ldjax.experiments.common import positive_float, positive_int, save_figure, write_text
from ldjax.experiments.lm import plots
from ldjax.experiments.lm.pipeline import load_records, prepare_data, pretrained_params
from ldjax.experiments.lm.tracking import ProbeTracker
from ldjax.experiments.reproduce import claims as C
from ldjax.lm import train as T
from ldjax.lm.config import PRESETS, load_config
from ldjax.lm.decode import generate
from ldjax.training.config import preset

__all__ = [
    "main",
    "default_data_path",
    "run_seed",
    "reproduce_lm",
    "redecide",
    "load_for_redecide",
    "TruncatedTrack",
]

RUNS = ("sft", "sft_extend", "sft_long", "dpo", "dpo_extend", "dpo_onpolicy", "dpo_long")


def default_data_path() -> str | None:
    """``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl`` if it exists, else None (synthetic)."""
    return common.shared_data("hh_probe", "formal_prob_train.jsonl")


class TruncatedTrack:
    """The first evaluations (steps <= ``last_step``) of a tracker, with the plotting interface
    (``steps``, ``sets``, ``all_types``, ``label``, ``curve``, ``arrays``)."""

    def __init__(self, track, last_step: int):
        self.track = track
        self.n = int(np.searchsorted(np.asarray(track.steps), last_step, side="right"))
        if self.n < 1:
            raise ValueError(f"no evaluation at or before step {last_step}")
        self.steps = list(track.steps[: self.n])
        self.sets = track.sets
        self.all_types = track.all_types
        self.label = track.label

    def curve(self, s, t, metric="logp_sum"):
        return self.track.curve(s, t, metric)[: self.n]

    def arrays(self, s, metric):
        return self.track.arrays(s, metric)[: self.n]


def _curves(track) -> dict:
    """``{set: {type: {metric: (E,) list}}}`` for the claim metrics."""
    return {
        s: {t: {m: track.curve(s, t, m).tolist() for m in C.METRICS} for t in track.all_types}
        for s in track.sets
    }


def _prompt_curves(track) -> dict:
    """``{set: {type: {metric: (E, N) array}}}``: per-prompt curves for the claims' decisions."""
    return {
        s: {
            t: {m: track.arrays(s, m)[:, k] for m in C.METRICS}
            for k, t in enumerate(track.all_types)
        }
        for s in track.sets
    }


def _seeded(cfg, seed: int):
    return cfg.replace(
        seed=seed, pretrain={"seed": seed}, sft={"seed": seed}, preference={"seed": seed}
    )


def run_seed(
    cfg,
    data,
    out: Path,
    *,
    cache_dir: Path | None,
    long_factor: float = 2.0,
    progress: bool = False,
    log=print,
    runs: Sequence[str] = RUNS,
) -> dict:
    """All experiments of one seed (module docstring); ``runs`` a subset of :data:`RUNS` (the
    claims needing another run are then MISSING). Returns ``{"measurements", "curves",
    "timings", "trackers", "histories", "steps", "greedy_examples"}``."""
    bad = sorted(set(runs) - set(RUNS))
    if bad or "sft" not in runs:
        raise ValueError(f"runs must be a subset of {RUNS} that includes 'sft', got {list(runs)}")
    out = Path(out)
    tok = data.tokenizer
    lm = cfg.lm_config()
    timings: dict = {}
    t0 = time.time()
    # resume=True: a rerun after Ctrl-C continues an interrupted pretraining (exactly: batches
    # depend only on the step) instead of refusing its checkpoint folder
    params, info = pretrained_params(
        cfg, data, out, resume=True, cache_dir=cache_dir, progress=progress
    )
    timings["pretrain"] = time.time() - t0
    log(
        f"  pretrain: {timings['pretrain']:.1f} s "
        f"({'cache' if info.get('from_cache') else 'trained'})"
    )
    mp = cfg.data.max_prompt_len

    def tracker():
        return ProbeTracker(
            lm,
            {"train": data.track_train, "test": data.track_test},
            max_prompt_len=mp,
            eval_batch=cfg.track.eval_batch,
            decode_max_new_tokens=cfg.track.decode_max_new_tokens,
            tokenizer=tok,
        )

    def ckpt(name):
        d = out / name / "ckpt"
        shutil.rmtree(d, ignore_errors=True)
        return d

    trackers, histories, finals = {}, {}, {}

    # -- SFT: baseline = the first part of the long SFT ---------------------------------------
    base_steps = cfg.sft.total_steps(len(data.train))
    long_steps = max(base_steps + 1, int(round(long_factor * base_steps)))
    long_cfg = dataclasses.replace(cfg.sft, steps=long_steps, extend=False)
    tr = tracker()
    t = time.time()
    d = ckpt("sft_long")
    r1 = T.sft(
        params,
        lm,
        data.train,
        long_cfg,
        max_prompt_len=mp,
        tokenizer=tok,
        ckpt_dir=d,
        on_eval=tr.evaluate,
        stop_at=base_steps,
        progress=progress,
    )
    if tr.steps[-1] != base_steps:
        tr.evaluate(base_steps, r1.params)
    finals["sft"] = r1.params
    timings["sft"] = time.time() - t
    if "sft_long" in runs or "dpo_long" in runs:
        r2 = T.sft(
            params,
            lm,
            data.train,
            long_cfg,
            max_prompt_len=mp,
            tokenizer=tok,
            ckpt_dir=d,
            resume=True,
            on_eval=tr.evaluate,
            progress=progress,
        )
        tr.finalize(r2.history)
        finals["sft_long"] = r2.params
        timings["sft_long"] = time.time() - t
        trackers["sft_long"], histories["sft_long"] = tr, r2.history
        trackers["sft"] = TruncatedTrack(tr, base_steps)
        log(f"  sft {base_steps} + long to {long_steps} steps: {timings['sft_long']:.1f} s")
    else:
        tr.finalize(r1.history)
        trackers["sft"], histories["sft"] = tr, r1.history
        log(f"  sft {base_steps} steps: {timings['sft']:.1f} s")

    if "sft_extend" in runs or "dpo_extend" in runs:
        t = time.time()
        tr = tracker()
        ext_cfg = dataclasses.replace(cfg.sft, extend=True)
        r = T.sft(
            params,
            lm,
            data.train,
            ext_cfg,
            max_prompt_len=mp,
            tokenizer=tok,
            ckpt_dir=ckpt("sft_extend"),
            on_eval=tr.evaluate,
            progress=progress,
        )
        tr.finalize(r.history)
        trackers["sft_extend"], histories["sft_extend"] = tr, r.history
        finals["sft_extend"] = r.params
        timings["sft_extend"] = time.time() - t
        log(f"  sft extend {r.step} steps: {timings['sft_extend']:.1f} s")

    # -- DPO ------------------------------------------------------------------------------------
    pc = dataclasses.replace(cfg.preference, on_policy=False)
    dpos = {
        "dpo": ("sft", pc),
        "dpo_extend": ("sft_extend", pc),
        "dpo_long": ("sft_long", pc),
        "dpo_onpolicy": ("sft", dataclasses.replace(pc, on_policy=True)),
    }
    dpos = {k: v for k, v in dpos.items() if k in runs}
    degeneration, examples = {}, {}
    for name, (start, pcfg) in dpos.items():
        t = time.time()
        tr = tracker()
        p0 = finals[start]
        r = T.preference(
            p0,
            p0,
            lm,
            data.train,
            pcfg,
            max_prompt_len=mp,
            tokenizer=tok,
            ckpt_dir=ckpt(name),
            on_eval=tr.evaluate,
            progress=progress,
        )
        tr.finalize(r.history)
        trackers[name], histories[name], finals[name] = tr, r.history, r.params
        prompts = tr.prompt_ids["test"]
        ys = generate(
            r.params,
            lm,
            prompts,
            tr.decode_max_new_tokens,
            temperature=0.0,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
        texts = [tok.decode(y) for y in ys]
        degeneration[name] = C.repeated_ngram_shares(texts, 2)  # per held-out prompt
        examples[name] = texts[:3]
        timings[name] = time.time() - t
        log(f"  {name} {r.step} steps: {timings[name]:.1f} s")
    for name in list(RUNS):
        shutil.rmtree(out / name / "ckpt", ignore_errors=True)

    done = [k for k in RUNS if k in trackers]
    curves = {k: _curves(trackers[k]) for k in done}
    extra = {f"{k}.degeneration": v for k, v in degeneration.items()}
    for name in dpos:
        extra.update(C.history_measurements(name, histories[name]))
    return {
        # per-prompt measurements (tuples over the tracked prompts): prompts are the units of
        # the claims' decisions within a seed
        "measurements": C.measure({k: _prompt_curves(trackers[k]) for k in done}, extra),
        "curves": curves,
        "timings": timings,
        "trackers": trackers,
        "histories": histories,
        "greedy_examples": examples,
        "steps": {
            "sft": base_steps,
            **({"sft_long": long_steps} if "sft_long" in trackers else {}),
            **{k: int(trackers[k].steps[-1]) for k in ("sft_extend", *dpos) if k in trackers},
        },
    }


def figures(res: dict) -> dict:
    """The paper's Figures 3–5 from one seed's results: ``{file name: matplotlib figure}`` (only
    the figures whose runs were made)."""
    tr, h = res["trackers"], res["histories"]
    st = res["steps"]
    out = {
        "reproduce_fig3_sft_probes.png": plots.plot_probe_grid(
            tr["sft"], title=f"Fig 3 — SFT ({st['sft']} steps): log π of each probe type"
        )
    }
    if "dpo" in tr:
        out["reproduce_fig4_dpo_probes.png"] = plots.plot_probe_grid(
            tr["dpo"], title="Fig 4 — off-policy DPO after SFT: log π of each probe type"
        )
        out["reproduce_fig4_dpo_squeeze.png"] = plots.plot_squeeze(
            tr["dpo"], title="Fig 4 — off-policy DPO: the squeezing effect", history=h["dpo"]
        )
    if "sft_extend" in tr:
        out["reproduce_fig5_sft_extend.png"] = plots.plot_compare(
            {"SFT baseline": tr["sft"], "SFT extend (y⁺ and y⁻)": tr["sft_extend"]},
            title="Fig 5 — SFT baseline vs extend",
            types=("chosen", "rejected", "irr_train"),
        )
    names = {
        "dpo": "DPO (baseline SFT)",
        "dpo_extend": "DPO after extend",
        "dpo_long": f"DPO after long SFT ({st.get('sft_long')} steps)",
        "dpo_onpolicy": "DPO on-policy",
    }
    dpo_runs = {v: tr[k] for k, v in names.items() if k in tr}
    if len(dpo_runs) > 1:
        third = "irr_hum" if "irr_hum" in tr["dpo"].all_types else "irr_test"
        out["reproduce_fig5_dpo_compare.png"] = plots.plot_compare(
            dpo_runs,
            title="Fig 5 — DPO variants: log π",
            types=("chosen", "rejected", third, "greedy"),
        )
        out["reproduce_fig5_argmax_path.png"] = plots.plot_compare(
            dpo_runs,
            metric="argmax_path",
            types=("chosen", "rejected"),
            title="Fig 5 — DPO variants: argmax path Σ log max π (the code's y*)",
        )
    return out


def reproduce_lm(
    cfg,
    data,
    out,
    *,
    seeds: Sequence[int] = (0,),
    cache_dir: Path | None = None,
    long_factor: float = 2.0,
    progress: bool = False,
    command: str = "",
    log=print,
    runs: Sequence[str] = RUNS,
) -> dict:
    """Every seed's experiments, the claims table (``claims.md``, ``claims.json``) and figures
    under ``out``. Returns the JSON document.

    The phases' checkpoints live under ``out/seed<s>/<phase>/ckpt`` while they run (removed
    after each seed); the results (``seed<s>/curves.json``, ``figures/``, ``claims.*``) are
    written to a staging folder and moved into ``out`` only when every seed is done
    (:func:`ldjax.experiments.common.staged_output`), so a failure or Ctrl-C leaves the previous
    results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.time()
    per_seed, timings, results = [], [], []
    for s in seeds:
        log(f"seed {s}:")
        res = run_seed(
            _seeded(cfg, s),
            data,
            out / f"seed{s}",
            cache_dir=cache_dir,
            long_factor=long_factor,
            progress=progress,
            log=log,
            runs=runs,
        )
        per_seed.append(res["measurements"])
        # each seed's per-prompt measurements as soon as it is done (a long run that is stopped
        # keeps its finished seeds: C.evaluate_claims on these files decides them)
        write_text(
            out / f"seed{s}" / "measurements.json",
            json.dumps(res["measurements"], default=float) + "\n",
        )
        timings.append(res["timings"])
        results.append(res)
    with common.staged_output(out) as stage:
        doc = _write_results(
            stage,
            out,
            cfg,
            data,
            seeds,
            results,
            per_seed,
            timings,
            t0,
            load0,
            long_factor,
            command,
        )
    return doc


def _write_results(
    stage, out, cfg, data, seeds, results, per_seed, timings, t0, load0, long_factor, command
) -> dict:
    """The result files of :func:`reproduce_lm` into ``stage`` (paths reported under ``out``)."""
    for s, res in zip(seeds, results):
        write_text(
            stage / f"seed{s}" / "curves.json",
            json.dumps(
                {
                    "curves": res["curves"],
                    "steps": res["steps"],
                    "greedy_examples": res["greedy_examples"],
                    "timings": res["timings"],
                },
                indent=1,
            )
            + "\n",
        )
    figure_paths = []
    for name, fig in figures(results[0]).items():
        save_figure(fig, stage / "figures" / name)
        figure_paths.append(str(out / "figures" / name))
    rows = C.evaluate_claims(per_seed)
    total = time.time() - t0
    load1 = os.getloadavg()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, load average (1 min) "
        f"{load0[0]:.1f} at start / {load1[0]:.1f} at end"
    )
    doc = {
        "command": command,
        "data": data.source,
        "n_train": len(data.train),
        "n_heldout": len(data.heldout),
        "n_track": [len(data.track_train), len(data.track_test)],
        "seeds": list(seeds),
        "machine": machine,
        "seconds": total,
        "timings_per_seed": timings,
        "steps": results[0]["steps"],
        "claims": rows,
        "outcomes": C.count_outcomes(rows),
        "decision_rule": "ldjax.experiments.stats.decide: 95 % t-interval of the paired effect, "
        "seeds x prompts crossed random effects (Satterthwaite df); PASS/FAIL when it excludes 0 "
        "on the claimed/other side, else INCONCLUSIVE",
        "measurements_per_seed": [C.scalar_measurements(m) for m in per_seed],
        "greedy_examples_seed0": results[0]["greedy_examples"],
        "figures": figure_paths,
        "config": cfg.to_dict(),
        "long_sft_factor": long_factor,
        "tokenizer": repr(data.tokenizer),
    }
    write_text(stage / "claims.json", json.dumps(doc, indent=1, default=float) + "\n")
    st = results[0]["steps"]
    tok_desc = repr(data.tokenizer)
    header = (
        f"# Claims table — `ldjax reproduce lm`\n\n"
        f"Command: `{command}`  \nData: {data.source} ({len(data.train)} training records, "
        f"{len(data.heldout)} held out; probes on {len(data.track_train)} training + "
        f"{len(data.track_test)} held-out prompts)  \nSeeds: {list(seeds)}; "
        f"steps: {', '.join(f'{k} {v}' for k, v in st.items())}  \n"
        f"Tokenizer: {tok_desc}; model V = {cfg.lm_config().vocab_size}  \n"
        f"Machine: {machine}; wall time {total:.0f} s\n\n"
        "Probe numbers are mean log π(y|x) (or the named metric) over the tracked training "
        "prompts "
        f"at the first/last evaluation of the phase; 'Δ' is last − first. Each effect is a "
        "paired difference per seed and prompt (S×P), its interval over both.\n"
    )
    write_text(stage / "claims.md", C.claims_markdown(rows, header=header))
    return doc


def _long_factor(text: str) -> float:
    v = positive_float(text)
    if not v > 1:
        raise argparse.ArgumentTypeError(f"expected a number > 1, got {text!r}")
    return v


def _parser():
    p = argparse.ArgumentParser(prog="ldjax reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "what",
        choices=["lm", "followups"],
        help="which reproduction (lm: the paper's LLM claims, §4; followups: gradient "
        "entanglement, likelihood displacement and GRPO, see `ldjax reproduce followups --help`)",
    )
    common.add_common_arguments(
        p,
        out="runs/reproduce_lm",
        data="JSONL probe or prompt/chosen/rejected file (default: $LDJAX_DATA/hh_probe/"
        "formal_prob_train.jsonl if present, else synthetic)",
        quick="tiny model and few steps (CI, ≤ 3 min)",
        config=None,
        progress=None,
        cache=None,
    )
    p.add_argument("--synthetic", action="store_true", help="use the embedded synthetic data set")
    p.add_argument(
        "--seeds", type=positive_int, default=1, help="number of seeds 0..N-1 (table: mean ± std)"
    )
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated subset of the runs (must include sft; default all: "
        + ",".join(RUNS)
        + "); claims that need a run not made are MISSING",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="config preset (default: 'quick' with --quick, else 'default'; 'bpe': the default "
        "model on a 1024-token BPE trained on the pretraining text)",
    )
    p.add_argument(
        "--redecide",
        metavar="CLAIMS_JSON",
        help="train nothing: decide the claims again, under the current rule, from the per-seed "
        "measurements of an earlier claims.json (or of the seed*/measurements.json in a run's "
        "--out folder, finished or stopped), and write claims.md/claims.json to --out",
    )
    p.add_argument(
        "--long-sft",
        type=_long_factor,
        default=2.0,
        help="long SFT = this × the SFT steps (default 2)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ldjax reproduce lm ...``; returns the exit status: 0 done, 2 a usage or input error, 1 a
    failure during the run (a damaged cache entry is retrained, not a failure), 130 interrupted
    (Ctrl-C: ``--out`` keeps its previous results; a rerun resumes an interrupted pretraining from
    its checkpoints, or takes it from the cache, and runs the finetuning phases again)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "followups":  # its own options: ldjax.experiments.followups.cli
        return importlib.import_module("ldjax.experiments.followups.cli").main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print(
            f"ldjax reproduce: interrupted; {args.out} keeps its previous results, a rerun "
            "resumes the pretraining (or takes it from the cache) and runs the phases again",
            file=sys.stderr,
        )
        return 130


def load_for_redecide(path) -> dict:
    """A document for :func:`redecide`: an earlier ``claims.json``, or the ``--out`` folder of a
    run (finished or stopped), whose ``seed*/measurements.json`` (per-prompt measurements,
    written as each seed finishes) are read in seed order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("seed*/measurements.json"), key=lambda f: int(f.parent.name[4:]))
        if not files:
            raise ValueError(
                f"{path}: no seed*/measurements.json (is it a reproduce --out folder?)"
            )
        return {
            "command": f"(the finished seeds under {path})",
            "data": str(path),
            "seeds": [int(f.parent.name[4:]) for f in files],
            "per_prompt": True,
            "measurements_per_seed": [json.loads(f.read_text(encoding="utf-8")) for f in files],
        }
    return json.loads(path.read_text(encoding="utf-8"))


def redecide(doc: dict, out, *, command: str = "") -> dict:
    """The claims of an earlier ``claims.json`` document decided again from its
    ``measurements_per_seed`` (per-seed numbers; per-prompt values, when the document has them
    only in its rows' ``d``, are not recovered — the decision is then over seeds, ``P = 1``), or
    of a run folder's per-prompt seed files (:func:`load_for_redecide`: seeds × prompts).
    Writes ``out/claims.json`` and ``out/claims.md``; returns the new document."""
    if not isinstance(doc, dict) or not doc.get("measurements_per_seed"):
        raise ValueError("the claims JSON has no 'measurements_per_seed'")
    per_seed = doc["measurements_per_seed"]
    per_prompt = bool(doc.get("per_prompt"))
    rows = C.evaluate_claims(per_seed)
    new = dict(doc)
    new.update(
        claims=rows,
        outcomes=C.count_outcomes(rows),
        redecided={"command": command, "from_command": doc.get("command", "")},
        decision_rule="ldjax.experiments.stats.decide: 95 % t-interval of the paired effect "
        + (
            "over seeds x prompts (crossed; Satterthwaite df)"
            if per_prompt
            else "over seeds (per-seed means; no per-prompt values in the source)"
        ),
    )
    if per_prompt:
        new["measurements_per_seed"] = [C.scalar_measurements(m) for m in per_seed]
    out = Path(out)
    with common.staged_output(out) as stage:
        write_text(stage / "claims.json", json.dumps(new, indent=1, default=float) + "\n")
        header = (
            "# Claims table — decided again (`ldjax reproduce lm --redecide`)\n\n"
            f"Command: `{command}`  \nMeasurements from: `{doc.get('command', '')}`  \n"
            f"Data: {doc.get('data', '?')}; seeds: {doc.get('seeds', '?')}; "
            f"machine then: {doc.get('machine', '?')}; wall time then {doc.get('seconds', 0):.0f} s"
            + (
                "\n\nPer-prompt measurements: each effect's interval is over seeds × prompts.\n"
                if per_prompt
                else "\n\nThe source has one number per seed for each measurement (means over the "
                "tracked prompts), so each effect's interval is the t-interval over seeds "
                "(P = 1).\n"
            )
        )
        write_text(stage / "claims.md", C.claims_markdown(rows, header=header))
    return new


def _run(args, argv) -> int:
    command = "ldjax reproduce " + " ".join(shlex.quote(a) for a in argv)
    if args.redecide:
        try:
            common.check_writable(args.out)
            redecide(load_for_redecide(args.redecide), args.out, command=command)
        except (ValueError, OSError, KeyError) as e:
            print(f"ldjax reproduce: error: --redecide {args.redecide}: {e}", file=sys.stderr)
            return 2
        print((Path(args.out) / "claims.md").read_text(encoding="utf-8"))
        return 0
    cache = (
        None if args.no_cache else Path(args.cache_dir) if args.cache_dir else common.cache_dir()
    )
    try:
        common.check_writable(args.out)
        if cache is not None:
            common.check_writable(cache, "--cache-dir")
        base = preset(PRESETS, args.preset or ("quick" if args.quick else "default"))
        runs = [r.strip() for r in args.runs.split(",") if r.strip()]
        if sorted(set(runs) - set(RUNS)) or "sft" not in runs:
            raise ValueError(
                f"--runs must be a subset of {','.join(RUNS)} with sft, got {args.runs}"
            )
        cfg = load_config(args.config, base) if args.config else base
        path = None if args.synthetic else (args.data or default_data_path())
        records, source = load_records(path, cfg)
        data = prepare_data(records, cfg, source)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax reproduce: error: {e}", file=sys.stderr)
        return 2
    print(f"{command}\ndata: {source}; {len(data.train)} train / {len(data.heldout)} held out")
    try:
        doc = reproduce_lm(
            cfg,
            data,
            args.out,
            seeds=range(args.seeds),
            cache_dir=cache,
            long_factor=args.long_sft,
            progress=common.progress_enabled(args),
            command=command,
            runs=runs,
        )
    except (ValueError, OSError) as e:
        print(f"ldjax reproduce: error: {e}", file=sys.stderr)
        return 1
    print((Path(args.out) / "claims.md").read_text(encoding="utf-8"))
    print(f"done in {doc['seconds']:.1f} s; {doc['machine']}")
    print(f"table: {Path(args.out) / 'claims.md'}, {Path(args.out) / 'claims.json'}")
    for f in doc["figures"]:
        print(f"figure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
