"""eNTK benchmark: every ldjax implementation beside neural-tangents' three, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_entk.py
        [--cases mlp64,mlp256,tf_last,tf_token,vp] [--repeats 3] [--peer .peer/bin/python]
        [--no-peer]

Cases (float32):
  mlp64 / mlp256  MLP 784-512-512-10, x_o = x_u, N = 64 / 256: K (N, N, 10, 10)
  tf_last         transformer 2 layers, d 128, 4 heads, V 256, T 64, last-token K (8, 8, 256, 256)
  tf_token        the same transformer, per-token K (1, 1, 64, 64, 256, 256) of one pair (1 GB)
  vp              K·G by ``ldjax.entk_vp`` against one optax SGD step + re-evaluation of x_o

neural-tangents runs in its own venv (``.peer``, recipe in tests/golden/README.md) through
``benchmarks/peer_entk.py`` on the same params and inputs (exchanged by ``.npz``); its K is
compared with ldjax's (relative Frobenius error). Times are medians of ``--repeats`` runs after a
warm-up (compilation excluded). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldjax
from ldjax import losses, zoo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def timeit(fn, repeats, warmup=True):
    """Median seconds of ``repeats`` calls after a warm-up call (without one, compilation
    counts)."""
    if warmup:
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_case(name):
    rng = np.random.default_rng(0)
    if name.startswith("mlp"):
        n = int(name[3:])
        p = zoo.mlp_init(jax.random.PRNGKey(0), (784, 512, 512, 10))
        x = jnp.asarray(rng.uniform(size=(n, 784)), jnp.float32)
        return dict(model="mlp", f=zoo.mlp_apply, p=p, x_o=x, x_u=x, mask=None, n_heads=4)
    p = zoo.transformer_init(
        jax.random.PRNGKey(0), vocab=256, d_model=128, n_heads=4, n_layers=2, max_len=64
    )
    f = functools.partial(zoo.transformer_apply, n_heads=4)
    if name == "tf_last":
        x = jnp.asarray(rng.integers(0, 256, (8, 64)), jnp.int32)
        mask = ldjax.last_position_mask(np.ones((8, 64), bool))
        return dict(model="transformer", f=f, p=p, x_o=x, x_u=x, mask=mask, n_heads=4, last=True)
    x = jnp.asarray(rng.integers(0, 256, (2, 64)), jnp.int32)
    return dict(model="transformer", f=f, p=p, x_o=x[:1], x_u=x[1:], mask=None, n_heads=4)


def run_peer(case, peer, repeats, timeout):
    with tempfile.TemporaryDirectory() as d:
        npz, kout = os.path.join(d, "case.npz"), os.path.join(d, "K.npz")
        zoo.save_npz(
            npz,
            jax.tree_util.tree_map(np.asarray, case["p"]),
            x_o=np.asarray(case["x_o"]),
            x_u=np.asarray(case["x_u"]),
            n_heads=np.asarray(case["n_heads"]),
        )
        cmd = [
            peer,
            os.path.join(HERE, "peer_entk.py"),
            "--npz",
            npz,
            "--model",
            case["model"],
            "--implementation",
            "all",
            "--repeats",
            str(repeats),
            "--save-k",
            kout,
            "--timeout-s",
            str(timeout),
        ]
        if case.get("last"):
            cmd.append("--last-token")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * timeout + 120)
        rows = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
        ks = dict(np.load(kout)) if os.path.exists(kout) else {}
        return rows, ks


def bench_entk_case(name, args):
    case = make_case(name)
    f, p = case["f"], case["p"]
    kw = dict(mask_o=case["mask"], mask_u=case["mask"])
    rows, ref = [], None
    # the jacobian contraction and vp are orders of magnitude slower than structured at these sizes
    # (their FLOP counts are in `ldjax.entk_cost`); they run on the smallest case only
    # per-token K: vp is ~7x cheaper than structured by the FLOP model, so "auto" runs it
    impls = (
        ["structured", "jacobian", "vp"]
        if name == "mlp64"
        else []
        if name == "tf_token"
        else ["structured"]
    )
    print(
        json.dumps(
            dict(case=name, estimated_flops=ldjax.entk_cost(f, p, case["x_o"], case["x_u"], **kw))
        ),
        flush=True,
    )
    for impl in impls + ["auto"]:
        slow = impl in ("jacobian", "vp") or not name.startswith("mlp")
        t, K = timeit(
            lambda impl=impl: ldjax.entk(f, p, case["x_o"], case["x_u"], implementation=impl, **kw),
            1 if slow else args.repeats,
            warmup=not (name == "tf_token"),
        )
        if case.get("last"):
            K = K[:, :, 0, 0]
        ref = K if ref is None else ref
        rows.append(
            dict(
                impl=f"ldjax {impl}",
                seconds=t,
                shape=list(K.shape),
                err=rel(K, ref),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_peer and name != "tf_token":
        peer_rows, ks = run_peer(
            case, args.peer, args.repeats if name.startswith("mlp") else 1, args.timeout
        )
        for r in peer_rows:
            k = ks.get(f"K_{r['impl']}")
            rows.append(
                dict(
                    impl=f"nt {r['impl']}",
                    seconds=r.get("seconds_median"),
                    error=r.get("error"),
                    err=None if k is None else rel(k, ref),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    elif name == "tf_token":
        rows.append(
            dict(
                impl="nt (all three)",
                seconds=None,
                error="not run: 60 GB of Jacobians for one pair (issue #2 measured it fails)",
            )
        )
    return rows


def _bench_vp_case(name, repeats):
    """One case of :func:`bench_vp`: timings of entk_vp and of one optax step plus eval."""
    case = make_case(name)
    f, p = case["f"], case["p"]
    x_o, x_u = case["x_o"], case["x_u"]
    logits = f(p, x_u)
    targets = jnp.argmax(logits, -1) if logits.ndim == 2 else jnp.roll(x_u, -1, 1)
    kwargs = dict(targets=targets)
    g = ldjax.G(losses.sft, logits, **kwargs)
    t_vp, _ = timeit(lambda: ldjax.entk_vp(f, p, x_o, x_u, g), repeats)
    opt = optax.sgd(1e-3)

    @jax.jit
    def step_and_eval(p):
        loss = lambda q: jnp.sum(losses.sft(f(q, x_u), **kwargs))
        grads = jax.grad(loss)(p)
        upd, _ = opt.update(grads, opt.init(p), p)
        return f(optax.apply_updates(p, upd), x_o)

    t_step, _ = timeit(lambda: step_and_eval(p), repeats)
    return dict(case=name, entk_vp=t_vp, optax_step_and_eval=t_step, ratio=t_vp / t_step)


def bench_vp(args):
    """K·G via entk_vp against an actual optax step plus re-evaluation of x_o."""
    out = []
    for name in ["mlp256", "tf_last"]:
        out.append(_bench_vp_case(name, args.repeats))
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mlp64,mlp256,tf_last,vp,tf_token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", default=os.path.join(ROOT, ".peer", "bin", "python"))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    args = ap.parse_args(argv)
    if not args.no_peer and not os.path.exists(args.peer):
        sys.exit(
            f"peer venv not found at {args.peer}: see tests/golden/README.md, or pass --no-peer"
        )
    print(
        f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )
    results = {}
    for name in args.cases.split(","):
        results[name] = bench_vp(args) if name == "vp" else bench_entk_case(name, args)
    print("\n| case | implementation | seconds | rel. error vs ldjax structured |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        if name == "vp":
            continue
        for r in rows:
            sec = "—" if r.get("seconds") is None else f"{r['seconds']:.4g}"
            err = r.get("error") or ("—" if r.get("err") is None else f"{r['err']:.1e}")
            print(f"| {name} | {r['impl']} | {sec} | {err} |")
    if "vp" in results:
        print("\n| case | entk_vp K·G (s) | optax SGD step + re-eval (s) | ratio |")
        print("|---|---|---|---|")
        for r in results["vp"]:
            print(
                f"| {r['case']} | {r['entk_vp']:.4g} | {r['optax_step_and_eval']:.4g} "
                f"| {r['ratio']:.2f} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
