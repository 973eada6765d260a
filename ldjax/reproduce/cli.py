"""``ldjax reproduce lm``: the paper's LLM claims (PAPER.md §6) in one command, with a claims table.

On the probe set (``--data``; default ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl`` if present,
else the embedded synthetic set; any prompt/chosen/rejected JSONL works, the model-free probe
types being built by :func:`ldjax.data.probes.build_probes`), for each seed:

1. pretrain (cached and reused: :func:`ldjax.lm.cli.pretrained_params`);
2. a *long* SFT of ``--long-sft`` × the configured SFT steps, stopped at the configured length
   (an orbax checkpoint, then resumed: the first part is exactly the baseline SFT when the SFT
   schedule is ``constant``, the default) — so one run gives the baseline SFT and the longer SFT;
3. extend SFT (y⁺ and y⁻, the paper's remedy) from the same pretrained model;
4. the same off-policy DPO after baseline SFT, after extend SFT and after the long SFT, and DPO
   with on-policy negatives after baseline SFT;
5. probes tracked on training and held-out prompts in every phase (:class:`ldjax.lm.tracking.ProbeTracker`);
   after each DPO, greedy decodes of the held-out prompts for the degeneration measure.

Then :mod:`ldjax.reproduce.claims` turns the curves into measurements and PASS/FAIL rows:
``<out>/claims.md``, ``<out>/claims.json`` and figures ``<out>/figures/reproduce_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldjax.reproduce import claims as C

__all__ = ["main", "default_data_path", "run_seed", "reproduce_lm", "TruncatedTrack"]

RUNS = ("sft", "sft_extend", "sft_long", "dpo", "dpo_extend", "dpo_onpolicy", "dpo_long")


def default_data_path() -> Optional[str]:
    """``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl`` if it exists, else None (synthetic)."""
    root = os.environ.get("LDJAX_DATA")
    if root:
        p = Path(root) / "hh_probe" / "formal_prob_train.jsonl"
        if p.exists():
            return str(p)
    return None


class TruncatedTrack:
    """The first evaluations (steps <= ``last_step``) of a tracker, with the plotting interface
    (``steps``, ``sets``, ``all_types``, ``label``, ``curve``)."""

    def __init__(self, track, last_step: int):
        self.track = track
        self.n = int(np.searchsorted(np.asarray(track.steps), last_step, side="right"))
        if self.n < 1:
            raise ValueError(f"no evaluation at or before step {last_step}")
        self.steps = list(track.steps[:self.n])
        self.sets = track.sets
        self.all_types = track.all_types
        self.label = track.label

    def curve(self, s, t, metric="logp_sum"):
        return self.track.curve(s, t, metric)[:self.n]


def _curves(track) -> dict:
    """``{set: {type: {metric: (E,) list}}}`` for the claim metrics."""
    return {s: {t: {m: track.curve(s, t, m).tolist() for m in C.METRICS} for t in track.all_types}
            for s in track.sets}


def _seeded(cfg, seed: int):
    return cfg.replace(seed=seed, pretrain={"seed": seed}, sft={"seed": seed}, preference={"seed": seed})


def run_seed(cfg, data, out: Path, *, cache_dir: Optional[Path], long_factor: float = 2.0,
             progress: bool = False, log=print) -> dict:
    """All experiments of one seed (module docstring). Returns ``{"measurements", "curves",
    "timings", "trackers", "histories", "steps", "greedy_examples"}``."""
    from ldjax.lm import train as T
    from ldjax.lm.cli import pretrained_params
    from ldjax.lm.decode import generate
    from ldjax.lm.tracking import ProbeTracker

    out = Path(out)
    lm = cfg.lm_config()
    timings: dict = {}
    t0 = time.time()
    params, info = pretrained_params(cfg, data, out, cache_dir=cache_dir, progress=progress)
    timings["pretrain"] = time.time() - t0
    log(f"  pretrain: {timings['pretrain']:.1f} s ({'cache' if info.get('from_cache') else 'trained'})")
    mp = cfg.data.max_prompt_len

    def tracker():
        return ProbeTracker(lm, {"train": data.track_train, "test": data.track_test}, max_prompt_len=mp,
                            eval_batch=cfg.track.eval_batch, decode_max_new_tokens=cfg.track.decode_max_new_tokens)

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
    r1 = T.sft(params, lm, data.train, long_cfg, max_prompt_len=mp, ckpt_dir=d, on_eval=tr.evaluate,
               stop_at=base_steps, progress=progress)
    if tr.steps[-1] != base_steps:
        tr.evaluate(base_steps, r1.params)
    finals["sft"] = r1.params
    timings["sft"] = time.time() - t
    r2 = T.sft(params, lm, data.train, long_cfg, max_prompt_len=mp, ckpt_dir=d, resume=True,
               on_eval=tr.evaluate, progress=progress)
    tr.finalize(r2.history)
    finals["sft_long"] = r2.params
    timings["sft_long"] = time.time() - t
    trackers["sft_long"], histories["sft_long"] = tr, r2.history
    trackers["sft"] = TruncatedTrack(tr, base_steps)
    log(f"  sft {base_steps} + long to {long_steps} steps: {timings['sft_long']:.1f} s")

    t = time.time()
    tr = tracker()
    ext_cfg = dataclasses.replace(cfg.sft, extend=True)
    r = T.sft(params, lm, data.train, ext_cfg, max_prompt_len=mp, ckpt_dir=ckpt("sft_extend"),
              on_eval=tr.evaluate, progress=progress)
    tr.finalize(r.history)
    trackers["sft_extend"], histories["sft_extend"], finals["sft_extend"] = tr, r.history, r.params
    timings["sft_extend"] = time.time() - t
    log(f"  sft extend {r.step} steps: {timings['sft_extend']:.1f} s")

    # -- DPO ------------------------------------------------------------------------------------
    pc = dataclasses.replace(cfg.preference, on_policy=False)
    dpos = {"dpo": ("sft", pc), "dpo_extend": ("sft_extend", pc), "dpo_long": ("sft_long", pc),
            "dpo_onpolicy": ("sft", dataclasses.replace(pc, on_policy=True))}
    degeneration, examples = {}, {}
    for name, (start, pcfg) in dpos.items():
        t = time.time()
        tr = tracker()
        p0 = finals[start]
        r = T.preference(p0, p0, lm, data.train, pcfg, max_prompt_len=mp, ckpt_dir=ckpt(name),
                         on_eval=tr.evaluate, progress=progress)
        tr.finalize(r.history)
        trackers[name], histories[name], finals[name] = tr, r.history, r.params
        prompts = tr.prompt_ids["test"]
        ys = generate(r.params, lm, prompts, tr.decode_max_new_tokens, temperature=0.0,
                      eos_id=tr.tokenizer.eos_id, pad_id=tr.tokenizer.pad_id)
        texts = [tr.tokenizer.decode(y) for y in ys]
        degeneration[name] = C.repeated_ngram_share(texts, 2)
        examples[name] = texts[:3]
        timings[name] = time.time() - t
        log(f"  {name} {r.step} steps: {timings[name]:.1f} s")
    for name in list(RUNS):
        shutil.rmtree(out / name / "ckpt", ignore_errors=True)

    curves = {k: _curves(trackers[k]) for k in RUNS}
    extra = {f"{k}.degeneration": v for k, v in degeneration.items()}
    for name in dpos:
        extra.update(C.history_measurements(name, histories[name]))
    return {"measurements": C.measure(curves, extra), "curves": curves, "timings": timings,
            "trackers": trackers, "histories": histories, "greedy_examples": examples,
            "steps": {"sft": base_steps, "sft_long": long_steps,
                      **{k: int(trackers[k].steps[-1]) for k in ("sft_extend", *dpos)}}}


def _figures(res: dict, figs: Path) -> list[str]:
    from ldjax.lm import plots

    tr, h = res["trackers"], res["histories"]
    st = res["steps"]
    paths = [
        plots.plot_probe_grid(tr["sft"], figs / "reproduce_fig3_sft_probes.png",
                              title=f"Fig 3 — SFT ({st['sft']} steps): log π of each probe type"),
        plots.plot_probe_grid(tr["dpo"], figs / "reproduce_fig4_dpo_probes.png",
                              title="Fig 4 — off-policy DPO after SFT: log π of each probe type"),
        plots.plot_squeeze(tr["dpo"], figs / "reproduce_fig4_dpo_squeeze.png",
                           title="Fig 4 — off-policy DPO: the squeezing effect", history=h["dpo"]),
        plots.plot_compare({"SFT baseline": tr["sft"], "SFT extend (y⁺ and y⁻)": tr["sft_extend"]},
                           figs / "reproduce_fig5_sft_extend.png",
                           title="Fig 5 — SFT baseline vs extend", types=("chosen", "rejected", "irr_train")),
        plots.plot_compare({"DPO (baseline SFT)": tr["dpo"], "DPO after extend": tr["dpo_extend"],
                            f"DPO after long SFT ({st['sft_long']} steps)": tr["dpo_long"],
                            "DPO on-policy": tr["dpo_onpolicy"]},
                           figs / "reproduce_fig5_dpo_compare.png",
                           title="Fig 5 — DPO variants: log π", types=("chosen", "rejected", "irr_hum" if "irr_hum" in tr["dpo"].all_types else "irr_test", "greedy")),
        plots.plot_compare({"DPO (baseline SFT)": tr["dpo"], "DPO after extend": tr["dpo_extend"],
                            "DPO after long SFT": tr["dpo_long"], "DPO on-policy": tr["dpo_onpolicy"]},
                           figs / "reproduce_fig5_argmax_path.png", metric="argmax_path",
                           title="Fig 5 — DPO variants: argmax path Σ log max π (the code's y*)",
                           types=("chosen", "rejected")),
    ]
    return paths


def reproduce_lm(cfg, data, out, *, seeds: Sequence[int] = (0,), cache_dir: Optional[Path] = None,
                 long_factor: float = 2.0, progress: bool = False, command: str = "", log=print) -> dict:
    """Every seed's experiments, the claims table (``claims.md``, ``claims.json``) and figures
    under ``out``. Returns the JSON document."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.time()
    per_seed, timings, results = [], [], []
    for s in seeds:
        log(f"seed {s}:")
        res = run_seed(_seeded(cfg, s), data, out / f"seed{s}", cache_dir=cache_dir,
                       long_factor=long_factor, progress=progress, log=log)
        per_seed.append(res["measurements"])
        timings.append(res["timings"])
        results.append(res)
        (out / f"seed{s}").mkdir(parents=True, exist_ok=True)
        (out / f"seed{s}" / "curves.json").write_text(json.dumps(
            {"curves": res["curves"], "steps": res["steps"], "greedy_examples": res["greedy_examples"],
             "timings": res["timings"]}, indent=1) + "\n", encoding="utf-8")
    figures = _figures(results[0], out / "figures")
    rows = C.evaluate_claims(per_seed)
    total = time.time() - t0
    load1 = os.getloadavg()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, load average (1 min) "
               f"{load0[0]:.1f} at start / {load1[0]:.1f} at end")
    doc = {"command": command, "data": data.source, "n_train": len(data.train), "n_heldout": len(data.heldout),
           "n_track": [len(data.track_train), len(data.track_test)], "seeds": list(seeds),
           "machine": machine, "seconds": total, "timings_per_seed": timings,
           "steps": results[0]["steps"], "claims": rows, "measurements_per_seed": per_seed,
           "greedy_examples_seed0": results[0]["greedy_examples"], "figures": figures,
           "config": cfg.to_dict(), "long_sft_factor": long_factor}
    (out / "claims.json").write_text(json.dumps(doc, indent=1, default=float) + "\n", encoding="utf-8")
    st = results[0]["steps"]
    header = (f"# Claims table — `ldjax reproduce lm`\n\n"
              f"Command: `{command}`  \nData: {data.source} ({len(data.train)} training records, "
              f"{len(data.heldout)} held out; probes on {len(data.track_train)} training + "
              f"{len(data.track_test)} held-out prompts)  \nSeeds: {list(seeds)}; steps: SFT {st['sft']}, "
              f"long SFT {st['sft_long']}, extend SFT {st['sft_extend']}, DPO {st['dpo']}  \n"
              f"Machine: {machine}; wall time {total:.0f} s\n\n"
              f"Probe numbers are mean log π(y|x) (or the named metric) over the tracked training prompts "
              f"at the first/last evaluation of the phase; 'Δ' is last − first.\n")
    (out / "claims.md").write_text(C.claims_markdown(rows, header=header), encoding="utf-8")
    return doc


def _parser():
    p = argparse.ArgumentParser(prog="ldjax reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["lm"], help="which reproduction (lm: the paper's §6)")
    p.add_argument("--data", help="JSONL probe or prompt/chosen/rejected file (default: "
                                  "$LDJAX_DATA/hh_probe/formal_prob_train.jsonl if present, else synthetic)")
    p.add_argument("--synthetic", action="store_true", help="use the embedded synthetic data set")
    p.add_argument("--out", default="runs/reproduce_lm", help="output folder (default runs/reproduce_lm)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (CI, ≤ 3 min)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds 0..N-1 (table: mean ± std)")
    p.add_argument("--config", help="JSON config (full or partial) merged onto the default/--quick one")
    p.add_argument("--long-sft", type=float, default=2.0, help="long SFT = this × the SFT steps (default 2)")
    p.add_argument("--cache-dir", help="pretrained-model cache (default $LDJAX_CACHE or ~/.cache/ldjax)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the pretraining cache")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ldjax reproduce lm ...``; returns the exit status."""
    from ldjax.lm.cli import load_records, prepare_data
    from ldjax.lm.config import DEFAULT, QUICK, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if not args.long_sft > 1:
            raise ValueError(f"--long-sft must be > 1, got {args.long_sft}")
        base = QUICK if args.quick else DEFAULT
        cfg = load_config(args.config, base) if args.config else base
        path = None if args.synthetic else (args.data or default_data_path())
        records, source = load_records(path, cfg)
        data = prepare_data(records, cfg, source)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldjax reproduce: error: {e}", file=sys.stderr)
        return 2
    cache = (None if args.no_cache else Path(args.cache_dir) if args.cache_dir
             else Path(os.environ.get("LDJAX_CACHE", Path.home() / ".cache" / "ldjax")))
    command = "ldjax reproduce " + " ".join(shlex.quote(a) for a in argv)
    print(f"{command}\ndata: {source}; {len(data.train)} train / {len(data.heldout)} held out")
    doc = reproduce_lm(cfg, data, args.out, seeds=range(args.seeds), cache_dir=cache,
                       long_factor=args.long_sft, progress=args.progress, command=command)
    print((Path(args.out) / "claims.md").read_text(encoding="utf-8"))
    print(f"done in {doc['seconds']:.1f} s; {doc['machine']}")
    print(f"table: {Path(args.out) / 'claims.md'}, {Path(args.out) / 'claims.json'}")
    for f in doc["figures"]:
        print(f"figure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
