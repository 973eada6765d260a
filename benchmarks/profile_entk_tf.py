"""Where the transformer's structured K spends its time (the ``tf_last`` case of bench_entk.py).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_entk_tf.py [--repeats 2]

Splits the one XLA program of ``ldjax.entk(..., implementation="structured")`` on the benchmark
transformer (8 sequences, T 64, last-token K (8, 8, 256, 256)) into its parts and times each as
its own program, interleaved with the float32 GEMM of bench_entk.py (the machine's peak under the
same load):

* ``entk``: the whole call (host work included); ``program``: its one XLA program;
* ``features``: the per-example backward passes giving the site cotangents, the site
  activations and the fallback Jacobian rows (LayerNorm scales/biases, the position embedding);
* ``contraction``: K from those features (the symmetric K(x, x), the head mapping);
* per site: that site's contraction alone for the full (non-symmetric) block, with its order
  (``gram`` / ``jac``), ``(S, C, F)`` and XLA's FLOP count; ``rows``: the fallback rows' products.

Prints one JSON line per part: min / median seconds, XLA GFLOP, GFLOP/s and % of the GEMM peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_entk as B  # noqa: E402

import ldjax  # noqa: E402
from ldjax._src import entk as E  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"# machine: {B.machine()}; load {B.load_avg()}", flush=True)
    case = B.make_case("tf_last")
    f, p, x, mask = case["f"], case["p"], case["x_o"], case["mask"]
    call = lambda: ldjax.entk(f, p, x, x, implementation="structured", mask_o=mask, mask_u=mask)
    with B.Capture() as cap:
        jax.block_until_ready(call())
    fn, a = cap.calls[0]
    (apply_fn, structured, reduction, head, demote, orders, batches, _, variables, w) = a[:10]
    xo, po, vo = a[11:14]
    prob = E._Problem(apply_fn, variables, xo, xo, reduction, np.asarray(po), np.asarray(po), 256)
    dims = [d for k, d in enumerate(prob.dims) if k != head]
    feats = jax.jit(
        lambda xo, po, vo: E._features(
            apply_fn, structured, reduction, head, demote, variables, xo, po, vo
        )
    )
    fo = feats(xo, po, vo)
    contract = jax.jit(lambda w, fo: E._contract_symmetric(reduction, orders, batches, w, fo))

    def site(k, fo):
        J, D, X, H = fo
        if k == "rows":
            g = (J, [], [], H)
            return E._contract("full", (), (), g, g)
        g = ([], [D[k]], [X[k]], H)
        return E._contract("full", (orders[k],), (batches[k],), g, g)

    parts = [
        ("entk", None, lambda: call(), None),
        ("program", fn, lambda: fn(*a), a),
        ("features", feats, lambda: feats(xo, po, vo), (xo, po, vo)),
        ("contraction", contract, lambda: contract(w, fo), (w, fo)),
    ]
    for k in ["rows"] + list(range(len(fo[1]))):
        g = jax.jit(functools.partial(site, k))
        parts.append((f"site {k}", g, functools.partial(g, fo), (fo,)))
    limits = B.Limits()
    for name, prog, run, args_ in parts:
        jax.block_until_ready(run())
        ts, _, gs, _ = B.timed(run, args.repeats, limits, warmup=False)
        flops = B.xla_cost(prog, args_)[0] if prog is not None else None
        t = float(np.median(ts))
        row = dict(part=name, seconds_min=min(ts), seconds=t, peak_gflops=float(np.median(gs)))
        if isinstance(name, str) and name.startswith("site ") and name != "site rows":
            k = int(name.split()[1])
            row.update(order=orders[k], S_C_F=dims[k])
        if flops:
            row.update(gflop=flops / 1e9, gflops=flops / t / 1e9)
            row["pct_peak"] = 100 * row["gflops"] / row["peak_gflops"]
        row["load"] = B.load_avg()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
