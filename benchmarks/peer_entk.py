"""Peer side of the eNTK benchmark: time neural-tangents' ``empirical_ntk_fn`` on a zoo model.

Run with the PEER venv (jax 0.4.25 + neural-tangents 0.6.5 + numpy<2; recipe in
``tests/golden/README.md``), on an ``.npz`` written by the main venv with ``ldjax.zoo.save_npz``
(``params/...`` plus ``x_o`` and ``x_u``; optional ``n_heads`` for the transformer)::

    .peer/bin/python benchmarks/peer_entk.py --npz bench.npz --model mlp \\
        --implementation all --repeats 5 [--last-token] [--save-k K.npz] [--timeout-s 600]

For each requested implementation (1 JACOBIAN_CONTRACTION, 2 NTK_VECTOR_PRODUCTS,
3 STRUCTURED_DERIVATIVES) it builds ``nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0,
implementation=k)``, jit-compiles it ahead of time (``compile_s``), runs it once to warm up
(``first_run_s``), then times ``--repeats`` calls with ``block_until_ready`` and prints ONE JSON
line per implementation::

    {"impl": "JACOBIAN_CONTRACTION", "compile_s": ..., "seconds_median": ..., "seconds_min": ...,
     "seconds_all": [...], "xla_flops": ..., "peak_gflops_all": [...] (with --peak),
     "fro": ||K||_F, "shape": [N_o, N_u, V, V], ...}

or ``{"impl": ..., "error": "..."}`` when it fails, runs out of memory or exceeds ``--timeout-s``.
Everything runs in float32. Each implementation runs in its own child process, so a crash, an
out-of-memory kill or a timeout of one does not take down the others and caches are not shared.

K layout (nt's, which is also ldjax's): ``(N_o, N_u, V, V)`` for classifiers and for
``--last-token``; ``(N_o, N_u, T, T, V, V)`` for full transformer logits ``(N, T, V)``.

``--save-k OUT.npz`` stores ``K_<IMPL>`` for every implementation that succeeded, plus ``K`` (the
first success), as float32.

This script never imports ``ldjax/__init__.py`` (which needs flax): ``ldjax/zoo.py`` is loaded by
path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMPL_NAMES = {1: "JACOBIAN_CONTRACTION", 2: "NTK_VECTOR_PRODUCTS", 3: "STRUCTURED_DERIVATIVES"}


def _parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--npz", required=True, help="file from ldjax.zoo.save_npz with params, x_o, x_u"
    )
    p.add_argument("--model", required=True, choices=["mlp", "lenet", "transformer"])
    p.add_argument("--implementation", default="all", choices=["1", "2", "3", "all"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--last-token",
        action="store_true",
        help="transformer only: apply returns logits[:, -1, :] so K is (N_o, N_u, V, V)",
    )
    p.add_argument("--save-k", metavar="OUT.npz", default=None)
    p.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="wall-clock limit per implementation (compile + warm-up + repeats)",
    )
    p.add_argument(
        "--n-heads",
        type=int,
        default=None,
        help="transformer heads; default: 'n_heads' stored in the npz, else 4",
    )
    p.add_argument(
        "--peak",
        action="store_true",
        help="time a float32 GEMM (1024x4096 @ 4096x1024) before every timed call: the machine's "
        "peak under the same load (peak_gflops_all)",
    )
    # internal: run one implementation in this process
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--k-out", default=None, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------
# worker: one implementation, in-process
# ------------------------------------------------------------------------------------------------


def _load_zoo():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ldjax_zoo_peer", os.path.join(ROOT, "ldjax", "zoo.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker(args) -> dict:
    impl_id = args.worker
    out = {"impl": IMPL_NAMES[impl_id], "impl_id": impl_id, "model": args.model}
    try:
        import jax
        import jax.numpy as jnp
        import neural_tangents as nt
        import numpy as np
    except Exception as e:  # wrong venv
        out["error"] = f"import failed (use the peer venv): {type(e).__name__}: {e}"
        return out
    out.update(jax_version=jax.__version__, nt_version=nt.__version__, device=str(jax.devices()[0]))
    zoo = _load_zoo()
    params, arrays = zoo.load_npz(args.npz)
    for field in ("x_o", "x_u"):
        if field not in arrays:
            raise ValueError(f"{args.npz}: missing field '{field}' (have {sorted(arrays)})")

    def cast(a):
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating):
            return jnp.asarray(a, jnp.float32)
        if np.issubdtype(a.dtype, np.integer):
            return jnp.asarray(a, jnp.int32)
        raise ValueError(f"{args.npz}: unsupported dtype {a.dtype}")

    params = jax.tree_util.tree_map(cast, params)
    x_o, x_u = cast(arrays["x_o"]), cast(arrays["x_u"])

    if args.model == "mlp":
        apply = zoo.mlp_apply
    elif args.model == "lenet":
        apply = zoo.lenet_apply
    else:
        n_heads = args.n_heads if args.n_heads is not None else int(arrays.get("n_heads", 4))
        out["n_heads"] = n_heads

        def apply(p, t):
            return zoo.transformer_apply(p, t, n_heads=n_heads)

    if args.last_token:
        if args.model != "transformer":
            raise ValueError("--last-token needs --model transformer")
        full_apply = apply

        def apply(p, t):
            return full_apply(p, t)[:, -1, :]

    out.update(
        N_o=int(x_o.shape[0]),
        N_u=int(x_u.shape[0]),
        last_token=bool(args.last_token),
        n_params=int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
        repeats=args.repeats,
        dtype="float32",
    )
    try:
        ntk_fn = nt.empirical_ntk_fn(
            apply, trace_axes=(), vmap_axes=0, implementation=nt.NtkImplementation(impl_id)
        )
        t0 = time.perf_counter()
        compiled = jax.jit(ntk_fn).lower(x_o, x_u, params).compile()
        out["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        k = compiled(x_o, x_u, params)
        k.block_until_ready()
        out["first_run_s"] = time.perf_counter() - t0
        try:
            ca = compiled.cost_analysis()
            ca = ca[0] if isinstance(ca, list) else ca
            out["xla_flops"] = float(ca.get("flops", 0.0)) or None
            if "while(" in compiled.as_text():  # XLA counts a loop's body once
                out["xla_flops"] = None
            out["xla_loops_checked"] = True
        except Exception:  # advisory
            out["xla_flops"] = None
        if args.peak:
            r = np.random.default_rng(1)
            ga = jnp.asarray(r.normal(size=(1024, 4096)), jnp.float32)
            gb = jnp.asarray(r.normal(size=(4096, 1024)), jnp.float32)
            gemm = jax.jit(lambda a, b: a @ b)
            gemm(ga, gb).block_until_ready()
        times, peaks = [], []
        for _ in range(args.repeats):
            if args.peak:
                t0 = time.perf_counter()
                gemm(ga, gb).block_until_ready()
                peaks.append(2.0 * 1024 * 4096 * 1024 / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            k = compiled(x_o, x_u, params)
            k.block_until_ready()
            times.append(time.perf_counter() - t0)
        k_host = np.asarray(k)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            msg = "OOM: " + msg
        out["error"] = msg[:2000]
        return out
    out.update(
        seconds_median=float(np.median(times)) if times else None,
        seconds_min=float(np.min(times)) if times else None,
        seconds_all=[float(t) for t in times],
        peak_gflops_all=peaks,
        load=" ".join(open("/proc/loadavg").read().split()[:3])
        if os.path.exists("/proc/loadavg")
        else None,
        fro=float(np.linalg.norm(k_host.astype(np.float64).ravel())),
        shape=list(k_host.shape),
        finite=bool(np.all(np.isfinite(k_host))),
    )
    if args.k_out:
        np.save(args.k_out, k_host)
    return out


# ------------------------------------------------------------------------------------------------
# driver: one child process per implementation
# ------------------------------------------------------------------------------------------------


def _run_child(args, impl_id, k_out):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--npz",
        args.npz,
        "--model",
        args.model,
        "--repeats",
        str(args.repeats),
        "--worker",
        str(impl_id),
    ]
    if args.last_token:
        cmd.append("--last-token")
    if args.n_heads is not None:
        cmd += ["--n-heads", str(args.n_heads)]
    if args.peak:
        cmd.append("--peak")
    if k_out:
        cmd += ["--k-out", k_out]
    base = {"impl": IMPL_NAMES[impl_id], "impl_id": impl_id, "model": args.model}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return dict(base, error=f"timeout: exceeded --timeout-s {args.timeout_s:g}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    why = (
        "killed (likely out of host memory)"
        if proc.returncode in (-9, 137)
        else f"exit code {proc.returncode}"
    )
    return dict(base, error=f"child failed, {why}: " + " | ".join(tail)[-2000:])


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.worker is not None:
        try:
            res = _worker(args)
        except Exception as e:  # bad input file etc.
            res = {
                "impl": IMPL_NAMES[args.worker],
                "impl_id": args.worker,
                "error": f"{type(e).__name__}: {e}",
            }
        print(json.dumps(res), flush=True)
        return 0
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not os.path.exists(args.npz):
        raise SystemExit(f"--npz: no such file: {args.npz}")
    if args.last_token and args.model != "transformer":
        raise SystemExit("--last-token needs --model transformer")
    impls = [1, 2, 3] if args.implementation == "all" else [int(args.implementation)]
    saved = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl_id in impls:
            k_out = os.path.join(tmp, f"K_{impl_id}.npy") if args.save_k else None
            res = _run_child(args, impl_id, k_out)
            print(json.dumps(res), flush=True)
            if k_out and "error" not in res and os.path.exists(k_out):
                import numpy as np

                saved[f"K_{IMPL_NAMES[impl_id]}"] = np.load(k_out)
        if args.save_k and saved:
            import numpy as np

            saved["K"] = next(iter(saved.values()))
            with open(args.save_k, "wb") as f:
                np.savez(f, **saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
