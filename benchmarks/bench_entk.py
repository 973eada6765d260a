"""eNTK benchmark: every ldjax implementation beside neural-tangents' three, in one run, measured
against the machine's own limit measured in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_entk.py
        [--cases mlp64,mlp256,tf_last,tf_token,vp] [--repeats 3] [--peer .peer/bin/python]
        [--no-peer] [--markdown benchmarks/RESULTS.md]

Cases (float32):
  mlp64 / mlp256  MLP 784-512-512-10, x_o = x_u, N = 64 / 256: K (N, N, 10, 10)
  tf_last         transformer 2 layers, d 128, 4 heads, V 256, T 64, last-token K (8, 8, 256, 256)
  tf_token        the same transformer, per-token K (1, 1, 64, 64, 256, 256) of one pair (1 GB)
  vp              K·G by ``ldjax.entk_vp`` against one optax SGD step + re-evaluation of x_o, on
                  the MLP (N = 256) and the transformer (8 sequences), with x_o = x_u and with a
                  different x_o of the same size

The machine's limit. Before every timed call of every row the script times one dense float32
GEMM, ``(1024, 4096) @ (4096, 1024)`` (8.6 GFLOP, the shape of the structured contraction's
products), and one elementwise pass over 64 MiB (read + write, the memory bandwidth), so the
peak a row is compared with was measured at the same time, under the same load, as the row
(``peak_gflops`` is the median of the samples taken during that row). Each row states:

* ``seconds_min / seconds`` (median) ``/ seconds_max`` over ``repeats`` timed calls after a warm-up
  (compilation excluded); calls under 0.2 s are repeated until about 3 s are spent (≤ 60);
* ``flops_model``: the FLOPs of ``ldjax.entk_cost`` for the implementation that ran (FLOP = one
  multiply or one add; a multiply-add is 2);
* ``flops_xla`` / ``bytes_xla``: XLA's own count for the compiled program, where the call is one
  program without loops (``None`` otherwise);
* ``gflops``: achieved GFLOP/s at the median time, on ``flops_xla`` where there is one (the
  FLOPs the machine executed), else on ``flops_model``; ``pct_peak``: that over the row's
  ``peak_gflops``; ``pct_roofline``: ``max(flops / peak, bytes / bandwidth)`` over the median
  time (``bound`` says which term is larger), in the JSON only: XLA's ``bytes accessed`` sums
  every operation's operands and results, fused or not, so it overstates the memory traffic
  (rows came out above 100 % of that roofline) and cannot tell a memory-bound case by itself.

neural-tangents runs in its own venv (``.peer``, recipe in tests/golden/README.md) through
``benchmarks/peer_entk.py`` on the same params and inputs (exchanged by ``.npz``), which times the
same GEMM interleaved with its own calls; its K is compared with ldjax's (relative Frobenius
error). ``nt / ldjax`` is nt's best median over ldjax's best median, with the spread
``[nt min / ldjax max, nt max / ldjax min]``. The machine's load average (``uptime``) is printed
at the start and the end and stored per row. Prints JSON lines per row, then Markdown tables;
``--markdown FILE`` also writes the tables with the command, the machine and the load into FILE
between ``<!-- bench_entk:begin -->`` and ``<!-- bench_entk:end -->`` (the rest is kept).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import resource
import shlex
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
from ldjax._src import entk as _entk
from ldjax._src import entk_vp as _entk_vp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- bench_entk:begin -->", "<!-- bench_entk:end -->"
GEMM_SHAPE = (1024, 4096, 1024)  # (m, k, n)
BW_FLOATS = 16 * 2**20  # 64 MiB of float32


def load_avg() -> str:
    """The 1/5/15-minute load average, as ``uptime`` prints it."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )


class Limits:
    """The machine's peak, sampled between timed calls: a dense float32 GEMM (FLOP/s) and an
    elementwise pass over 64 MiB (bytes/s)."""

    def __init__(self):
        m, k, n = GEMM_SHAPE
        r = np.random.default_rng(1)
        self.a = jnp.asarray(r.normal(size=(m, k)), jnp.float32)
        self.b = jnp.asarray(r.normal(size=(k, n)), jnp.float32)
        self.x = jnp.asarray(r.normal(size=(BW_FLOATS,)), jnp.float32)
        self.gemm = jax.jit(lambda a, b: a @ b)
        self.scale = jax.jit(lambda x: x * 1.0001)
        self.gemm_flops = 2.0 * m * k * n
        self.bw_bytes = 2.0 * 4 * BW_FLOATS
        jax.block_until_ready(self.gemm(self.a, self.b))
        jax.block_until_ready(self.scale(self.x))
        self.all_gflops, self.all_gbs = [], []

    def sample(self) -> tuple[float, float]:
        t = time.perf_counter()
        jax.block_until_ready(self.gemm(self.a, self.b))
        t1 = time.perf_counter()
        jax.block_until_ready(self.scale(self.x))
        t2 = time.perf_counter()
        g, b = self.gemm_flops / (t1 - t) / 1e9, self.bw_bytes / (t2 - t1) / 1e9
        self.all_gflops.append(g)
        self.all_gbs.append(b)
        return g, b


def spread(ts) -> dict:
    ts = [float(t) for t in ts]
    return dict(
        seconds=float(np.median(ts)) if ts else None,
        seconds_min=min(ts) if ts else None,
        seconds_max=max(ts) if ts else None,
        repeats=len(ts),
    )


def timed(fn, repeats, limits, warmup=True, min_seconds=3.0, max_repeats=60):
    """Times ``fn`` after a warm-up, a limits sample before every call. When the first timed call
    takes under 0.2 s, calls are repeated until about ``min_seconds`` are spent (at least
    ``repeats``, at most ``max_repeats``). Returns ``(times, out, gemm_gflops_samples,
    bandwidth_gbs_samples)``."""
    if warmup:
        jax.block_until_ready(fn())
    ts, gs, bs, out = [], [], [], None
    while len(ts) < repeats:
        g, b = limits.sample()
        gs.append(g)
        bs.append(b)
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
        if len(ts) == 1 and ts[0] < 0.2:
            repeats = max(repeats, min(max_repeats, math.ceil(min_seconds / max(ts[0], 1e-4))))
    return ts, out, gs, bs


def xla_cost(fn, args) -> tuple:
    """``(flops, bytes accessed)`` of XLA's compiled program, or ``(None, None)`` where it holds
    a loop (XLA counts a loop body once)."""
    try:
        comp = fn.lower(*args).compile()
        if " while(" in comp.as_text() or "while(" in comp.as_text():
            return None, None
        ca = comp.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return float(ca.get("flops", 0.0)) or None, float(ca.get("bytes accessed", 0.0)) or None
    except Exception:  # cost analysis is advisory
        return None, None


class Capture:
    """Records the arguments of the single XLA program one ``entk`` call runs."""

    NAMES = ("_one_block", "_vp_block")

    def __enter__(self):
        self.calls = []
        self.orig = {n: getattr(_entk, n) for n in self.NAMES}
        for n, fn in self.orig.items():
            setattr(_entk, n, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def rec(*args):
            self.calls.append((fn, args))
            return fn(*args)

        return rec

    def __exit__(self, *exc):
        for n, fn in self.orig.items():
            setattr(_entk, n, fn)

    def cost(self):
        if len(self.calls) != 1:
            return None, None
        return xla_cost(*self.calls[0])


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
            "--peak",
        ]
        if case.get("last"):
            cmd.append("--last-token")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * timeout + 120)
        rows = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
        ks = dict(np.load(kout)) if os.path.exists(kout) else {}
        return rows, ks


def rates(row, gs, bs, flops_model, flops_xla, bytes_xla):
    """Adds achieved GFLOP/s, % of the GEMM peak and % of the roofline to ``row``."""
    peak = float(np.median(gs)) if gs else None
    bw = float(np.median(bs)) if bs else None
    flops = flops_xla or flops_model
    t = row.get("seconds")
    row.update(
        flops_model=flops_model,
        flops_xla=flops_xla,
        bytes_xla=bytes_xla,
        peak_gflops=peak,
        bandwidth_gbs=bw,
        peak_gflops_range=[min(gs), max(gs)] if gs else None,
    )
    if t and flops and peak:
        row["gflops"] = flops / t / 1e9
        row["pct_peak"] = 100 * row["gflops"] / peak
        roof = flops / (peak * 1e9)
        row["bound"] = "compute"
        if bytes_xla and bw and bytes_xla / (bw * 1e9) > roof:
            roof, row["bound"] = bytes_xla / (bw * 1e9), "memory"
        row["pct_roofline"] = 100 * roof / t
    return row


def bench_entk_case(name, args, limits):
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
    model = ldjax.entk_cost(f, p, case["x_o"], case["x_u"], **kw)
    print(json.dumps(dict(case=name, estimated_flops=model, load=load_avg())), flush=True)
    for impl in impls + ["auto"]:
        ran = min(model, key=model.get) if impl == "auto" else impl
        reps = 1 if impl == "jacobian" or name == "tf_token" else args.repeats
        call = lambda impl=impl: ldjax.entk(
            f, p, case["x_o"], case["x_u"], implementation=impl, **kw
        )
        fx = bx = None
        same = [r for r in rows if r.get("ran") == ran]
        if same:  # the same XLA program as an earlier row
            fx, bx = same[0].get("flops_xla"), same[0].get("bytes_xla")
        elif name != "tf_token":
            with Capture() as cap:  # doubles as the warm-up
                jax.block_until_ready(call())
            fx, bx = cap.cost()
        ts, K, gs, bs = timed(call, reps, limits, warmup=bool(same) or name == "tf_token")
        if case.get("last"):
            K = K[:, :, 0, 0]
        ref = K if ref is None else ref
        row = dict(impl=f"ldjax {impl}", ran=ran, **spread(ts))
        row.update(
            shape=list(K.shape),
            err=rel(K, ref),
            peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            load=load_avg(),
        )
        rows.append(rates(row, gs, bs, model[ran], fx, bx))
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_peer and name != "tf_token":
        reps = max(r["repeats"] for r in rows if r["impl"] == "ldjax structured")
        peer_rows, ks = run_peer(
            case, args.peer, reps if name.startswith("mlp") else 1, args.timeout
        )
        for r in peer_rows:
            k = ks.get(f"K_{r['impl']}")
            row = dict(impl=f"nt {r['impl']}", error=r.get("error"))
            row.update(spread(r.get("seconds_all") or []))
            row.update(err=None if k is None else rel(k, ref), load=r.get("load"))
            row["xla_loops_checked"] = "xla_loops_checked" in r
            rows.append(
                rates(
                    row,
                    r.get("peak_gflops_all") or [],
                    [],
                    None,
                    r.get("xla_flops"),
                    None,
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


def _bench_vp_case(name, other, repeats, limits):
    """One case of :func:`bench_vp`: entk_vp and one optax step plus re-evaluation of x_o,
    interleaved call by call (``other``: x_o is a different batch of the size of x_u)."""
    case = make_case(name)
    f, p = case["f"], case["p"]
    x_u = case["x_u"]
    x_o = x_u
    if other:
        x_o = (
            jnp.flip(x_u, 0) * 0.5 + 0.25
            if case["model"] == "mlp"
            else jnp.asarray(np.random.default_rng(7).integers(0, 256, x_u.shape), jnp.int32)
        )
    logits = f(p, x_u)
    targets = jnp.argmax(logits, -1) if logits.ndim == 2 else jnp.roll(x_u, -1, 1)
    kwargs = dict(targets=targets)
    g = ldjax.G(losses.sft, logits, **kwargs)
    opt = optax.sgd(1e-3)

    @jax.jit
    def step_and_eval(p, x_o, x_u):
        loss = lambda q: jnp.sum(losses.sft(f(q, x_u), **kwargs))
        grads = jax.grad(loss)(p)
        upd, _ = opt.update(grads, opt.init(p), p)
        return f(optax.apply_updates(p, upd), x_o)

    vp = lambda: ldjax.entk_vp(f, p, x_o, x_u, g)
    step = lambda: step_and_eval(p, x_o, x_u)
    jax.block_until_ready(vp())
    jax.block_until_ready(step())
    t = time.perf_counter()
    jax.block_until_ready(step())
    once = time.perf_counter() - t
    n = max(repeats, min(60, math.ceil(3.0 / max(once, 1e-4)))) if once < 0.2 else repeats
    t_vp, t_step, gs, bs = [], [], [], []
    for _ in range(n):
        gg, bb = limits.sample()
        gs.append(gg)
        bs.append(bb)
        for fn, ts in ((vp, t_vp), (step, t_step)):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t)
    if other:
        kv_fn, kv_args = _entk_vp._kv_jit, (f, p, x_o, x_u, jnp.asarray(g), None)
    else:
        kv_fn, kv_args = _entk_vp._kv_shared_jit, (f, p, x_o, jnp.asarray(g), None)
    fv, bv = xla_cost(kv_fn, kv_args)
    fs, bst = xla_cost(step_and_eval, (p, x_o, x_u))
    ratios = np.asarray(t_vp) / np.asarray(t_step)
    vp_row = rates(dict(spread(t_vp)), gs, bs, None, fv, bv)
    step_row = rates(dict(spread(t_step)), gs, bs, None, fs, bst)
    return dict(
        case=name + (" x_o≠x_u" if other else ""),
        entk_vp=vp_row["seconds"],
        optax_step_and_eval=step_row["seconds"],
        ratio=float(np.median(ratios)),
        ratio_min=float(ratios.min()),
        ratio_max=float(ratios.max()),
        repeats=n,
        vp=vp_row,
        step=step_row,
        load=load_avg(),
    )


def bench_vp(args, limits):
    """K·G via entk_vp against an actual optax step plus re-evaluation of x_o."""
    out = []
    for name in ["mlp256", "tf_last"]:
        for other in (False, True):
            out.append(_bench_vp_case(name, other, args.repeats, limits))
            print(json.dumps(out[-1]), flush=True)
    return out


def _f(x, fmt="{:.3g}"):
    return "—" if x is None else fmt.format(x)


def _secs(r):
    if r.get("seconds") is None:
        return "—", "—"
    return f"{r['seconds']:.4g}", (
        f"{r['seconds_min']:.4g} / {r['seconds_max']:.4g} ({r['repeats']})"
    )


CASE_TITLES = {
    "mlp64": "MLP 784-512-512-10, N=64, K (64,64,10,10)",
    "mlp256": "MLP, N=256, K (256,256,10,10)",
    "tf_last": "transformer 2×d128, 4 heads, V 256, T 64, last-token K (8,8,256,256)",
    "tf_token": "same transformer, per-token K (1,1,64,64,256,256) of one pair",
}


def best(rows, prefix):
    ok = [r for r in rows if r["impl"].startswith(prefix) and r.get("seconds") is not None]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def peer_ratio(rows):
    """nt's best median over ldjax's best median, with the spread."""
    lb, nb = best(rows, "ldjax"), best(rows, "nt")
    if lb is None or nb is None:
        return None
    out = dict(
        ldjax=lb["impl"],
        nt=nb["impl"],
        ratio=nb["seconds"] / lb["seconds"],
        lo=nb["seconds_min"] / lb["seconds_max"],
        hi=nb["seconds_max"] / lb["seconds_min"],
        norm=None,
    )
    if lb.get("peak_gflops") and nb.get("peak_gflops"):  # times in units of the GEMM's time
        out["norm"] = (nb["seconds"] * nb["peak_gflops"]) / (lb["seconds"] * lb["peak_gflops"])
    return out


def tables(results, limits) -> list[str]:
    out = []
    g, b = limits.all_gflops, limits.all_gbs
    if g:
        out += [
            f"Machine limit, sampled {len(g)} times between the timed calls: float32 GEMM "
            f"{GEMM_SHAPE[0]}×{GEMM_SHAPE[1]}×{GEMM_SHAPE[2]} **{np.median(g):.0f} GFLOP/s** "
            f"median (min {min(g):.0f}, max {max(g):.0f}); memory bandwidth (64 MiB read + "
            f"write) **{np.median(b):.1f} GB/s** median (min {min(b):.1f}, max {max(b):.1f}).",
            "",
        ]
    out += [
        "| case | implementation | seconds | rel. error vs ldjax structured | min / max (repeats) "
        "| GFLOP (model / XLA) | GFLOP/s | % of GEMM peak (peak) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        if name == "vp":
            continue
        ref = [r.get("flops_xla") for r in rows if r["impl"] == "ldjax structured"]
        ref = ref[0] if ref else None
        for k, r in enumerate(rows):
            if (
                r["impl"].startswith("nt ")
                and r.get("flops_xla")
                and (ref is None or r["flops_xla"] < 0.5 * ref or not r.get("xla_loops_checked"))
            ):  # XLA counts a loop's body once: only a count the peer found loop-free is work
                r = dict(r, flops_xla=None, gflops=None, pct_peak=None)
            sec, mm = _secs(r)
            err = r.get("error") or ("—" if r.get("err") is None else f"{r['err']:.1e}")
            if "exit code -15" in err:
                err = "stopped by hand (SIGTERM)"
            err = " ".join(err.replace("|", "/").split())
            err = err if len(err) < 80 else err[:77] + "…"
            impl = r["impl"] + (f" (→ {r['ran']})" if r["impl"] == "ldjax auto" else "")
            fl = f"{_f(r.get('flops_model') and r['flops_model'] / 1e9)} / "
            fl += _f(r.get("flops_xla") and r["flops_xla"] / 1e9)
            pk = (
                f"{r['pct_peak']:.0f} % ({r['peak_gflops']:.0f})"
                if r.get("pct_peak") is not None
                else "—"
            )
            title = CASE_TITLES.get(name, name) if k == 0 else ""
            out.append(
                f"| {title} | {impl} | {sec} | {err} | {mm} | {fl} | {_f(r.get('gflops'))} "
                f"| {pk} | {r.get('load') or '—'} |"
            )
    ratios = {n: peer_ratio(rs) for n, rs in results.items() if n != "vp"}
    if any(ratios.values()):
        out += [
            "",
            "nt's best over ldjax's best, same run (median over median; spread: nt min / "
            "ldjax max … nt max / ldjax min). nt runs after ldjax, not call by call with it, so "
            "the last column also divides out the load: each median times the median GEMM "
            "peak sampled beside it (a time in units of the GEMM's time):",
            "",
            "| case | ldjax best | nt best | nt / ldjax | spread | nt / ldjax, each time × its "
            "GEMM peak (load-normalised) |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in ratios.items():
            if r:
                out.append(
                    f"| {n} | {r['ldjax']} | {r['nt']} | **{r['ratio']:.2f}×** "
                    f"| {r['lo']:.2f}–{r['hi']:.2f} | {_f(r['norm'], '{:.2f}×')} |"
                )
    if "vp" in results:
        out += [
            "",
            "| case | entk_vp K·G (s) | optax SGD step + re-eval (s) | ratio | ratio min / max "
            "(pairs) | K·G GFLOP/s, % peak | step GFLOP/s, % peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["vp"]:
            v, s = r["vp"], r["step"]
            out.append(
                f"| {r['case']} | {r['entk_vp']:.4g} | {r['optax_step_and_eval']:.4g} "
                f"| {r['ratio']:.2f} | {r['ratio_min']:.2f} / {r['ratio_max']:.2f} "
                f"({r['repeats']}) | {_f(v.get('gflops'))}, {_f(v.get('pct_peak'), '{:.0f}')} % "
                f"| {_f(s.get('gflops'))}, {_f(s.get('pct_peak'), '{:.0f}')} % |"
            )
    return out


def write_markdown(path, header, body):
    text = open(path).read() if os.path.exists(path) else "# eNTK benchmark results\n\n"
    block = "\n".join([BEGIN, *header, "", *body, END])
    if BEGIN in text and END in text:
        a, rest = text.split(BEGIN, 1)
        text = a + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def _header(metas) -> list[str]:
    one = len(metas) == 1
    out = [
        "Generated by (one run, every row side by side, the same params and inputs):"
        if one
        else f"Generated by {len(metas)} runs (their times below), each row side by side with the "
        "peak sampled in its own run (the same params and inputs):",
        "",
    ]
    for m in metas:
        out.append(f"    {m['command']}")
    out.append("")
    m = metas[0]
    out.append(
        f"Machine: {m['machine']}. Peer: jax 0.4.25 + neural-tangents 0.6.5 in `.peer` "
        "(`benchmarks/peer_entk.py`, a child process per implementation). "
        + "; ".join(
            f"{m['start']}–{m['end']} UTC, load average (1/5/15 min) {m['load_start']} at the "
            f"start, {m['load_end']} at the end"
            for m in metas
        )
        + " (per row in the table). No GPU was lent to this task. Columns: see the docstring "
        "of `benchmarks/bench_entk.py`. Raw rows: "
        + ", ".join(f"`{m['json']}`" for m in metas)
        + "."
    )
    return out


def _report(results, metas, limits, markdown):
    body = tables(results, limits)
    print(f"# load average at end: {metas[-1]['load_end']}")
    print()
    print("\n".join(body))
    if markdown:
        write_markdown(markdown, _header(metas), body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mlp64,mlp256,tf_last,vp,tf_token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", default=os.path.join(ROOT, ".peer", "bin", "python"))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument(
        "--json",
        default=None,
        help="write all rows to this file, after every case (default: "
        "benchmarks/results/bench_entk_<date>.json)",
    )
    ap.add_argument(
        "--markdown", default=None, help="write the tables, command and machine into this file"
    )
    ap.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: print (and with --markdown write) the tables of saved --json "
        "files (comma-separated: their cases merged, each run's command and load named)",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        results, metas = {}, []
        for path in args.from_json.split(","):
            with open(path) as fh:
                saved = json.load(fh)
            metas.append(saved.pop("_meta"))
            results.update(saved)
        limits = argparse.Namespace(
            all_gflops=[g for m in metas for g in m["gemm_gflops"]],
            all_gbs=[b for m in metas for b in m["bandwidth_gbs"]],
        )
        _report(results, metas, limits, args.markdown)
        return
    if not args.no_peer and not os.path.exists(args.peer):
        sys.exit(
            f"peer venv not found at {args.peer}: see tests/golden/README.md, or pass --no-peer"
        )
    start = datetime.datetime.now(datetime.timezone.utc)
    path = args.json or os.path.join(HERE, "results", f"bench_entk_{start:%Y-%m-%d}.json")
    meta = dict(
        command="PYTHONPATH=. .venv/bin/python benchmarks/bench_entk.py "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        machine=machine(),
        start=f"{start:%Y-%m-%d %H:%M}",
        load_start=load_avg(),
        json=os.path.relpath(path, ROOT),
    )
    print(f"# machine: {meta['machine']}", flush=True)
    print(f"# load average at start: {meta['load_start']}", flush=True)
    limits = Limits()
    results = {}
    for name in args.cases.split(","):
        if name == "vp":
            results[name] = bench_vp(args, limits)
        else:
            results[name] = bench_entk_case(name, args, limits)
        meta.update(
            end=f"{datetime.datetime.now(datetime.timezone.utc):%H:%M}",
            load_end=load_avg(),
            gemm_gflops=limits.all_gflops,
            bandwidth_gbs=limits.all_gbs,
        )
        with open(path, "w") as fh:  # after every case: a crash keeps what was measured
            json.dump(dict(results, _meta=meta), fh, indent=1)
    _report(results, [meta], limits, args.markdown)


if __name__ == "__main__":
    main()
