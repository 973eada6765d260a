"""The LM finetuning experiments end to end (``ldjax lm``): data, cached pretraining, tracked
phases.

Data (``--data FILE``): a JSON-lines file, either the paper's probe layout (``prompt`` + the 13
response fields, e.g. ``$LDJAX_DATA/hh_probe/formal_prob_train.jsonl``) or plain
``prompt``/``chosen``/``rejected`` records (missing model-free probe types are added by
:func:`ldjax.data.probes.build_probes`). Without ``--data`` the embedded synthetic dataset
(:func:`ldjax.data.synthetic.generate_preferences`) is used, so everything runs on a fresh clone.

Split (:func:`prepare_data`): ``data.n_heldout`` records (seeded) are held out of every phase; the
rest train pretraining (their prompts, see ``data.pretrain_source``), SFT and DPO. Probes are
tracked on the first ``data.n_track`` training records ("train") and held-out records ("test").

Commands (each writes under ``--out``; ``--resume`` continues interrupted phases from their orbax
checkpoints and reuses finished ones):

* ``pretrain``  next-token pretraining (cached: see below);
* ``sft``       pretrain → SFT with probe tracking and figures;
* ``dpo``       pretrain → SFT → preference phase (``--loss``, ``--on-policy``) with tracking;
* ``pipeline``  the same as ``dpo`` plus the one-step check, all figures and ``summary.json``
  (timings, losses, how each probe type's log π moved);
* ``one-step``  one exact decomposition of an SFT step on the pretrained model
  (:func:`ldjax.experiments.lm.one_step.run_one_step`): a table, a JSON and a figure.

The pretrained parameters are cached in ``--cache-dir`` (default ``$LDJAX_CACHE`` or
``~/.cache/ldjax``) under a hash of the model, data and pretraining configs and the training
records, and reused when the same configuration and data come again (``--no-cache`` disables it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ldjax.data.preferences import load_jsonl
from ldjax.data.probes import build_probes, split_held_out
from ldjax.data.synthetic import generate_preferences
from ldjax.experiments.common import save_figure, staged_output, write_json, write_text
from ldjax.experiments.lm import plots
from ldjax.experiments.lm.one_step import (
    format_optimizer_table,
    format_table,
    run_one_step,
    run_optimizer_step,
)
from ldjax.experiments.lm.token_maps import run_token_maps, token_map_figures
from ldjax.experiments.lm.tracking import ProbeTracker
from ldjax.lm import train as T
from ldjax.lm.checkpoint import load_lm, save_lm
from ldjax.lm.config import PipelineConfig
from ldjax.lm.model import count_params, init_params
from ldjax.lm.tokenizer import BPETokenizer, ByteTokenizer
from ldjax.training.checkpoint import CheckpointError
from ldjax.training.monitor import STATS, SqueezeMonitor

__all__ = [
    "load_records",
    "prepare_data",
    "PreparedData",
    "run_pipeline",
    "pretrained_params",
    "one_step",
]

_MODEL_FREE = ("irr_train", "irr_test", "random_permute", "random_nonhum")


@dataclasses.dataclass
class PreparedData:
    """Records of one experiment: ``train`` (trained on), ``heldout`` (never trained on),
    ``track_train``/``track_test`` (probed prompts), ``source`` (file or "synthetic"),
    ``fingerprint`` (sha256 of the training records), ``tokenizer`` (``data.tokenizer``: the
    byte tokenizer, or the BPE trained on the pretraining text of ``train``)."""

    train: list
    heldout: list
    track_train: list
    track_test: list
    source: str
    fingerprint: str
    tokenizer: Any = dataclasses.field(default_factory=ByteTokenizer)


def load_records(path: str | None, config: PipelineConfig) -> tuple[list, str]:
    """``(records, source)`` from a JSONL file, or the synthetic dataset when ``path`` is None."""
    if path is None:
        recs = generate_preferences(config.data.synthetic_n, seed=config.data.split_seed)
        source = f"synthetic(n={config.data.synthetic_n}, seed={config.data.split_seed})"
    else:
        recs = load_jsonl(path)
        source = os.path.abspath(path)
    if config.data.n_records is not None:
        recs = recs[: config.data.n_records]
    need = config.data.n_heldout + 2
    if len(recs) < need:
        raise ValueError(f"{source}: {len(recs)} records, need at least n_heldout + 2 = {need}")
    return recs, source


def prepare_data(
    records: Sequence[dict], config: PipelineConfig, source: str = "records"
) -> PreparedData:
    """Held-out split (:func:`ldjax.data.probes.split_held_out`, ``data.split_seed``), model-free
    probe types added where missing (training records draw ``irr_test`` from the held-out ones;
    held-out records draw ``irr_train``/``irr_test`` from the other held-out records), tracked
    subsets."""
    dc = config.data
    train, held = split_held_out(list(records), dc.n_heldout, dc.split_seed)
    if not all(isinstance(r.get(t), str) for r in records for t in _MODEL_FREE):
        train = build_probes(train, seed=dc.split_seed, test_records=held)
        held = (
            build_probes(held, seed=dc.split_seed + 1, test_records=held)
            if len(held) >= 2
            else held
        )
    for i, r in enumerate(train):
        if not isinstance(r.get("rejected"), str):
            raise ValueError(f"{source}: training record {i} has no string 'rejected' field")
    h = hashlib.sha256(
        json.dumps([[r["prompt"], r["chosen"], r["rejected"]] for r in train]).encode()
    )
    tok = ByteTokenizer()
    if dc.tokenizer == "bpe":
        tok = BPETokenizer.train(_pretrain_texts(train, config)[0], dc.bpe_vocab_size)
    return PreparedData(
        train, held, train[: dc.n_track], held[: dc.n_track], source, h.hexdigest(), tok
    )


_OPEN_TURN = "\n\nAssistant:"


def _dialogue_text(prompt: str) -> str:
    """A prompt without its final, open ``Assistant:`` turn."""
    return prompt[: -len(_OPEN_TURN)] if prompt.endswith(_OPEN_TURN) else prompt


def _pretrain_texts(records: Sequence[dict], config: PipelineConfig) -> tuple[list[str], bool]:
    """``(texts, eos)`` of the pretraining phase (``data.pretrain_source``): "prompts" gives the
    dialogues without their open last ``Assistant:`` turn and no EOS (so the model never learns
    that a response ends right after ``Assistant:``); "dialogues" prompt + chosen + EOS;
    "dialogues_both" also prompt + rejected + EOS."""
    src = config.data.pretrain_source
    if src == "prompts":
        return [_dialogue_text(r["prompt"]) for r in records], False
    texts = [r["prompt"] + r["chosen"] for r in records]
    if src == "dialogues_both":
        texts += [r["prompt"] + r["rejected"] for r in records]
    return texts, True


def _cache_key(config: PipelineConfig, data: PreparedData) -> str:
    d = {
        "model": dataclasses.asdict(config.model),
        "pretrain": dataclasses.asdict(config.pretrain),
        "max_len": config.data.max_len,
        "source": config.data.pretrain_source,
        "seed": config.seed,
        "data": data.fingerprint,
        "version": 2,
        **(
            {"tokenizer": "bpe", "bpe_vocab_size": config.data.bpe_vocab_size}
            if config.data.tokenizer != "byte"
            else {}
        ),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_params(
    config: PipelineConfig,
    data: PreparedData,
    out: Path,
    *,
    resume: bool = False,
    resume_older: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """θ after pretraining: from the cache when the same config and data were pretrained before,
    else trained (checkpoints in ``out/pretrain/ckpt``) and cached. Returns ``(params, info)``;
    after training, ``info["figure"]`` is the pretraining figure (a matplotlib figure, not
    written: the caller stages it with its other results).

    A cache entry that cannot be read or fails its checks
    (:class:`~ldjax.training.checkpoint.CheckpointError`) is never used: a line on stderr names
    the entry and the reason, and the model is trained again (and the entry replaced)."""
    lm = config.lm_config()
    p0 = jax.jit(init_params, static_argnums=0)(lm, jax.random.PRNGKey(config.seed))
    key = _cache_key(config, data)
    cached = None if cache_dir is None else Path(cache_dir) / "lm_pretrain" / key
    info = {"cache_key": key, "n_params": count_params(p0)}
    if cached is not None and cached.exists():
        t0 = time.time()
        try:
            params, _, loaded = load_lm(cached)
        except (FileNotFoundError, CheckpointError) as e:  # an interrupted or damaged cache entry
            print(
                f"ldjax: pretraining cache entry {cached} is unusable, training again: {e}",
                file=sys.stderr,
            )
        else:
            info.update(loaded["saved_info"], from_cache=str(cached), seconds=time.time() - t0)
            return params, info
    texts, eos = _pretrain_texts(data.train, config)
    tok = data.tokenizer
    enc = T.encode_texts(tok, texts, lm.max_len, eos=eos)
    held_texts, _ = _pretrain_texts(data.heldout, config)
    held = T.encode_texts(tok, held_texts, lm.max_len, eos=eos)
    evals = {"step": [], "heldout_loss": []}

    def on_eval(step, params):
        lp = T.sequence_logprobs(params, lm, held)
        evals["step"].append(int(step))
        evals["heldout_loss"].append(float(-lp.sum() / held["mask"].sum()))

    res = T.pretrain(
        p0,
        lm,
        enc,
        config.pretrain,
        ckpt_dir=out / "pretrain" / "ckpt",
        resume=resume,
        resume_older=resume_older,
        on_eval=on_eval,
        progress=progress,
    )
    info.update(
        seconds=res.seconds,
        steps=res.step,
        n_windows=int(enc["tokens"].shape[0]),
        final_loss=float(np.mean(res.history["loss"][-10:])),
        eval=evals,
        resumed_from=res.resumed_from,
        from_cache=None,
    )
    write_json(out / "pretrain" / "history.json", {"history": res.history, "eval": evals})
    fig = plots.plot_pretrain(
        res.history,
        eval_steps=evals["step"],
        eval_loss=evals["heldout_loss"],
        title=f"Pretraining ({config.data.pretrain_source} of {len(data.train)} records)",
    )
    if cached is not None:
        save_lm(cached, res.params, lm, info)
    info["figure"] = fig
    return res.params, info


def _tracker(config: PipelineConfig, data: PreparedData):
    return ProbeTracker(
        config.lm_config(),
        {"train": data.track_train, "test": data.track_test},
        max_prompt_len=config.data.max_prompt_len,
        eval_batch=config.track.eval_batch,
        decode_max_new_tokens=config.track.decode_max_new_tokens,
        tokenizer=data.tokenizer,
    )


def _tracked_phase(name: str, run, tracker, out: Path, resume: bool):
    """Runs ``run(on_eval)`` with the tracker saved after every evaluation (resumable)."""
    d = out / name
    if resume:
        tracker.load(d / "probes.npz")

    def on_eval(step, params):
        tracker.evaluate(step, params)
        tracker.save(d, "probes")

    res = run(on_eval)
    tracker.finalize(res.history)
    paths = tracker.save(d, "probes")
    write_json(d / "history.json", res.history)
    return res, paths


def _phase_summary(res, tracker) -> dict:
    s = tracker.summary()
    out = {
        "seconds": res.seconds,
        "steps": res.step,
        "resumed_from": res.resumed_from,
        "final_loss": float(np.mean(res.history["loss"][-5:])) if res.history.get("loss") else None,
        "probes": {},
    }
    for st, d in s["sets"].items():
        out["probes"][st] = {
            t: {
                k: v[k]
                for k in (
                    "logp_sum_first",
                    "logp_sum_last",
                    "logp_sum_change",
                    "logp_sum_max",
                    "logp_sum_argmax_step",
                )
            }
            for t, v in d["types"].items()
        }
        out["probes"][st]["chosen_argmax_path"] = [
            d["types"]["chosen"]["argmax_path_first"],
            d["types"]["chosen"]["argmax_path_last"],
        ]
        out["probes"][st]["chosen_A_norm"] = [
            d["types"]["chosen"]["A_norm_first"],
            d["types"]["chosen"]["A_norm_last"],
        ]
        out["probes"][st]["greedy_examples"] = d["greedy_examples"][:2]
    if "squeeze/argmax_share" in res.history:
        m = SqueezeMonitor.from_history(res.history)
        out["squeeze_monitor"] = {
            "steps_measured": m["step"].tolist(),
            "steps_flagged": m["step"][m["squeezing"] > 0].tolist(),
            **{k: m[k].tolist() for k in STATS},
        }
    if "margin" in res.history:
        out["final_margin"] = float(np.mean(res.history["margin"][-5:]))
        out["final_acc"] = float(np.mean(res.history["acc"][-5:]))
    return out


def run_pipeline(
    config: PipelineConfig,
    data: PreparedData,
    out,
    *,
    upto: str = "dpo",
    resume: bool = False,
    resume_older: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    one_step: bool = False,
) -> dict:
    """pretrain → SFT → preference (``upto`` in {"pretrain", "sft", "dpo"}), tracking probes in
    SFT and the preference phase, figures in ``out/figures``; returns (and writes) the summary.

    What stays in place under ``out`` as the run goes, for ``resume``: ``config.json``, each
    phase's ``ckpt`` folder, ``probes.npz``/``probes.json`` and ``history.json`` (each file written
    atomically). The results (``summary.json``, ``figures/``, ``one_step/``) are written to a
    staging folder and moved into ``out`` only when the whole run succeeded
    (:func:`ldjax.experiments.common.staged_output`), so a failure leaves the previous ones."""
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / "config.json")
    figures: dict = {}  # path under out -> matplotlib figure, written at the end
    lm = config.lm_config()
    summary = {
        "config": config.to_dict(),
        "data": {
            "source": data.source,
            "n_train": len(data.train),
            "n_heldout": len(data.heldout),
            "n_track": [len(data.track_train), len(data.track_test)],
        },
        "timings": {},
        "figures": [],
    }
    params, info = pretrained_params(
        config,
        data,
        out,
        resume=resume,
        resume_older=resume_older,
        cache_dir=cache_dir,
        progress=progress,
    )
    if info.get("figure") is not None:
        figures["figures/lm_pretrain.png"] = info["figure"]
        info = dict(info, figure=str(out / "figures" / "lm_pretrain.png"))
    summary["pretrain"] = {k: v for k, v in info.items() if k != "eval"}
    summary["timings"]["pretrain"] = info.get("seconds")

    def monitors(kind, ref=None):
        """The squeezing monitor of a phase (``track.monitor_every``; none when 0)."""
        k = config.track.monitor_every
        if not k:
            return []
        return [
            T.squeeze_monitor(
                lm,
                kind,
                ("batch", config.track.monitor_probes)
                if config.track.monitor_on == "batch"
                else data.track_train[: config.track.monitor_probes],
                cfg=config.preference,
                ref_params=ref,
                every=k,
                threshold=config.track.monitor_threshold,
                max_prompt_len=config.data.max_prompt_len,
                tokenizer=data.tokenizer,
            )
        ]

    if upto in ("sft", "dpo"):
        tr = _tracker(config, data)
        sft_name = "sft_extend" if config.sft.extend else "sft"
        res, _ = _tracked_phase(
            sft_name,
            lambda ev: T.sft(
                params,
                lm,
                data.train,
                config.sft,
                max_prompt_len=config.data.max_prompt_len,
                tokenizer=data.tokenizer,
                ckpt_dir=out / sft_name / "ckpt",
                resume=resume,
                resume_older=resume_older,
                on_eval=ev,
                callbacks=monitors("sft"),
                progress=progress,
            ),
            tr,
            out,
            resume,
        )
        sft_params = res.params
        summary["sft"] = _phase_summary(res, tr)
        summary["probe_types"] = tr.all_types
        summary["timings"]["sft"] = res.seconds
        title = (
            f"SFT{' (extend: y⁺ and y⁻)' if config.sft.extend else ''} — log π of each probe type"
        )
        figures[f"figures/lm_{sft_name}_probes.png"] = plots.plot_probe_grid(tr, title=title)
        figures[f"figures/lm_{sft_name}_overview.png"] = plots.plot_probe_overview(tr, title=title)
        if config.track.monitor_every:
            figures[f"figures/lm_{sft_name}_squeeze.png"] = plots.plot_squeeze(
                tr,
                title=f"{title.split(' — ')[0]}: squeezing monitor",
                history=res.history,
                monitor_threshold=config.track.monitor_threshold,
            )

    if upto == "dpo":
        pc = config.preference
        name = (
            pc.loss
            + ("_onpolicy" if pc.on_policy else "")
            + ("_after_extend" if config.sft.extend else "")
        )
        tr2 = _tracker(config, data)
        res2, _ = _tracked_phase(
            name,
            lambda ev: T.preference(
                sft_params,
                sft_params,
                lm,
                data.train,
                pc,
                max_prompt_len=config.data.max_prompt_len,
                tokenizer=data.tokenizer,
                ckpt_dir=out / name / "ckpt",
                resume=resume,
                resume_older=resume_older,
                on_eval=ev,
                callbacks=monitors("pair", sft_params),
                progress=progress,
            ),
            tr2,
            out,
            resume,
        )
        summary["preference"] = dict(
            _phase_summary(res2, tr2), loss=pc.loss, on_policy=pc.on_policy
        )
        summary["timings"]["preference"] = res2.seconds
        label = (
            f"{pc.loss.upper()}{' on-policy' if pc.on_policy else ''} after "
            f"{'extended SFT (y⁺ and y⁻)' if config.sft.extend else 'SFT'}"
        )
        title = f"{label} — log π of each probe type"
        figures[f"figures/lm_{name}_probes.png"] = plots.plot_probe_grid(tr2, title=title)
        figures[f"figures/lm_{name}_overview.png"] = plots.plot_probe_overview(tr2, title=title)
        figures[f"figures/lm_{name}_squeeze.png"] = plots.plot_squeeze(
            tr2,
            title=f"{label}: squeezing",
            history=res2.history,
            monitor_threshold=config.track.monitor_threshold,
        )

    with staged_output(out) as stage:
        if one_step:
            summary["one_step"] = _one_step(config, data, params, stage, final=out)
            summary["timings"]["one_step"] = summary["one_step"]["seconds"]
        for rel, fig in figures.items():
            save_figure(fig, stage / rel)
            summary["figures"].append(str(out / rel))
        if one_step:
            summary["figures"].append(summary["one_step"]["figure"])
        summary["timings"]["total"] = time.time() - t_start
        write_json(stage / "summary.json", summary)
    return summary


def one_step(
    config,
    data: PreparedData,
    params,
    out: Path,
    index: int = 0,
    *,
    token_maps: int = 0,
    optimizer_step: bool = False,
) -> dict:
    """One exact decomposition of an SFT step on tracked training record ``index``: table, JSON
    and figure under ``out`` (:func:`ldjax.experiments.lm.one_step.run_one_step`), written through
    a staging folder (:func:`ldjax.experiments.common.staged_output`). ``token_maps`` K > 0 adds
    the token maps of the K probes the step moves most
    (:func:`ldjax.experiments.lm.token_maps.run_token_maps`) under ``token_maps/`` and
    ``figures/token_maps/``. ``optimizer_step`` adds the prediction of one REAL optimizer step of
    SFT and of DPO at the phases' learning rates, against the step
    (:func:`ldjax.experiments.lm.one_step.run_optimizer_step`), in ``one_step/optimizer_step.json``
    and ``one_step/optimizer_step.txt``."""
    with staged_output(out) as stage:
        r = _one_step(config, data, params, stage, final=Path(out), index=index)
        if optimizer_step:
            rec = data.track_train[index]
            steps = {
                phase: run_optimizer_step(params, config, data.train, rec, phase=phase)
                for phase in ("sft", "dpo")
            }
            write_json(stage / "one_step" / "optimizer_step.json", steps)
            r["optimizer_step"] = steps
            r["optimizer_table"] = format_optimizer_table(steps)
            write_text(stage / "one_step" / "optimizer_step.txt", r["optimizer_table"] + "\n")
        if token_maps:
            r["token_map_figures"] = _token_maps(
                config, data, params, stage, final=Path(out), index=index, k=token_maps
            )
        return r


def _token_maps(config, data, params, stage: Path, *, final: Path, index: int, k: int) -> list:
    """The token maps of record ``index``: arrays in ``token_maps/maps.npz``, the ranking in
    ``token_maps/ranking.json``, figures in ``figures/token_maps/``; returns the figure paths."""
    eta = min(config.track.one_step_etas)
    maps = run_token_maps(
        params, config, data.track_train[index], k, eta=eta, tokenizer=data.tokenizer
    )
    (stage / "token_maps").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        stage / "token_maps" / "maps.npz",
        **{key: np.asarray(v) for key, v in maps.items() if key != "types"},
    )
    write_json(
        stage / "token_maps" / "ranking.json",
        {
            "eta": maps["eta"],
            "types": maps["types"],
            "total_sft": maps["total"],
            "kept": [maps["types"][i] for i in maps["kept"]],
        },
    )
    paths = []
    for name, fig in token_map_figures(maps, data.tokenizer).items():
        save_figure(fig, stage / "figures" / "token_maps" / f"{name}.png")
        paths.append(str(final / "figures" / "token_maps" / f"{name}.png"))
    return paths


def _one_step(config, data, params, stage: Path, *, final: Path, index: int = 0) -> dict:
    """:func:`one_step` writing into ``stage``; the paths it returns are under ``final``."""
    t0 = time.time()
    rec = data.track_train[index]
    r = run_one_step(
        params, config, rec, config.track.one_step_etas, float64=True, tokenizer=data.tokenizer
    )
    r["seconds"] = time.time() - t0
    save_figure(plots.plot_one_step(r), stage / "figures" / "lm_one_step.png")
    r["figure"] = str(final / "figures" / "lm_one_step.png")
    r["table"] = format_table(r)
    write_json(stage / "one_step" / "one_step.json", r)
    write_text(stage / "one_step" / "table.txt", r["table"] + "\n")
    return {
        k: r[k]
        for k in (
            "etas",
            "rel_error_linear",
            "entk_abs_error",
            "slope_rel_error_linear",
            "slope_entk_abs_error",
            "small_etas",
            "slope_rel_error_linear_small",
            "slope_entk_abs_error_small",
            "sign_agreement",
            "seconds",
            "figure",
            "table",
        )
    }
