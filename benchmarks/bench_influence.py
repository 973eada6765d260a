"""Batch influence (``ldjax.influence``) against what one would write instead, in one run:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_influence.py [--u 2000 --o 500 --loop-u 8]
        [--torch /work/wt/torchvenv/bin/python] [--skip torch,rss,devices] [--out FILE]

Sections (float32; every ratio from runs side by side in this one invocation):

1. ``loop``: LeNet (the MNIST warm-up's, 29,624 parameters), U = ``--u`` training digits and
   O = ``--o`` probe digits, the full ``(N_u, N_o, 10)`` readout. ``ldjax.influence`` (warm: the
   jitted programs compiled by a first call on one chunk; the first-call time is printed too)
   against a Python loop of ``ldjax.decompose`` per u on the same O, timed on ``--loop-u`` of
   the u (warm, after one call) and extrapolated linearly to U (the loop's cost per u does not
   depend on U); the loop's rows are checked equal to influence's.
2. ``torch``: the MNIST MLP (784-128-128-10, 118,282 parameters), U = ``--u``, O = ``--o``: the
   TracIn-at-one-checkpoint matrix ``−η g_oᵀ g_u`` (the first-order change of each probe's loss)
   by ``ldjax.influence(target_only=True).delta_loss_o`` against ``torch.func.vmap(grad)`` plus
   one matmul per chunk (``benchmarks/torch_influence.py``, run in its own venv on the same
   weights and data, saved to an .npz); values compared, warm medians of ``--repeats``, the
   three alternating: ldjax with the method ``"auto"`` picks (named in the row; ``"factored"``
   for this MLP), ldjax with ``method="gram"``, and torch.
3. ``rss``: peak RSS of a streamed job (``out=`` a folder) on the MLP with U = 8,000 against
   U = 1,000 (O = 100), each in a fresh process (``ru_maxrss``).
4. ``devices``: LeNet on 8 host devices (mesh u=4, o=2) against 1 device in fresh processes:
   the same numbers, and both times (2 cores do not get faster with 8 host devices: the point is
   the sharding's correctness).

On a GPU or TPU (``jax.default_backend() != "cpu"``) sections 1 and 2 run there and the table's
rows say which backend; the device section uses the accelerator's devices. The table is printed
and written to ``benchmarks/results/bench_influence_<date>.txt`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import ldjax  # sets the XLA flag before JAX starts (no backend is started by importing)
from ldjax import losses
from ldjax.data.mnist import load_default, to_float
from ldjax.mnist.models import apply_fn, init_params, make_model

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workers


def _lenet(n_u, n_o, seed=0):
    model = make_model("lenet")
    f = apply_fn(model)
    p = init_params(model, jax.random.PRNGKey(seed))
    x, y = load_default("train")
    xt, yt = load_default("test")
    x, xt = to_float(x), to_float(xt)
    iu = np.arange(n_u) % len(x)
    io = np.arange(n_o) % len(xt)
    return f, p, x[iu], y[iu], xt[io], yt[io]


def _mlp(n_u, n_o, hidden=(128, 128), seed=0):
    model = make_model("mlp", hidden=hidden)
    f = apply_fn(model)
    p = init_params(model, jax.random.PRNGKey(seed))
    x, y = load_default("train")
    xt, yt = load_default("test")
    x, xt = to_float(x), to_float(xt)
    rng = np.random.default_rng(seed)
    iu = np.arange(n_u) % len(x)
    # distinct inputs beyond the 800 digits: a little pixel noise per copy
    xu = np.clip(
        x[iu] + (iu >= len(x))[:, None, None, None] * rng.normal(0, 0.05, x[iu].shape), 0, 1
    )
    io = np.arange(n_o) % len(xt)
    return f, p, xu.astype(np.float32), y[iu], xt[io], yt[io]


def worker_rss(n_u: int, n_o: int, chunk: int) -> dict:
    f, p, xu, yu, xo, yo = _mlp(n_u, n_o)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        inf = ldjax.influence(
            f,
            p,
            xu,
            xo,
            losses.sft,
            eta=0.01,
            loss_kwargs=dict(targets=yu),
            targets_o=yo,
            chunk_size=chunk,
            out=os.path.join(d, "job"),
        )
        seconds = time.perf_counter() - t
        checksum = float(np.asarray(inf.delta[:50]).sum())
    return dict(
        n_u=n_u,
        seconds=seconds,
        maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        method=inf.method,
        checksum=checksum,
    )


def worker_devices(n_dev: int, n_u: int, n_o: int, npz: str) -> dict:
    jax.config.update("jax_num_cpu_devices", n_dev)
    devs = jax.devices()[:n_dev]
    o_dev = 2 if n_dev % 2 == 0 and n_dev > 1 else 1
    f, p, xu, yu, xo, yo = _lenet(n_u, n_o)
    mesh = ldjax.default_mesh(devs, o_devices=o_dev)
    kw = dict(eta=0.01, chunk_size=64, mesh=mesh, method="gram")
    warm = dict(targets=yu[:64])
    ldjax.influence(f, p, xu[:64], xo, losses.sft, loss_kwargs=warm, **kw)  # compile
    kw["loss_kwargs"] = dict(targets=yu)
    t = time.perf_counter()
    inf = ldjax.influence(f, p, xu, xo, losses.sft, **kw)
    seconds = time.perf_counter() - t
    np.save(npz, np.asarray(inf.delta))
    return dict(devices=len(devs), mesh=dict(mesh.shape), seconds=seconds)


# ----------------------------------------------------------------------------- sections


def section_loop(args) -> list:
    f, p, xu, yu, xo, yo = _lenet(args.u, args.o)
    kw = dict(eta=0.01, loss_kwargs=dict(targets=yu))
    t = time.perf_counter()
    warm = dict(eta=0.01, loss_kwargs=dict(targets=yu[: args.chunk]))
    ldjax.influence(f, p, xu[: args.chunk], xo, losses.sft, chunk_size=args.chunk, **warm)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    inf = ldjax.influence(f, p, xu, xo, losses.sft, chunk_size=args.chunk, **kw)
    t_inf = time.perf_counter() - t
    n_loop = args.loop_u
    dec = (
        lambda u: ldjax.decompose(  # noqa: E731
            f, p, xo, xu[u : u + 1], losses.sft, eta=0.01, loss_kwargs=dict(targets=yu[u : u + 1])
        )
    )
    jax.block_until_ready(dec(0).delta_logp_linear)  # compile
    t = time.perf_counter()
    rows = [np.asarray(dec(u).delta_logp_linear) for u in range(n_loop)]
    t_loop = time.perf_counter() - t
    d = np.asarray(inf.delta[:n_loop])
    err = float(np.linalg.norm(d - np.stack(rows)) / np.linalg.norm(np.stack(rows)))
    pairs_inf = args.u * args.o / t_inf
    pairs_loop = n_loop * args.o / t_loop
    backend = jax.default_backend()
    return [
        (
            f"LeNet U={args.u} O={args.o} V=10 [{backend}]",
            f"ldjax.influence (warm, {inf.method})",
            f"{t_inf:.1f} s",
            f"{pairs_inf:,.0f} pairs/s",
            f"first call on {args.chunk} u (compile): {t_first:.1f} s",
        ),
        (
            "",
            f"loop of ldjax.decompose per u ({n_loop} u timed)",
            f"{t_loop:.1f} s ({t_loop / n_loop * args.u:,.0f} s extrapolated to U={args.u})",
            f"{pairs_loop:,.0f} pairs/s",
            f"rel. diff vs influence {err:.1e}",
        ),
        (
            "",
            "ratio influence / loop (pairs/s)",
            "",
            f"{pairs_inf / pairs_loop:,.1f}x",
            "target >= 20x",
        ),
    ], None


def section_torch(args) -> list:
    f, p, xu, yu, xo, yo = _mlp(args.u, args.o)
    eta = 0.01
    ws = {}
    for i, name in enumerate(sorted(p, key=lambda k: int(k[2:]))):  # fc1, fc2, fc3
        ws[f"w{i}"] = np.asarray(p[name]["kernel"], np.float32)
        ws[f"b{i}"] = np.asarray(p[name]["bias"], np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-"))
    np.savez(
        tmp / "in.npz",
        x_u=xu.reshape(len(xu), -1),
        y_u=yu,
        x_o=xo.reshape(len(xo), -1),
        y_o=yo,
        eta=eta,
        **ws,
    )
    kw = dict(
        eta=eta, loss_kwargs=dict(targets=yu), targets_o=yo, target_only=True, chunk_size=args.chunk
    )
    run = lambda method="auto": ldjax.influence(f, p, xu, xo, losses.sft, method=method, **kw)  # noqa: E731
    t = time.perf_counter()
    inf = run()  # the method "auto" picks
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    gram = run("gram")
    t_first_gram = time.perf_counter() - t
    t_jax, t_gram, t_torch, torch_info = [], [], [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        inf = run()
        np.asarray(inf.delta_loss_o)
        t_jax.append(time.perf_counter() - t)
        t = time.perf_counter()
        gram = run("gram")
        np.asarray(gram.delta_loss_o)
        t_gram.append(time.perf_counter() - t)
        r = subprocess.run(
            [
                args.torch,
                str(ROOT / "benchmarks" / "torch_influence.py"),
                str(tmp / "in.npz"),
                str(tmp / "out.npz"),
                "--repeats",
                "1",
                "--chunk",
                str(args.chunk),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode:
            raise RuntimeError(f"torch side failed: {r.stderr[-2000:]}")
        torch_info = json.loads(r.stdout.strip().splitlines()[-1])
        t_torch.append(torch_info["median"])
    m_t = np.load(tmp / "out.npz")["M"]
    m_j = np.asarray(inf.delta_loss_o)
    m_g = np.asarray(gram.delta_loss_o)
    err = float(np.linalg.norm(m_j - m_t) / np.linalg.norm(m_t))
    err_g = float(np.linalg.norm(m_g - m_t) / np.linalg.norm(m_t))
    err_jg = float(np.linalg.norm(m_j - m_g) / np.linalg.norm(m_g))
    tj, tt = float(np.median(t_jax)), float(np.median(t_torch))
    tg = float(np.median(t_gram))
    n_p = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(p))
    backend = jax.default_backend()
    return [
        (
            f"MLP 784-128-128-10 ({n_p:,} params) U={args.u} O={args.o}, TracIn −η g_oᵀg_u "
            f"[{backend}]",
            f"ldjax.influence(target_only) (warm, method auto -> {inf.method})",
            f"{tj:.2f} s",
            f"{args.u * args.o / tj:,.0f} pairs/s",
            f"first call {t_first:.1f} s; rel. diff vs gram {err_jg:.1e}",
        ),
        (
            "",
            "ldjax.influence(target_only) (warm, method gram)",
            f"{tg:.2f} s",
            f"{args.u * args.o / tg:,.0f} pairs/s",
            f"first call {t_first_gram:.1f} s; rel. diff vs torch {err_g:.1e}",
        ),
        (
            "",
            f"torch {torch_info['torch']} func.vmap(grad) + matmul ({torch_info['threads']} "
            "threads)",
            f"{tt:.2f} s",
            f"{args.u * args.o / tt:,.0f} pairs/s",
            f"rel. diff of the matrices {err:.1e}",
        ),
        ("", f"ratio torch / ldjax {inf.method} (time)", "", f"{tt / tj:.2f}x", "target >= 1.5x"),
        ("", "ratio torch / ldjax gram (time)", "", f"{tt / tg:.2f}x", ""),
    ], None


def _child(args_list) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, *map(str, args_list)],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if r.returncode:
        raise RuntimeError(f"worker {args_list} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def section_rss(args) -> list:
    small = _child(["--worker", "rss", "--u", 1000, "--o", 100, "--chunk", args.chunk])
    big = _child(["--worker", "rss", "--u", 8000, "--o", 100, "--chunk", args.chunk])
    ratio = big["maxrss_mb"] / small["maxrss_mb"]
    return [
        (
            "MLP O=100, streamed to disk (out=)",
            "U=1,000: peak RSS",
            f"{small['seconds']:.1f} s",
            f"{small['maxrss_mb']:,.0f} MB",
            "",
        ),
        (
            "",
            "U=8,000: peak RSS",
            f"{big['seconds']:.1f} s",
            f"{big['maxrss_mb']:,.0f} MB",
            f"ratio {ratio:.3f} (target <= 1.2), method {big['method']}",
        ),
    ], None


def section_devices(args) -> list:
    tmp = Path(tempfile.mkdtemp(prefix="bench-influence-dev-"))
    one = _child(
        [
            "--worker",
            "devices",
            "--n-dev",
            1,
            "--u",
            args.dev_u,
            "--o",
            args.dev_o,
            "--npz",
            tmp / "one.npy",
        ]
    )
    eight = _child(
        [
            "--worker",
            "devices",
            "--n-dev",
            8,
            "--u",
            args.dev_u,
            "--o",
            args.dev_o,
            "--npz",
            tmp / "eight.npy",
        ]
    )
    a, b = np.load(tmp / "one.npy"), np.load(tmp / "eight.npy")
    err = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    return [
        (
            f"LeNet U={args.dev_u} O={args.dev_o}, host devices",
            "1 device",
            f"{one['seconds']:.1f} s",
            "",
            "",
        ),
        (
            "",
            f"8 devices (mesh {eight['mesh']})",
            f"{eight['seconds']:.1f} s",
            "",
            f"rel. diff vs 1 device {err:.1e}",
        ),
    ], None


# ----------------------------------------------------------------------------- main


def _table(rows) -> str:
    head = ("case", "what", "time", "speed / size", "note")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--u", type=int, default=2000)
    ap.add_argument("--o", type=int, default=500)
    ap.add_argument("--loop-u", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dev-u", type=int, default=256)
    ap.add_argument("--dev-o", type=int, default=50)
    ap.add_argument("--torch", default="/work/wt/torchvenv/bin/python")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--only", default="", help="comma-separated sections to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-dev", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--npz", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "rss":
        print(json.dumps(worker_rss(args.u, args.o, args.chunk)))
        return 0
    if args.worker == "devices":
        print(json.dumps(worker_devices(args.n_dev, args.u, args.o, args.npz)))
        return 0
    sections = dict(
        loop=section_loop, torch=section_torch, rss=section_rss, devices=section_devices
    )
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(","))) or set(sections)
    if not Path(args.torch).exists():
        print(
            f"no torch interpreter at {args.torch}: the torch section is skipped", file=sys.stderr
        )
        skip.add("torch")
    rows = []
    for name, fn in sections.items():
        if name in skip or name not in only:
            continue
        t = time.perf_counter()
        got, _ = fn(args)
        rows += got
        print(_table(got), file=sys.stderr, flush=True)  # kept even if a later section fails
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    load = os.getloadavg()
    header = (
        f"bench_influence  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
        f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}/{load[1]:.1f}\ncommand: python benchmarks/bench_influence.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    text = header + "\n\n" + _table(rows) + "\n"
    print(text)
    out = (
        Path(args.out)
        if args.out
        else (
            ROOT
            / "benchmarks"
            / "results"
            / f"bench_influence_{datetime.date.today():%Y-%m-%d}.txt"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:  # appends: a GPU/TPU run adds its rows
        fh.write(text + "\n")
    print(f"appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
