"""What the live squeezing monitor costs: one LM training step against one monitor measurement,
interleaved, and the overhead at the monitor's default ``every``.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_monitor.py [--presets default,quick]
        [--repeats 15] [--every 20] [--loop-steps 0]

For each preset's model (``ldjax.lm.config``: ``default`` = the model of ``ldjax reproduce lm``,
``quick`` = the CI model) and each phase kind — off-policy DPO (``pair``: the monitor
back-propagates the y⁻ branch) and SFT (``sft``: no negative branch) — on one batch of the
preset's size from the synthetic data set:

* ``step``: the phase's jitted training step (:mod:`ldjax.lm.train`), RMSprop, the way the
  loop calls it;
* ``monitor``: :meth:`ldjax.training.monitor.SqueezeMonitor.measure` as the loop hook calls it
  (probes: y⁺ of 4 pairs of the batch; the whole step's Δθ from the actual update).

The two run alternately, ``--repeats`` times each after a warm-up (compilation), the order
swapping every round, so load from other processes hits both alike. The table gives the least
and the median wall time of each; the overhead at ``every = k`` is ``t_monitor / (k · t_step)``
(the monitor measures one step in k; its first-step measurement adds one more per run).
``--loop-steps N`` also times whole ``ldjax.lm.train.preference`` runs of N steps with and without
the monitor, alternately (3 each; the quick preset only): the end-to-end ratio.

Prints one JSON line per case and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

import ldjax  # noqa: F401  (the XLA flag before any computation)
from ldjax.data.synthetic import generate_preferences
from ldjax.lm import train as T
from ldjax.lm.config import PRESETS
from ldjax.lm.model import init_params
from ldjax.lm.tokenizer import ByteTokenizer


def _case(preset: str, kind: str):
    cfg = PRESETS[preset]
    lm = cfg.lm_config()
    params = jax.jit(init_params, static_argnums=0)(lm, jax.random.PRNGKey(0))
    recs = generate_preferences(64)
    tok, mp = ByteTokenizer(), cfg.data.max_prompt_len
    if kind == "pair":
        pc = cfg.preference.replace(warmup=0)
        pos, neg = T.pair_examples(tok, recs, max_len=lm.max_len, max_prompt_len=mp)
        b = pc.batch_size
        batch = {f"pos_{k}": pos[k][:b] for k in ("tokens", "targets", "mask")}
        batch.update({f"neg_{k}": neg[k][:b] for k in ("tokens", "targets", "mask")})
        batch["ref_pos"] = T.sequence_logprobs(params, lm, {k: pos[k][:b] for k in pos})
        batch["ref_neg"] = T.sequence_logprobs(params, lm, {k: neg[k][:b] for k in neg})
        batch["ref_pos"] = batch["ref_pos"].astype(np.float32)
        batch["ref_neg"] = batch["ref_neg"].astype(np.float32)
        fn = T._pair_step(
            lm, T._opt_key(pc), pc.loss, tuple(sorted(T._pair_kwargs(pc).items())), 100
        )
        step = lambda p, o, c: fn(p, o, batch, c, None)
    else:
        pc = cfg.sft.replace(warmup=0)
        data = T.sft_examples(tok, recs, max_len=lm.max_len, max_prompt_len=mp)
        batch = {k: v[: pc.batch_size] for k, v in data.items()}
        fn = T._lm_step(lm, T._opt_key(pc), 100)
        step = lambda p, o, c: fn(p, o, batch, c)
    opt_state = T.make_optimizer(pc, 100).init(params)
    mon = T.squeeze_monitor(lm, kind, ("batch", 4), cfg=cfg.preference)
    return cfg, lm, params, opt_state, batch, step, mon, pc


def bench(preset: str, kind: str, repeats: int, every: int) -> dict:
    cfg, lm, params, opt_state, batch, step, mon, pc = _case(preset, kind)
    count = np.int32(3)
    after, _, metrics = jax.block_until_ready(step(params, opt_state, count))
    lr = float(metrics["lr"])

    def run_step():
        jax.block_until_ready(step(params, opt_state, count))

    def run_monitor():
        mon.measure(params, batch, lr, after)  # returns host floats: synchronous

    for _ in range(2):  # compile and warm up
        run_step()
        run_monitor()
    times = {"step": [], "monitor": []}
    for r in range(repeats):
        order = (("step", run_step), ("monitor", run_monitor))
        for name, f in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    ts, tm = min(times["step"]), min(times["monitor"])
    out = {
        "preset": preset,
        "kind": kind,
        "batch": pc.batch_size,
        "max_len": lm.max_len,
        "V": lm.vocab_size,
        "step min (s)": ts,
        "step median (s)": float(np.median(times["step"])),
        "monitor min (s)": tm,
        "monitor median (s)": float(np.median(times["monitor"])),
        "monitor / step": tm / ts,
        "every": every,
        "overhead % (min)": 100 * tm / (every * ts),
        "overhead % (median)": 100
        * float(np.median(times["monitor"]))
        / (every * float(np.median(times["step"]))),
    }
    return out


def bench_loop(steps: int) -> dict:
    """Whole preference runs (quick preset) with and without the monitor, alternately."""
    cfg = PRESETS["quick"]
    lm = cfg.lm_config()
    params = jax.jit(init_params, static_argnums=0)(lm, jax.random.PRNGKey(0))
    recs = generate_preferences(64)
    pc = cfg.preference.replace(steps=steps, eval_every=10**6, ckpt_every=10**6, warmup=0)
    mp = cfg.data.max_prompt_len

    def run(with_monitor):
        cb = [T.squeeze_monitor(lm, "pair", ("batch", 4), cfg=pc)] if with_monitor else []
        t = time.perf_counter()
        T.preference(params, params, lm, recs, pc, max_prompt_len=mp, callbacks=cb, progress=False)
        return time.perf_counter() - t

    run(False), run(True)  # compile
    ts = {False: [], True: []}
    for r in range(3):
        for w in (False, True) if r % 2 == 0 else (True, False):
            ts[w].append(run(w))
    return {
        "preset": "quick",
        "kind": f"pair, whole run of {steps} steps",
        "without (s) min": min(ts[False]),
        "with (s) min": min(ts[True]),
        "overhead % (min)": 100 * (min(ts[True]) / min(ts[False]) - 1),
        "overhead % (median)": 100 * (np.median(ts[True]) / np.median(ts[False]) - 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="default,quick")
    ap.add_argument("--kinds", default="pair,sft")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--loop-steps", type=int, default=0)
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    for p in a.presets.split(","):
        for k in a.kinds.split(","):
            r = bench(p, k, a.repeats, a.every)
            print(json.dumps(r), flush=True)
            rows.append(r)
    loop = bench_loop(a.loop_steps) if a.loop_steps else None
    if loop:
        print(json.dumps(loop), flush=True)
    print(
        f"\n# load average before/after: {load0:.2f} / {os.getloadavg()[0]:.2f}; "
        f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.default_backend()}\n"
    )
    print(
        "| preset | kind | batch × len, V | step (s) min / median | monitor (s) min / median "
        f"| monitor / step | overhead at every={a.every} (min / median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['kind']} | {r['batch']} × {r['max_len']}, {r['V']} | "
            f"{r['step min (s)']:.4g} / {r['step median (s)']:.4g} | "
            f"{r['monitor min (s)']:.4g} / {r['monitor median (s)']:.4g} | "
            f"{r['monitor / step']:.2f} | {r['overhead % (min)']:.1f} % / "
            f"{r['overhead % (median)']:.1f} % |"
        )
    if loop:
        print(
            f"\nwhole quick DPO run ({a.loop_steps} steps, every={a.every}): "
            f"{loop['without (s) min']:.2f} s without, {loop['with (s) min']:.2f} s with the "
            f"monitor (least of 3): {loop['overhead % (min)']:+.1f} % "
            f"(medians {loop['overhead % (median)']:+.1f} %)"
        )


if __name__ == "__main__":
    main()
