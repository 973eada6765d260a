"""Projected eNTK benchmark: error against its bound, stored-feature reuse, speed, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_projected.py [--parts error,reuse,speed]
        [--seeds 100] [--json FILE] [--figure FILE]

Parts (float32 unless said):

* ``error``: the relative Frobenius error ‖K̂ − K‖/‖K‖ of ``ldjax.entk_projected`` against exact K
  for k = 2⁶ … 2¹⁴ over ``--seeds`` sketches, beside the sketch's own 95 % bound
  (:meth:`ldjax.ProjectedK.relative_error_bound`), and the fraction of seeds where the bound
  holds, and the fraction of entries inside their 95 % normal interval K̂ ± 1.96 SE. Models:
  the MLP 784-512-512-10 (full K of 8 inputs, (8, 8, 10, 10)), LeNet (the same),
  the benchmark transformer (2 layers, d 128, V 256, T 64; last-token pNTK ``sum_logits`` of 8
  sequences, (8, 8), and Hutchinson ``trace`` of 4, (4, 4), for k = 2⁶ … 2⁸ only: it costs k
  backward passes per position). One k = 2¹⁴ sketch per seed, its first k
  coordinates are the k sketch (nested), so the k columns of one seed are correlated, the seeds
  independent. ``--figure`` plots it.
* ``reuse``: 100 new probes against 8,000 training inputs (MLP, full K, k = 1024): training
  features stored once (zarr) and read back, against recomputed; equal K̂ and both times.
* ``speed``: (a) projected (k = 1024, 4096) against exact ``structured`` on the transformer's
  last-token K (8, 8, 256, 256), and the k at which the projected estimate would reach 1 %
  relative error (extrapolated along 1/√k from the measured error); (b) the projection of
  per-example gradients (pNTK rows of 64 sequences) by ``ldjax.projected_features`` beside a
  TRAK-style dense Gaussian projection of the flattened gradients in JAX.

Times are medians of 3 after a warm-up (compilation excluded). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import ldjax
from ldjax import zoo

KS = [2**e for e in range(6, 15)]


def timeit(fn, repeats=3):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def transformer(n, t=64):
    p = zoo.transformer_init(
        jax.random.PRNGKey(0), vocab=256, d_model=128, n_heads=4, n_layers=2, max_len=t
    )
    f = functools.partial(zoo.transformer_apply, n_heads=4)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, t)), jnp.int32)
    return f, p, x, ldjax.last_position_mask(np.ones((n, t), bool))


def models():
    rng = np.random.default_rng(0)
    mlp = zoo.mlp_init(jax.random.PRNGKey(0), (784, 512, 512, 10))
    lenet = zoo.lenet_init(jax.random.PRNGKey(0))
    f_t, p_t, x_t, m_t = transformer(8)
    f_h, p_h, x_h, m_h = transformer(4)
    return [
        ("MLP", zoo.mlp_apply, mlp, jnp.asarray(rng.uniform(size=(8, 784)), jnp.float32), None,
         "full"),
        ("LeNet", zoo.lenet_apply, lenet,
         jnp.asarray(rng.uniform(size=(8, 28, 28, 1)), jnp.float32), None, "full"),
        ("transformer pNTK", f_t, p_t, x_t, m_t, "sum_logits"),
        ("transformer trace (Hutchinson)", f_h, p_h, x_h, m_h, "trace"),
    ]  # fmt: skip


def part_error(seeds):
    rows = []
    for name, f, p, x, m, red in models():
        K = np.asarray(ldjax.entk(f, p, x, reduction=red, mask_o=m), np.float64)
        hut = dict(hutchinson=True) if red == "trace" else {}
        # Hutchinson costs k backward passes per position: k <= 2⁸ on 4 sequences
        ks = KS[:3] if hut else KS
        errs, bounds = np.zeros((seeds, len(ks))), np.zeros((seeds, len(ks)))
        cover = np.zeros((seeds, len(ks)))
        t0 = time.perf_counter()
        for s in range(seeds):
            feats = ldjax.projected_features(
                f, p, x, dim=ks[-1], key=jax.random.key(s), reduction=red, mask=m, **hut
            )
            for j, k in enumerate(ks):
                est = ldjax.projected_kernel(feats._replace(phi=feats.phi[..., :k]))
                d = np.asarray(est.K, np.float64) - K
                errs[s, j] = np.linalg.norm(d) / np.linalg.norm(K)
                bounds[s, j] = est.relative_error_bound(0.95)
                cover[s, j] = np.mean(np.abs(d) <= 1.96 * np.asarray(est.stderr, np.float64))
        row = dict(
            model=name,
            reduction=red,
            shape=list(K.shape),
            ks=ks,
            median_error=np.median(errs, 0).tolist(),
            median_bound=np.median(bounds, 0).tolist(),
            held=np.mean(errs <= bounds, 0).tolist(),
            entry_coverage=np.mean(cover, 0).tolist(),
            seeds=seeds,
            seconds=time.perf_counter() - t0,
            errors=errs.tolist(),
            bounds=bounds.tolist(),
        )
        slope, icpt = np.polyfit(np.log(ks), np.log(row["median_error"]), 1)
        row.update(slope=float(slope), k_for_1pct=float(np.exp((np.log(0.01) - icpt) / slope)))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("errors", "bounds")}),
              flush=True)  # fmt: skip
    return rows


def error_figure(rows):
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), sharey=False)
    for ax, r in zip(np.atleast_1d(axes), rows):
        e, b = np.asarray(r["errors"]), np.asarray(r["bounds"])
        ks = np.asarray(r["ks"])
        ax.fill_between(ks, *np.percentile(e, [5, 95], 0), color="C0", alpha=0.25)
        ax.plot(ks, np.median(e, 0), "o-", color="C0", label="actual error (median, 5–95 %)")
        ax.fill_between(ks, *np.percentile(b, [5, 95], 0), color="C3", alpha=0.15)
        ax.plot(ks, np.median(b, 0), "s--", color="C3", label="95 % bound from the sketch")
        ax.plot(ks, np.median(e, 0)[0] * np.sqrt(ks[0] / ks), ":", color="gray", label="∝ 1/√k")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        held = 100 * np.asarray(r["held"])
        span = (
            f"{held.min():.0f} %"
            if held.min() == held.max()
            else (f"{held.min():.0f}–{held.max():.0f} %")
        )
        ax.set_title(
            f"{r['model']}\nbound held in {span} of {r['seeds']} seeds at every k", fontsize=9
        )
        ax.set_xlabel("k (sketch dimension)")
    np.atleast_1d(axes)[0].set_ylabel("‖K̂ − K‖_F / ‖K‖_F")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def part_reuse():
    rng = np.random.default_rng(1)
    p = zoo.mlp_init(jax.random.PRNGKey(0), (784, 512, 512, 10))
    f = zoo.mlp_apply
    x_train = jnp.asarray(rng.uniform(size=(8000, 784)), jnp.float32)
    x_probe = jnp.asarray(rng.uniform(size=(100, 784)), jnp.float32)
    key = jax.random.key(0)
    kw = dict(dim=1024, key=key)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        ldjax.projected_features(f, p, x_train, out=os.path.join(d, "train"), **kw)
        store_s = time.perf_counter() - t0

        def stored():
            fu = ldjax.load_projected_features(os.path.join(d, "train"))
            fo = ldjax.projected_features(f, p, x_probe, **kw)
            return ldjax.projected_kernel(fo, fu).K

        def recomputed():
            fu = ldjax.projected_features(f, p, x_train, **kw)
            fo = ldjax.projected_features(f, p, x_probe, **kw)
            return ldjax.projected_kernel(fo, fu).K

        t_s, k_s = timeit(stored)
        t_r, k_r = timeit(recomputed)
        size = sum(os.path.getsize(os.path.join(a, b)) for a, _, fs in os.walk(d) for b in fs)
    a, b = np.asarray(k_s, np.float64), np.asarray(k_r, np.float64)
    row = dict(
        n_train=8000,
        n_probe=100,
        dim=1024,
        store_once_s=store_s,
        stored_query_s=t_s,
        recomputed_query_s=t_r,
        speedup=t_r / t_s,
        max_abs_diff=float(np.abs(a - b).max()),
        equal=bool(np.array_equal(a, b)),
        store_mb=size / 1e6,
    )
    print(json.dumps(row), flush=True)
    return row


def part_speed():
    out = {}
    f, p, x, m = transformer(8)
    t_ex, K = timeit(lambda: ldjax.entk(f, p, x, implementation="structured", mask_o=m))
    K = np.asarray(K, np.float64)
    rows = [dict(method="exact structured", seconds=t_ex, rel_error=0.0)]
    for k in (1024, 4096):
        t, est = timeit(
            lambda k=k: ldjax.entk_projected(f, p, x, dim=k, key=jax.random.key(0), mask_o=m).K
        )
        err = float(np.linalg.norm(np.asarray(est, np.float64) - K) / np.linalg.norm(K))
        rows.append(dict(method=f"projected k={k}", seconds=t, rel_error=err))
    # 1 % along 1/√k from the k = 4096 error
    out["k_for_1pct_full"] = 4096 * (rows[-1]["rel_error"] / 0.01) ** 2
    out["last_token_full"] = rows
    print(json.dumps(out), flush=True)

    # (b) projecting per-example gradients: 64 sequences' pNTK rows ∇θ Σ_i z_i(last)
    f, p, x, m = transformer(64)
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    last = jnp.asarray(np.argmax(m, axis=1))

    @jax.jit
    def grads(flat):
        def one(x1, t1):
            return jax.grad(lambda w: jnp.sum(f(unravel(w), x1[None])[0, t1]))(flat)

        return jax.vmap(one)(x, last)

    @functools.partial(jax.jit, static_argnums=1)
    def trak(flat, k):
        g = grads(flat)  # (N, P): flattened per-example gradients
        blocks = []
        for j in range(-(-k // 256)):  # a dense Gaussian (P, 256) block at a time
            w = jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (g.shape[1], 256))
            blocks.append(g @ w)
        return jnp.concatenate(blocks, axis=1)[:, :k]

    speed = []
    for k in (1024, 4096):
        t_ours, _ = timeit(
            lambda k=k: (
                ldjax.projected_features(
                    f, p, x, dim=k, key=jax.random.key(0), reduction="sum_logits", mask=m
                ).phi
            )
        )
        t_trak, _ = timeit(lambda k=k: trak(flat, k))
        speed.append(dict(k=k, ldjax_s=t_ours, trak_dense_s=t_trak, speedup=t_trak / t_ours))
        print(json.dumps(speed[-1]), flush=True)
    out["gradient_projection"] = speed
    out["params"] = int(flat.size)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="error,reuse,speed")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None, help="write the error-vs-bound figure (PNG)")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    res = dict(jax=jax.__version__, backend=jax.default_backend(), cpus=os.cpu_count())
    print(json.dumps(res), flush=True)
    if "error" in parts:
        res["error"] = part_error(args.seeds)
        print(
            "\n| model | K | k | median rel. error | median 95 % bound | bound held | entries "
            "in K̂ ± 1.96 SE |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in res["error"]:
            for j, k in enumerate(r["ks"]):
                print(
                    f"| {r['model']} | {tuple(r['shape'])} | {k} | {r['median_error'][j]:.3g} | "
                    f"{r['median_bound'][j]:.3g} | {100 * r['held'][j]:.0f} % | "
                    f"{100 * r['entry_coverage'][j]:.1f} % |"
                )
        print("\n| model | slope of log error vs log k | k for 1 % (extrapolated) |")
        print("|---|---|---|")
        for r in res["error"]:
            print(f"| {r['model']} | {r['slope']:.3f} | {r['k_for_1pct']:.3g} |")
        if args.figure:
            from ldjax.experiments.common import save_figure  # noqa: PLC0415

            save_figure(error_figure(res["error"]), args.figure)
            print(f"figure: {args.figure}")
    if "reuse" in parts:
        r = res["reuse"] = part_reuse()
        print("\n| 100 probes × 8,000 training inputs (MLP, k = 1024) | seconds |")
        print("|---|---|")
        print(f"| store the training features once | {r['store_once_s']:.2f} |")
        print(f"| query with stored features | {r['stored_query_s']:.2f} |")
        print(f"| query recomputing them | {r['recomputed_query_s']:.2f} |")
        print(f"| speed-up; K̂ equal | {r['speedup']:.1f}×; {r['equal']} (max |Δ| "
              f"{r['max_abs_diff']:.1e}) |")  # fmt: skip
    if "speed" in parts:
        s = res["speed"] = part_speed()
        print("\n| transformer last-token K (8, 8, 256, 256) | seconds | rel. error |")
        print("|---|---|---|")
        for r in s["last_token_full"]:
            print(f"| {r['method']} | {r['seconds']:.2f} | {r['rel_error']:.3g} |")
        print(f"\nk for 1 % (along 1/√k): {s['k_for_1pct_full']:.3g}")
        print(f"\n| projecting 64 gradients (P = {s['params']:,}) | k | ldjax (s) | TRAK-style "
              "dense (s) | speed-up |")  # fmt: skip
        print("|---|---|---|---|---|")
        for r in s["gradient_projection"]:
            print(f"| pNTK rows | {r['k']} | {r['ldjax_s']:.2f} | {r['trak_dense_s']:.2f} | "
                  f"{r['speedup']:.1f}× |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
