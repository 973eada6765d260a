"""Memory and FLOPs of the one-step decomposition on a real LLM's architecture, beside one optax
step of the same model (issue 15, "memory at real scale").

    PYTHONPATH=. .venv/bin/python benchmarks/bench_llm_memory.py \\
        [--analyse pythia-410m:512,pythia-160m:512,pythia-70m:512] \\
        [--measure pythia-14m:128,pythia-70m:64] [--probes 13] [--out FILE]

The question: after one DPO step on one preference pair (x, y⁺, y⁻), how does log π(y | x) move
for every probe response y of that prompt (the paper's 13 types)? Programs, all jitted, batch 1
per sequence, every sequence ``T`` tokens (prompt + response), Pythia's V = 50,304:

* ``step``: one optax step, ``optax.adam`` on the DPO loss of the pair (forward + backward on
  (x, y⁺) and (x, y⁻), the Adam update; params and state donated, as in training).
* ``decomp``: the one-step decomposition of every probe's sequence log-probability, the
  algorithm of ``ldjax.influence(..., method="jvp", targets_o=, mask_o=)``: the DPO gradient
  per branch (one VJP each), then ``Δlog π(y_o|x) = −η ⟨∇θ log π(y_o|x), g_b⟩`` for each probe
  and branch (y⁺ and y⁻ terms apart) by one JVP of the probe's readout — all 13 probes at once
  (``vmap``), as ldjax.influence does.
* ``decomp_chunked``: the same, the probes one at a time (``lax.map``): chunking over probes.
* ``decomp_grad``: the same numbers by reverse mode, the probes one at a time: the gradient
  ``∇θ log π(y_o|x)`` of each probe (one backward pass) read along g⁺ and g⁻ (two dot products),
  never kept (the ``"gram"`` algorithm of ``ldjax.influence``, streamed over the probes).
* ``step_probes``: what the decomposition replaces when measured for real: the probes' log π
  before the step, the step (SGD), and after (13 forward passes twice).

``--analyse``: nothing is allocated; parameters are ``jax.ShapeDtypeStruct`` from
``ldjax.llm.abstract_gpt_neox`` (penzai's GPT-NeoX, Pythia shapes, layers unrolled), each
program is lowered and compiled for the CPU and XLA reports its peak memory
(``memory_analysis``: arguments + outputs + temporaries − aliased) and FLOPs (``cost_analysis``).
``--measure``: the programs run on the CPU, random init, each in a fresh subprocess: median
wall time of ``--timed`` runs (default 2) after a warm-up, and the process's peak RSS
(``ru_maxrss``). The ``decomp`` numbers of the three ``decomp*`` programs (forward mode
batched, forward mode chunked, reverse mode) are compared with each other;
``tests/test_llm_adapter.py`` checks the algorithm against ``ldjax.decompose`` through the same
adapter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldjax  # noqa: F401  (sets the XLA flags before any computation)
import ldjax.llm as llm
from ldjax import losses

PROGRAMS = ("step", "decomp", "decomp_chunked", "decomp_grad", "step_probes")
ETA = 1e-5


def readout(f, theta, x1, y1, m1):
    """log π(y|x) of one sequence: Σ_t m_t log softmax(z_t)[y_t]."""
    lp = jax.nn.log_softmax(f(theta, x1[None])[0], axis=-1)
    return jnp.sum(jnp.take_along_axis(lp, y1[:, None], axis=-1)[:, 0] * m1)


def dpo_total(f, theta, pair, ref):
    (xp, yp, mp), (xn, yn, mn) = pair
    kw = dict(targets_pos=yp, targets_neg=yn, mask_pos=mp, mask_neg=mn)
    return jnp.sum(
        losses.dpo(f(theta, xp), f(theta, xn), ref_logp_pos=ref[0:1], ref_logp_neg=ref[1:2], **kw)
    )


def branch_grads(f, theta, pair, ref):
    """The DPO gradient per branch, g_b = J_bᵀ G_b (two VJPs; their sum is the step's)."""
    (xp, yp, mp), (xn, yn, mn) = pair
    zp, vp = jax.vjp(lambda th: f(th, xp), theta)
    zn, vn = jax.vjp(lambda th: f(th, xn), theta)
    kw = dict(targets_pos=yp, targets_neg=yn, mask_pos=mp, mask_neg=mn)
    gp, gn = jax.grad(
        lambda a, b: jnp.sum(losses.dpo(a, b, ref_logp_pos=ref[0:1], ref_logp_neg=ref[1:2], **kw)),
        argnums=(0, 1),
    )(zp, zn)
    return vp(gp)[0], vn(gn)[0]


def make_programs(f, tx, unroll=False):
    """The programs; ``unroll``: the per-probe loops as Python loops instead of ``lax.map``
    (XLA's cost analysis counts a while loop's body once: the unrolled programs give the FLOPs)."""

    def lmap(fn, xs):
        if not unroll:
            return jax.lax.map(fn, xs)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        return jnp.stack([fn(jax.tree_util.tree_map(lambda a, i=i: a[i], xs)) for i in range(n)])

    def step(theta, state, pair, ref):
        g = jax.grad(lambda th: dpo_total(f, th, pair, ref))(theta)
        upd, state = tx.update(g, state, theta)
        return optax.apply_updates(theta, upd), state

    def along(theta, dirs, x1, y1, m1):
        # (B,) the readout's change along each direction (vmapped tangents, one primal pass)
        lin = jax.linearize(lambda th: readout(f, th, x1, y1, m1), theta)[1]
        return jax.vmap(lin)(dirs)

    def decomp(theta, pair, ref, probes):
        gp, gn = branch_grads(f, theta, pair, ref)
        dirs = jax.tree_util.tree_map(lambda a, b: -ETA * jnp.stack([a, b]), gp, gn)
        return jax.vmap(lambda x1, y1, m1: along(theta, dirs, x1, y1, m1))(*probes)  # (K, 2)

    def decomp_chunked(theta, pair, ref, probes):
        gp, gn = branch_grads(f, theta, pair, ref)
        dirs = jax.tree_util.tree_map(lambda a, b: -ETA * jnp.stack([a, b]), gp, gn)
        return lmap(lambda o: along(theta, dirs, *o), probes)  # (K, 2)

    def decomp_grad(theta, pair, ref, probes):
        gp, gn = branch_grads(f, theta, pair, ref)
        leaves = jax.tree_util.tree_leaves

        def one(o):  # ∇θ log π(y_o|x) of one probe (one backward pass), read along g⁺ and g⁻
            r = jax.grad(lambda th: readout(f, th, *o))(theta)
            dot = lambda g: sum(jnp.vdot(a, b) for a, b in zip(leaves(r), leaves(g)))
            return -ETA * jnp.stack([dot(gp), dot(gn)])

        return lmap(one, probes)  # (K, 2)

    def step_probes(theta, pair, ref, probes):
        def logps(th):
            return lmap(lambda o: readout(f, th, *o), probes)

        before = logps(theta)
        g = jax.grad(lambda th: dpo_total(f, th, pair, ref))(theta)
        new = jax.tree_util.tree_map(lambda a, b: a - ETA * b, theta, g)
        return logps(new) - before

    return dict(
        step=jax.jit(step, donate_argnums=(0, 1)),
        decomp=jax.jit(decomp),
        decomp_chunked=jax.jit(decomp_chunked),
        decomp_grad=jax.jit(decomp_grad),
        step_probes=jax.jit(step_probes),
    )


def inputs(t, k, v, concrete=False, seed=0):
    """pair ((x, y, m) × 2, each (1, T)), ref (2,), probes (x, y, m) each (K, T): the prompt is
    the first half, the response the second."""
    m = np.zeros((t,), bool)
    m[t // 2 - 1 : t - 1] = True
    if not concrete:
        s = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32)
        b = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.bool_)
        one = (s(1, t), s(1, t), b(1, t))
        return (one, one), jax.ShapeDtypeStruct((2,), jnp.float32), (s(k, t), s(k, t), b(k, t))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, v, (k + 2, t)).astype(np.int32)
    x[:, : t // 2] = x[0, : t // 2]  # one prompt
    y = np.roll(x, -1, axis=1)
    mm = np.broadcast_to(m, (k + 2, t)).copy()
    row = lambda i: (
        jnp.asarray(x[i : i + 1]),
        jnp.asarray(y[i : i + 1]),
        jnp.asarray(mm[i : i + 1]),
    )
    pair = (row(0), row(1))
    probes = (jnp.asarray(x[2:]), jnp.asarray(y[2:]), jnp.asarray(mm[2:]))
    return pair, jnp.asarray([-3.0 * t / 2, -3.1 * t / 2], jnp.float32), probes


def _args(name, theta, state, pair, ref, probes):
    return (theta, state, pair, ref) if name == "step" else (theta, pair, ref, probes)


def analyse(arch: str, t: int, k: int, programs=PROGRAMS, unroll=False) -> dict:
    cfg = llm.gpt_neox_config(arch)
    f, shapes = llm.abstract_gpt_neox(cfg)
    tx = optax.adam(1e-5)
    state = jax.eval_shape(tx.init, shapes)
    pair, ref, probes = inputs(t, k, cfg.vocab_size)
    progs = make_programs(f, tx, unroll)
    out = {
        "arch": arch,
        "T": t,
        "K": k,
        "n_params": int(sum(np.prod(s.shape) for s in shapes.values())),
    }
    for name in programs:
        t0 = time.perf_counter()
        c = progs[name].lower(*_args(name, shapes, state, pair, ref, probes)).compile()
        m = c.memory_analysis()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        peak = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        out[name + ("@unrolled" if unroll else "")] = {
            "peak_bytes": int(peak),
            "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "flops": float(cost.get("flops", float("nan"))),
            "compile_s": time.perf_counter() - t0,
        }
        print(
            f"  analysed {arch} T={t} {name}: {peak / 2**30:.2f} GiB, "
            f"{cost.get('flops', float('nan')):.3g} FLOP",
            file=sys.stderr,
            flush=True,
        )
    return out


def measure_one(arch: str, t: int, k: int, name: str, check: bool, timed: int = 2) -> dict:
    """Run in a subprocess: one program, warm-up + ``timed`` timed runs, peak RSS."""
    cfg = llm.gpt_neox_config(arch)
    f, theta = llm.from_penzai(llm.build_gpt_neox(cfg))
    tx = optax.adam(1e-5)
    state = tx.init(theta)
    pair, ref, probes = inputs(t, k, cfg.vocab_size, concrete=True)
    prog = make_programs(f, tx)[name]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    ts = []
    out = None
    for _ in range(1 + timed):
        args = _args(name, copy(theta) if name == "step" else theta, copy(state), pair, ref, probes)
        t0 = time.perf_counter()
        out = jax.block_until_ready(prog(*args))
        ts.append(time.perf_counter() - t0)
    res = {
        "time_s": float(np.median(ts[1:])),
        "times_s": ts[1:],
        "first_s": ts[0],
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": rss0,
    }
    if name.startswith("decomp"):
        res["values"] = np.asarray(out, np.float64).tolist()  # (K, 2): y⁺ and y⁻ terms
    return res


def measure(arch: str, t: int, k: int, check: bool, programs=PROGRAMS, timed: int = 2) -> dict:
    out = {"arch": arch, "T": t, "K": k, "timed": timed}
    for name in programs:
        cmd = [sys.executable, __file__, "--_one", f"{arch}:{t}:{k}:{name}:{int(check)}:{timed}"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if r.returncode:
            raise SystemExit(f"{name} at {arch} T={t} failed:\n{r.stderr[-3000:]}")
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(
            f"  measured {arch} T={t} {name}: {out[name]['time_s']:.2f} s, "
            f"RSS {out[name]['rss_bytes'] / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    return out


def _merge(paths):
    """The runs of several --json files, merged per (model, T): later files add programs."""
    out = {"analysed": {}, "measured": {}}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        for kind in out:
            for r in d[kind]:
                out[kind].setdefault((r["arch"], r["T"]), {}).update(r)
    return list(out["analysed"].values()), list(out["measured"].values())


def _loop_flops(a: dict) -> dict:
    """Total FLOPs of every program, the while-loop ones completed (see the table's note)."""
    k = a["K"]
    f = {n: a[n]["flops"] for n in PROGRAMS if n in a}
    out = {n: f[n] for n in ("step", "decomp") if n in f}
    if "decomp" in f and "decomp_chunked" in f and k > 1:
        jvp = (f["decomp"] - f["decomp_chunked"]) / (k - 1)
        grad = f["decomp_chunked"] - jvp
        out["decomp_chunked"] = grad + k * jvp
        if "decomp_grad" in f:
            out["decomp_grad"] = grad + k * (f["decomp_grad"] - grad)
    if "step" in f and "step_probes" in f:
        out["step_probes"] = f["step"] + k * (f["step_probes"] - f["step"])
    return out


def _gib(b):
    return f"{b / 2**30:.2f}"


def tables(analysed, measured, k) -> str:
    lines = [
        f"# bench_llm_memory — one DPO step's Δlog π of {k} probe responses vs one optax step",
        f"# {datetime.date.today()} · {platform.platform()} · jax {jax.__version__} · "
        f"{os.cpu_count()} CPUs (shared) · float32 · η = {ETA}",
        "",
    ]
    if analysed:
        lines += [
            "## From shapes (XLA compiled analysis for the CPU; nothing allocated)",
            "",
            "| model | params | T | program | peak memory GiB | × step | GFLOP | × step "
            "| × step_probes |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for a in analysed:
            full = _loop_flops(a)
            fl = lambda n, a=a, full=full: a.get(n + "@unrolled", {}).get("flops", full.get(n))
            for name in [n for n in PROGRAMS if n in a]:
                r = dict(a[name], flops=fl(name))
                s = dict(a["step"], flops=fl("step"))
                sp = dict(a["step_probes"], flops=fl("step_probes"))
                lines.append(
                    f"| {a['arch']} | {a['n_params'] / 1e6:.0f}M | {a['T']} | {name} | "
                    f"{_gib(r['peak_bytes'])} | "
                    f"{r['peak_bytes'] / s['peak_bytes']:.2f} | {r['flops'] / 1e9:.0f} | "
                    f"{r['flops'] / s['flops']:.2f} | {r['flops'] / sp['flops']:.2f} |"
                )
        lines += [
            "",
            "Peak memory = arguments + outputs + temporaries − aliased (donated) buffers. XLA's "
            "cost analysis counts a while loop's body once, so the FLOPs of the programs with a "
            "per-probe `lax.map` come from their unrolled twins (`--unroll`) when analysed, else "
            "are completed from the loop-free programs (`_loop_flops`): per-probe JVP = "
            "(decomp − decomp_chunked)/(K−1), the pair's gradient = decomp_chunked − one JVP, "
            "decomp_grad = gradient + K × (its reported − gradient), step_probes = step + 2K × "
            "(its reported − step)/2.",
        ]
        lines.append("")
    if measured:
        runs = sorted({m.get("timed", 2) for m in measured})
        lines += [
            "## Measured on the CPU (random init; median of "
            f"{'/'.join(map(str, runs))} timed run(s) after a warm-up; "
            "peak RSS of a fresh process)",
            "",
            "| model | T | program | time s | × step | peak RSS GiB | × step "
            "| RSS − params-only GiB |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for m in measured:
            s = m["step"]
            for name in [n for n in PROGRAMS if n in m]:
                r = m[name]
                lines.append(
                    f"| {m['arch']} | {m['T']} | {name} | {r['time_s']:.2f} | "
                    f"{r['time_s'] / s['time_s']:.2f} | "
                    f"{_gib(r['rss_bytes'])} | {r['rss_bytes'] / s['rss_bytes']:.2f} | "
                    f"{_gib(r['rss_bytes'] - r['rss_before_bytes'])} |"
                )
            vals = {n: np.asarray(m[n]["values"]) for n in PROGRAMS if "values" in m.get(n, {})}
            if "decomp" in vals:
                for n, v in vals.items():
                    d = np.abs(v - vals["decomp"]).max() / np.abs(vals["decomp"]).max()
                    lines.append(f"| | | {n} vs decomp: max rel. diff {d:.1e} | | | | | |")
        lines.append("")
    return "\n".join(lines)


def _spec(s, default_k):
    parts = s.split(":")
    return parts[0], int(parts[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--analyse", default="pythia-410m:512,pythia-160m:512,pythia-70m:512")
    ap.add_argument("--measure", default="pythia-14m:128,pythia-70m:64")
    ap.add_argument("--probes", type=int, default=13)
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--unroll", action="store_true", help="--analyse the unrolled loops (FLOPs)")
    ap.add_argument("--tables-from", default=None, help="print the tables of these --json files")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--timed", type=int, default=2, help="--measure: timed runs after the warm-up (median)"
    )
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.timed < 1:
        ap.error(f"--timed must be >= 1, got {a.timed}")
    if a._one:
        arch, t, k, name, check, timed = a._one.split(":")
        res = measure_one(arch, int(t), int(k), name, bool(int(check)), int(timed))
        print(json.dumps(res))
        return
    progs = tuple(a.programs.split(","))
    if a.tables_from:
        analysed, measured = _merge(a.tables_from.split(","))
        text = tables(analysed, measured, a.probes)
        print(text)
        if a.out:
            with open(a.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return
    analysed = [
        analyse(*_spec(s, a.probes), a.probes, progs, a.unroll) for s in a.analyse.split(",") if s
    ]
    measured = [
        measure(*_spec(s, a.probes), a.probes, check=(i == 0), programs=progs, timed=a.timed)
        for i, s in enumerate(a.measure.split(","))
        if s
    ]
    text = tables(analysed, measured, a.probes)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"analysed": analysed, "measured": measured}, fh, indent=1)


if __name__ == "__main__":
    main()
