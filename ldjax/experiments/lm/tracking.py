"""Probe tracking: how log π of many responses moves while the model trains (paper §4, Figs 3–5).

A :class:`ProbeTracker` holds, for each prompt set (e.g. ``"train"``: prompts the model is trained
on; ``"test"``: held-out prompts) and each probe type (every response field of the probe records
— the paper's 13 types of :data:`ldjax.data.probes.PROBE_TYPES` when present — plus ``"greedy"``,
the model's own greedy response y*), the teacher-forcing arrays of ``(prompt, response)``. At each
:meth:`ProbeTracker.evaluate` it records, per set, type and prompt (arrays ``(E, K, N)``: E
evaluations, K types, N prompts):

* ``logp_sum``   log π(y|x) = Σ_m log π(y_m | x, y_<m) over the response tokens (EOS included);
* ``logp_mean``  the same divided by the number of response tokens;
* ``A_norm``     mean over response positions of the peakiness ‖A_m‖_F = √(V − 2 + V‖π_m‖²)
  (:func:`ldjax.A_norm`); ``A_norm_sq`` the sum Σ_m ‖A_m‖²_F (used by LBK);
* ``argmax_path`` Σ_m log max_v π_m(v): the **teacher-forced argmax path** along the response —
  at each position of the given response, the log-probability of the single most likely next
  token. This is the paper's code metric "log π(y*)" (not free decoding); the paper reports it on
  the chosen response (we record it for every type and plot it for ``chosen``; the paper's code
  before May 2025 used the last probe type by a bug);
* ``except_argmax`` Σ_m log(1 − max_v π_m): the mass left off the argmax, per position;
* on type ``greedy``: log π(y*|x) of the response y* decoded **once** at :meth:`start` (greedy,
  KV cache, :func:`ldjax.lm.decode.generate` at temperature 0) from the model at the start of the
  phase and then tracked like any probe (its ``argmax_path`` equals its ``logp_sum`` at the start).

:meth:`ProbeTracker.finalize` adds the proxies between consecutive evaluations e−1 → e (steps
s_{e−1} < s_e, k = s_e − s_{e−1} updates):

* ``delta``  Δ_o = log π_e(y_o) − log π_{e−1}(y_o); ``sign_delta`` (the paper's SignDelta) is its
  mean over prompts, per type;
* ``lbk``    LBK_o = (Δ_o / k)² / (‖A_o‖² · ‖G‖²), with ‖A_o‖² = Σ_m ‖A_m‖²_F of probe o at
  evaluation e−1 and ‖G‖² the mean over the k training steps t ∈ (s_{e−1}, s_e] of ‖G_t‖²_F,
  G_t = ∂L_batch/∂z the residual of that step's training batch objective with respect to all of
  the batch's logits (``history["G_norm_sq"]`` of :mod:`ldjax.lm.train`). By Proposition 1 a
  single SGD step has ‖Δ log π‖ ≤ η ‖A‖ ‖K‖ ‖G‖, so LBK ≲ η²‖K‖² (a lower bound on the eNTK's
  size); the per-step Δ/k makes intervals of different lengths comparable.

Evaluation is one jitted forward over fixed-shape chunks of ``eval_batch`` sequences (all sets and
types concatenated), so probing 14 types × 2 × 32 prompts costs a few forward passes.
Results: :meth:`save` writes ``<name>.npz`` (arrays with the step axis first) and
``<name>.json`` (types, steps, per-type summaries, a few decoded y*).
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import A_norm, losses
from ldjax.data.preferences import encode_field, encode_prompt
from ldjax.data.probes import PAPER_SYMBOLS, PROBE_TYPES
from ldjax.experiments.common import atomic_path, write_text
from ldjax.lm.decode import generate
from ldjax.lm.model import make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer
from ldjax.lm.train import encode_ids

__all__ = [
    "ProbeTracker",
    "SavedTracking",
    "probe_stats",
    "common_probe_types",
    "lbk",
    "GREEDY",
    "METRICS",
]

GREEDY = "greedy"
"""Name of the tracked greedy-decoding response y*."""

METRICS = ("logp_sum", "logp_mean", "A_norm", "A_norm_sq", "argmax_path", "except_argmax")
"""Per-evaluation metrics recorded for every set, type and prompt."""


def probe_stats(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    """The per-sequence metrics of the module docstring for logits ``(N, T, V)``, targets ``(N, T)``
    and a response mask ``(N, T)``; every value ``(N,)``.

    ``except_argmax`` uses log(1 − max π) = logsumexp(z without its max) − logsumexp(z), exact
    even when max π rounds to 1.
    """
    m = mask.astype(logits.dtype)
    logp = jax.nn.log_softmax(logits, axis=-1)
    lp_sum = losses.sequence_logprob(logits, targets, mask)
    n_tok = jnp.maximum(jnp.sum(m, -1), 1.0)
    a = A_norm(logits)  # (N, T)
    top = jnp.max(logp, axis=-1)
    is_top = jnp.arange(logits.shape[-1]) == jnp.argmax(logits, axis=-1)[..., None]
    rest = jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, logits), axis=-1) - jax.nn.logsumexp(
        logits, axis=-1
    )
    return {
        "logp_sum": lp_sum,
        "logp_mean": lp_sum / n_tok,
        "A_norm": jnp.sum(a * m, -1) / n_tok,
        "A_norm_sq": jnp.sum(a * a * m, -1),
        "argmax_path": jnp.sum(top * m, -1),
        "except_argmax": jnp.sum(rest * m, -1),
    }


@functools.lru_cache(maxsize=16)
def _stats_fn(lm_config):
    apply_fn = make_apply_fn(lm_config)
    return jax.jit(lambda params, t, y, m: probe_stats(apply_fn(params, t), y, m))


def common_probe_types(records_by_set: dict) -> list[str]:
    """The response fields of :data:`PROBE_TYPES` that are strings in every record of every set
    (in the file's order); at least ``chosen`` is required."""
    recs = [r for rs in records_by_set.values() for r in rs]
    if not recs:
        raise ValueError("no probe records")
    types = [t for t in PROBE_TYPES if all(isinstance(r.get(t), str) for r in recs)]
    if "chosen" not in types:
        raise ValueError("every probe record needs a string 'chosen' field")
    return types


def lbk(delta: np.ndarray, a_norm_sq: np.ndarray, g_norm_sq: float, k: int = 1) -> np.ndarray:
    """LBK = (Δ/k)² / (‖A_o‖² ‖G‖²), elementwise over probes (module docstring)."""
    return (np.asarray(delta) / k) ** 2 / (np.asarray(a_norm_sq) * g_norm_sq)


class ProbeTracker:
    """Records probe metrics of one training phase (module docstring).

    Args:
      lm_config: the model's :class:`~ldjax.lm.model.LMConfig`.
      sets: ``{"train": records, "test": records}`` — probe records (``prompt`` + response fields).
      types: probe types to track (default :func:`common_probe_types`); ``"greedy"`` is added.
      max_prompt_len: prompt tokens kept (its end).
      eval_batch: sequences per jitted call.
      decode_max_new_tokens: length cap of y* (default: what the context leaves after the
        longest prompt).
      greedy: decode and track y* (``"greedy"``).
    """

    def __init__(
        self,
        lm_config,
        sets: dict,
        *,
        types: Sequence[str] | None = None,
        max_prompt_len: int = 128,
        eval_batch: int = 64,
        decode_max_new_tokens: int | None = None,
        greedy: bool = True,
        tokenizer=None,
    ):
        if not sets:
            raise ValueError("ProbeTracker needs at least one prompt set")
        self.lm_config = lm_config
        self.tokenizer = tokenizer or ByteTokenizer()
        self.sets = {k: list(v) for k, v in sets.items()}
        for name, recs in self.sets.items():
            if not recs:
                raise ValueError(f"prompt set {name!r} is empty")
        self.types = list(types) if types is not None else common_probe_types(self.sets)
        for t in self.types:
            for name, recs in self.sets.items():
                bad = [i for i, r in enumerate(recs) if not isinstance(r.get(t), str)]
                if bad:
                    raise ValueError(
                        f"probe type {t!r} is missing in set {name!r}, records {bad[:5]}"
                    )
        self.max_prompt_len = int(max_prompt_len)
        self.eval_batch = int(eval_batch)
        self.greedy = bool(greedy)
        self.prompt_ids = {
            k: [
                encode_prompt(self.tokenizer, r["prompt"], max_prompt_len=max_prompt_len) for r in v
            ]
            for k, v in self.sets.items()
        }
        longest = max(len(p) for ps in self.prompt_ids.values() for p in ps)
        room = lm_config.max_len - longest
        if room < 1:
            raise ValueError(
                f"prompts of {longest} tokens leave no room in max_len={lm_config.max_len}"
            )
        self.decode_max_new_tokens = min(decode_max_new_tokens or room, room)
        kw = dict(max_len=lm_config.max_len, max_prompt_len=max_prompt_len)
        self.batches = {
            s: {t: encode_field(self.tokenizer, recs, t, **kw) for t in self.types}
            for s, recs in self.sets.items()
        }
        self.greedy_ids: dict | None = None  # set -> list of token lists (y*, EOS kept)
        self.steps: list[int] = []
        self.values: dict = {s: {m: [] for m in METRICS} for s in self.sets}
        self.derived: dict = {}

    # -- types ------------------------------------------------------------------------------
    @property
    def all_types(self) -> list[str]:
        """Tracked types in array order (the probe types, then ``"greedy"`` if tracked)."""
        return self.types + ([GREEDY] if self.greedy else [])

    @staticmethod
    def label(t: str) -> str:
        """Legend label: field name and the paper's symbol."""
        if t == GREEDY:
            return "greedy y* (decoded)"
        sym = PAPER_SYMBOLS.get(t)
        return f"{t} ({sym})" if sym and sym != t else t

    # -- y* ---------------------------------------------------------------------------------
    def start(self, params) -> None:
        """Decode y* (greedy, KV cache) for every prompt from ``params``, once per phase. Does
        nothing if y* is already known (e.g. loaded for a resumed run)."""
        if not self.greedy or self.greedy_ids is not None:
            return
        out = {}
        for s, prompts in self.prompt_ids.items():
            ys = []
            for i in range(0, len(prompts), self.eval_batch):
                ys += generate(
                    params,
                    self.lm_config,
                    prompts[i : i + self.eval_batch],
                    self.decode_max_new_tokens,
                    temperature=0.0,
                    eos_id=self.tokenizer.eos_id,
                    pad_id=self.tokenizer.pad_id,
                    include_eos=True,
                )
            out[s] = ys
        self.greedy_ids = out

    def _greedy_batch(self, s):
        return encode_ids(
            self.prompt_ids[s], self.greedy_ids[s], self.lm_config.max_len, self.tokenizer.pad_id
        )

    def greedy_texts(self, s: str) -> list[str]:
        """The decoded y* of set ``s`` as text."""
        if self.greedy_ids is None:
            return []
        return [self.tokenizer.decode(y) for y in self.greedy_ids[s]]

    # -- evaluation ---------------------------------------------------------------------------
    def _arrays(self):
        blocks, index = [], []
        for s in self.sets:
            per = [self.batches[s][t] for t in self.types]
            if self.greedy:
                if self.greedy_ids is None:
                    raise ValueError("call start(params) before evaluate() to decode y*")
                per.append(self._greedy_batch(s))
            for k, b in enumerate(per):
                blocks.append(b)
                index.append((s, k, b["tokens"].shape[0]))
        cat = {f: np.concatenate([b[f] for b in blocks]) for f in ("tokens", "targets", "mask")}
        return cat, index

    def compute(self, params) -> dict:
        """Metrics at ``params`` without recording them: ``{set: {metric: (K, N)}}``."""
        cat, index = self._arrays()
        f = _stats_fn(self.lm_config)
        n, b = cat["tokens"].shape[0], self.eval_batch
        pad = (-n) % b
        if pad:
            cat = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in cat.items()}
        outs = [
            jax.device_get(
                f(
                    params,
                    cat["tokens"][i : i + b],
                    cat["targets"][i : i + b],
                    cat["mask"][i : i + b],
                )
            )
            for i in range(0, n + pad, b)
        ]
        flat = {m: np.concatenate([o[m] for o in outs])[:n].astype(np.float64) for m in METRICS}
        res = {s: {m: [] for m in METRICS} for s in self.sets}
        pos = 0
        for s, _, cnt in index:
            for m in METRICS:
                res[s][m].append(flat[m][pos : pos + cnt])
            pos += cnt
        return {s: {m: np.stack(v) for m, v in d.items()} for s, d in res.items()}

    def evaluate(self, step: int, params) -> None:
        """Record the metrics at ``step`` (an ``on_eval`` hook). Earlier records at
        steps >= ``step`` (from an interrupted run being resumed) are dropped first."""
        step = int(step)
        if self.greedy and self.greedy_ids is None:
            self.start(params)
        keep = [i for i, s in enumerate(self.steps) if s < step]
        if len(keep) < len(self.steps):
            self.steps = [self.steps[i] for i in keep]
            for s in self.values:
                for m in METRICS:
                    self.values[s][m] = [self.values[s][m][i] for i in keep]
        res = self.compute(params)
        self.steps.append(step)
        for s in self.sets:
            for m in METRICS:
                self.values[s][m].append(res[s][m])
        self.derived = {}

    __call__ = evaluate

    def arrays(self, s: str, metric: str) -> np.ndarray:
        """``(E, K, N)`` array of ``metric`` (or a derived one after :meth:`finalize`) on set
        ``s``."""
        if metric in self.derived.get(s, {}):
            return self.derived[s][metric]
        if not self.steps:
            raise ValueError("nothing recorded yet")
        return np.stack(self.values[s][metric])

    def curve(self, s: str, t: str, metric: str = "logp_sum") -> np.ndarray:
        """``(E,)`` mean over prompts of ``metric`` for type ``t`` on set ``s``."""
        return np.nanmean(self.arrays(s, metric)[:, self.all_types.index(t)], axis=-1)

    # -- proxies -------------------------------------------------------------------------------
    def finalize(self, history: dict | None = None) -> None:
        """Compute ``delta``, ``sign_delta`` and (with the phase's ``history`` holding ``step`` and
        ``G_norm_sq``) ``lbk`` between consecutive evaluations (module docstring). ``(E, K, N)``
        arrays with NaN at the first evaluation; ``sign_delta`` is ``(E, K)``."""
        steps = np.asarray(self.steps)
        g = None
        if history is not None and "G_norm_sq" in history:
            hs, hg = np.asarray(history["step"]), np.asarray(history["G_norm_sq"], np.float64)
            g = np.full(len(steps), np.nan)
            for e in range(1, len(steps)):
                sel = (hs > steps[e - 1]) & (hs <= steps[e])
                if sel.any():
                    g[e] = hg[sel].mean()
        for s in self.sets:
            lp = self.arrays(s, "logp_sum")
            a2 = self.arrays(s, "A_norm_sq")
            delta = np.full_like(lp, np.nan)
            delta[1:] = lp[1:] - lp[:-1]
            sign = np.full(lp.shape[:2], np.nan)
            sign[1:] = delta[1:].mean(axis=-1)
            out = {"delta": delta, "sign_delta": sign}
            if g is not None:
                val = np.full_like(lp, np.nan)
                for e in range(1, len(steps)):
                    k = max(int(steps[e] - steps[e - 1]), 1)
                    val[e] = lbk(delta[e], a2[e - 1], g[e], k)
                out["lbk"] = val
            self.derived[s] = out

    # -- persistence ---------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able per-set, per-type summary: mean log π (and per-token mean), ‖A‖, argmax path
        at the first and last evaluation, its min/max and where it peaked."""
        out = {
            "steps": list(map(int, self.steps)),
            "types": self.all_types,
            "labels": {t: self.label(t) for t in self.all_types},
            "sets": {},
        }
        for s in self.sets:
            per = {}
            for k, t in enumerate(self.all_types):
                c = self.curve(s, t)
                d = {
                    "logp_sum_first": float(c[0]),
                    "logp_sum_last": float(c[-1]),
                    "logp_sum_change": float(c[-1] - c[0]),
                    "logp_sum_max": float(c.max()),
                    "logp_sum_argmax_step": int(self.steps[int(np.argmax(c))]),
                    "logp_sum_min": float(c.min()),
                    "logp_mean_first": float(self.curve(s, t, "logp_mean")[0]),
                    "logp_mean_last": float(self.curve(s, t, "logp_mean")[-1]),
                }
                for m in ("A_norm", "argmax_path", "except_argmax"):
                    cm = self.curve(s, t, m)
                    d[f"{m}_first"], d[f"{m}_last"] = float(cm[0]), float(cm[-1])
                if s in self.derived and "lbk" in self.derived[s] and len(self.steps) > 1:
                    d["lbk_mean"] = float(np.nanmean(self.derived[s]["lbk"][1:, k]))
                    d["sign_delta_mean"] = float(np.nanmean(self.derived[s]["sign_delta"][1:, k]))
                per[t] = d
            out["sets"][s] = {
                "n_prompts": len(self.sets[s]),
                "types": per,
                "greedy_examples": self.greedy_texts(s)[:3],
            }
        return out

    def save(self, directory, name: str) -> dict:
        """Write ``<name>.npz`` and ``<name>.json`` into ``directory``, each atomically (a kill
        leaves the previous file or the new one); returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"steps": np.asarray(self.steps, np.int64)}
        for s in self.sets:
            if self.steps:
                for m in METRICS:
                    arrays[f"{s}/{m}"] = np.stack(self.values[s][m])
            for m, v in self.derived.get(s, {}).items():
                arrays[f"{s}/{m}"] = v
            if self.greedy_ids is not None:
                ids = self.greedy_ids[s]
                mat = np.full((len(ids), max(1, max(len(y) for y in ids))), -1, np.int32)
                for i, y in enumerate(ids):
                    mat[i, : len(y)] = y
                arrays[f"{s}/greedy_ids"] = mat
        npz = d / f"{name}.npz"
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:  # a handle: no ".npz" appended
            np.savez_compressed(f, **arrays)
        js = d / f"{name}.json"
        summ = self.summary() if self.steps else {"steps": [], "types": self.all_types}
        write_text(js, json.dumps(summ, indent=2) + "\n")
        return {"npz": str(npz), "json": str(js)}

    def load(self, path) -> bool:
        """Restore steps, metrics and y* from a :meth:`save` npz (for a resumed run). Returns
        False if ``path`` does not exist."""
        if not os.path.exists(path):
            return False
        try:
            z = dict(np.load(path))
            self.steps = [int(s) for s in z["steps"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(
                f"{path}: the probe tracking of an interrupted run cannot be read "
                f"({type(e).__name__}: {e})"
            ) from e
        for s in self.sets:
            for m in METRICS:
                key = f"{s}/{m}"
                self.values[s][m] = list(z[key]) if key in z and self.steps else []
            key = f"{s}/greedy_ids"
            if self.greedy and key in z:
                self.greedy_ids = self.greedy_ids or {}
                self.greedy_ids[s] = [[int(v) for v in row if v >= 0] for row in z[key]]
        if self.greedy_ids is not None and set(self.greedy_ids) != set(self.sets):
            self.greedy_ids = None
        self.derived = {}
        return True


class SavedTracking:
    """A read-only view of what :meth:`ProbeTracker.save` wrote, with the same plotting interface
    (``steps``, ``sets``, ``all_types``, ``label``, ``arrays``, ``curve``)."""

    label = staticmethod(ProbeTracker.label)

    def __init__(self, npz_path):
        npz_path = Path(npz_path)
        if not npz_path.exists():
            raise FileNotFoundError(f"tracking file not found: {npz_path}")
        js = npz_path.with_suffix(".json")
        if not js.exists():
            raise FileNotFoundError(f"tracking summary not found next to {npz_path}: {js}")
        self.meta = json.loads(js.read_text(encoding="utf-8"))
        z = np.load(npz_path)
        self._z = {k: z[k] for k in z.files}
        self.steps = [int(s) for s in self._z["steps"]]
        self.all_types = list(self.meta["types"])
        self.sets = {k.split("/")[0]: None for k in self._z if "/" in k}

    def arrays(self, s: str, metric: str) -> np.ndarray:
        key = f"{s}/{metric}"
        if key not in self._z:
            raise KeyError(f"no {metric!r} for set {s!r} in the tracking file")
        return self._z[key]

    def curve(self, s: str, t: str, metric: str = "logp_sum") -> np.ndarray:
        return np.nanmean(self.arrays(s, metric)[:, self.all_types.index(t)], axis=-1)
