"""What the input checks cost: entk and decompose with and without validation, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_validation.py [--repeats 41]
        [--cases mlp64,mlp256]

Cases: the MLP 784-512-512-10 of ``bench_entk.py`` at N = 64 and 256 (float32), x_o = x_u:
``entk`` (auto: structured, K (N, N, 10, 10)) and ``decompose`` (SFT, method "vp", targets the
argmax). Three modes each:

* ``off``: inside ``ldjax._src.validate.disabled()`` (the value checks skipped; the shape
  inference the computation needs still runs);
* ``on``: the default; arrays already found finite are remembered (jax arrays are immutable), so
  repeated calls on the same params, inputs and targets check only what is new (K, logits, G);
* ``on, cold``: as ``on`` but that memory cleared before every call: params, inputs and targets
  checked in full each time (the first call on new arrays).

The modes run interleaved call by call, the order rotating every round, so that load from other
processes hits all three alike; the table gives the fastest of ``--repeats`` calls after a
warm-up (on a shared machine the minimum is the least disturbed figure; the JSON lines also hold
the medians).

On a loaded machine the difference of two wall times is noise at the 2 % level, so the checks are
also timed directly: every function of ``ldjax._src.validate`` is wrapped with a timer of the
calling thread's CPU time (``time.thread_time``: time taken by other processes is not counted;
the arrays it is given are made ready first, so waiting for a computation is not counted either;
nested calls count once), apart from the shape inference the computation needs with the checks
off too (``logits_struct``, ``logits_shape`` and what they call). "checks" is their time per call
(the least of ``--repeats`` calls, like the wall times; the JSON lines hold the medians too), and
the overhead is that over the wall time of ``off``.

Prints one JSON line per case and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import ldjax
from ldjax import losses, zoo
from ldjax._src import validate


def make(n):
    p = zoo.mlp_init(jax.random.PRNGKey(0), (784, 512, 512, 10))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(n, 784)), jnp.float32)
    y = jnp.argmax(zoo.mlp_apply(p, x), -1).astype(jnp.int32)
    return p, x, y


def calls(p, x, y):
    return {
        "entk": lambda: ldjax.entk(zoo.mlp_apply, p, x),
        "decompose": lambda: (
            ldjax.decompose(
                zoo.mlp_apply, p, x, x, losses.sft, eta=1e-3, loss_kwargs=dict(targets=y)
            ).delta_logits
        ),
    }


def modes(fn):
    def off():
        with validate.disabled():
            return fn()

    def cold():
        validate.forget_finite()
        return fn()

    return {"off": off, "on": fn, "on, cold": cold}


def bench(fn, repeats):
    """Per mode: ``(fastest wall s, median wall s)``."""
    ms = modes(fn)
    for m in ms.values():  # warm-up: compilation
        jax.block_until_ready(m())
    wall = {k: [] for k in ms}
    keys = list(ms)
    for r in range(repeats):
        for k in keys[r % 3 :] + keys[: r % 3]:  # rotate: no mode always runs first
            t = time.perf_counter()
            jax.block_until_ready(ms[k]())
            wall[k].append(time.perf_counter() - t)
    return {k: (float(np.min(v)), float(np.median(v))) for k, v in wall.items()}


SHAPE_INFERENCE = ("logits_struct", "logits_shape", "check_batched", "avals_key", "_eval_shape")


@contextlib.contextmanager
def timed_checks():
    """Wraps every function of ``validate`` (but :data:`SHAPE_INFERENCE`) with a timer; yields a
    list to which each top-level check call appends its seconds."""
    spent, depth = [], [0]
    originals = {
        name: fn
        for name, fn in vars(validate).items()
        if inspect.isfunction(fn)
        and fn.__module__ == validate.__name__
        and name not in SHAPE_INFERENCE
        and name not in ("register_loss", "disabled")
    }

    def wrap(fn):
        def timed(*args, **kwargs):
            if depth[0] == 0:  # the arrays ready first: waiting for XLA is not the checks' cost
                jax.block_until_ready([a for a in args if isinstance(a, jax.Array)])
            depth[0] += 1
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent.append(time.thread_time() - t)

        return timed

    for name, fn in originals.items():
        setattr(validate, name, wrap(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(validate, name, fn)


def check_time(fn, repeats, cold=False):
    """``(least, median)`` seconds per call spent in the checks."""
    per_call = []
    with timed_checks() as spent:
        for _ in range(repeats):
            if cold:
                validate.forget_finite()
            del spent[:]
            jax.block_until_ready(fn())
            per_call.append(sum(spent))
    return float(np.min(per_call)), float(np.median(per_call))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mlp64,mlp256")
    ap.add_argument("--repeats", type=int, default=41)
    args = ap.parse_args(argv)
    print(
        f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )
    rows = []
    for case in args.cases.split(","):
        p, x, y = make(int(case[3:]))
        for name, fn in calls(p, x, y).items():
            t = bench(fn, args.repeats)
            row = dict(case=case, call=name)
            for k, (lo, med) in t.items():
                row.update({f"{k} wall min (s)": lo, f"{k} wall median (s)": med})
            off = t["off"][0]
            row["wall overhead %"] = 100 * (t["on"][0] / off - 1)
            row["checks (s)"], row["checks median (s)"] = check_time(fn, args.repeats)
            row["checks cold (s)"], row["checks cold median (s)"] = check_time(
                fn, args.repeats, cold=True
            )
            row["overhead %"] = 100 * row["checks (s)"] / off
            row["overhead cold %"] = 100 * row["checks cold (s)"] / off
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| case | call | off: wall (s) | on: wall (s) | checks (ms) | overhead "
        "| checks, cold (ms) | overhead, cold |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['call']} | {r['off wall min (s)']:.4g} "
            f"| {r['on wall min (s)']:.4g} | {1e3 * r['checks (s)']:.3f} "
            f"| {r['overhead %']:.2f} % | {1e3 * r['checks cold (s)']:.3f} "
            f"| {r['overhead cold %']:.2f} % |"
        )


if __name__ == "__main__":
    main()
