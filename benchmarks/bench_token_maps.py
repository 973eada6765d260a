"""Token-map benchmark: ``ldjax.token_influence`` beside the per-token-K route, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_token_maps.py [--lengths 64,256]
        [--pairs 1,4] [--repeats 3] [--json FILE]

Model: the benchmark transformer of ``bench_entk.py`` (2 layers, d 128, 4 heads, V 256), float32,
with ``max_len`` = the longest T. Loss: SFT on every position of x_u. For every T and N
(N_o = N_u = N) it times, after a warm-up (compilation excluded, median of ``--repeats``):

* ``token_influence``: readout rows of the probe tokens and per-position gradients, one matrix
  product; cost ``N_o T_o + N_u T_u`` backward passes and ``N_o T_o N_u T_u P`` multiply-adds,
  memory ``(N_o T_o + N_u T_u) P`` floats (column ``rows GB``);
* ``per-token K``: ``ldjax.entk`` (auto) of the full ``(N_o, N_u, T, T, V, V)`` blocks, then
  ``C = −η [A_m K_{m,l} G_l]_{y_m}`` by einsum; its K alone needs ``N² T² V² × 4`` bytes (column
  ``K GB``) and is skipped above ``--max-k-gb``.

Where both run, the maps are compared (relative Frobenius error). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ldjax
from ldjax import losses, zoo

V, D, H, L = 256, 128, 4, 2


def timeit(fn, repeats):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def per_token_k_route(f, p, x_o, x_u, y_o, y_u, eta):
    """C from the full per-token K: −η Σ_b A[m, y, :] K[m, l, :, b] G[l, b], read at y_o[m]."""
    K = ldjax.entk(f, p, x_o, x_u)  # (No, Nu, T, T, V, V)
    return _read_maps(f, p, K, x_o, x_u, y_o, y_u, eta)


@functools.partial(jax.jit, static_argnums=0)
def _read_maps(f, p, K, x_o, x_u, y_o, y_u, eta):
    z_o, z_u = f(p, x_o), f(p, x_u)
    G = ldjax.G(losses.sft, z_u, targets=y_u)  # (Nu, T, V)
    kg = jnp.einsum("oumlab,ulb->oumla", K, G)  # (No, Nu, T, T, V)
    pi = jax.nn.softmax(z_o, axis=-1)  # A_m v = v − 1 (π_m · v): read at y_m
    read = jnp.take_along_axis(kg, y_o[:, None, :, None, None], axis=-1)[..., 0]
    return -eta * (read - jnp.einsum("omv,oumlv->ouml", pi, kg))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="64,256")
    ap.add_argument("--pairs", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-k-gb", type=float, default=4.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lengths = [int(t) for t in args.lengths.split(",")]
    pairs = [int(n) for n in args.pairs.split(",")]
    p = zoo.transformer_init(
        jax.random.PRNGKey(0), vocab=V, d_model=D, n_heads=H, n_layers=L, max_len=max(lengths)
    )
    f = functools.partial(zoo.transformer_apply, n_heads=H)
    n_par = sum(a.size for a in jax.tree_util.tree_leaves(p))
    rng = np.random.default_rng(0)
    rows = []
    print(
        json.dumps(
            dict(
                machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(),
                jax=jax.__version__,
                backend=jax.default_backend(),
                params=n_par,
            )
        ),
        flush=True,
    )
    for t in lengths:
        for n in pairs:
            x = jnp.asarray(rng.integers(0, V, (2 * n, t + 1)), jnp.int32)
            x_o, y_o, x_u, y_u = x[:n, :-1], x[:n, 1:], x[n:, :-1], x[n:, 1:]
            sec, C = timeit(
                lambda x_o=x_o, x_u=x_u, y_o=y_o, y_u=y_u: ldjax.token_influence(
                    f,
                    p,
                    x_o,
                    x_u,
                    losses.sft,
                    eta=1e-3,
                    targets_o=y_o,
                    loss_kwargs=dict(targets=y_u),
                ),
                args.repeats,
            )
            k_gb = (n * t * V) ** 2 * 4 / 1e9
            row = dict(
                T=t,
                N=n,
                token_influence_s=sec,
                rows_gb=2 * n * t * n_par * 4 / 1e9,
                k_gb=k_gb,
                maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            )
            if k_gb <= args.max_k_gb:
                sec_k, C_k = timeit(
                    lambda x_o=x_o, x_u=x_u, y_o=y_o, y_u=y_u: per_token_k_route(
                        f, p, x_o, x_u, y_o, y_u, 1e-3
                    ),
                    1,
                )
                a, b = np.asarray(C, np.float64), np.asarray(C_k, np.float64)
                row.update(
                    per_token_k_s=sec_k,
                    speedup=sec_k / sec,
                    rel_error=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nbenchmark transformer (P = {n_par:,}), SFT on every position, float32\n")
    print(
        "| T | N_o = N_u | token_influence (s) | rows GB | per-token K route (s) | K GB "
        "| speed-up | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = (
            f"{r['per_token_k_s']:.2f} | {r['k_gb']:.2f} | {r['speedup']:.1f}× | "
            f"{r['rel_error']:.1e}"
            if "per_token_k_s" in r
            else f"not run (K needs {r['k_gb']:.1f} GB) | {r['k_gb']:.1f} | – | –"
        )
        print(f"| {r['T']} | {r['N']} | {r['token_influence_s']:.2f} | {r['rows_gb']:.2f} | {k} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
