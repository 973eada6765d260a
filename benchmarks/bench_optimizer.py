"""Cost of the optimizer-aware prediction: ``decompose(optimizer=, opt_state=)`` beside the plain
``decompose(eta=)``, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_optimizer.py [--repeats 7]

Cases (float32, ``method="vp"``, compilation excluded; the two predictions are called alternately,
``--repeats`` times each after a warm-up, so that both see the same load: min / median / max of
each and the median of the paired ratios):

* ``lenet``: the MNIST recipe's shapes: LeNet, a batch of 64 digits, 50 probes, cross-entropy;
  optimizers: SGD momentum 0.9 + weight decay 5e-4 (the recipe's), Adam.
* ``lm``: the quick LM (d 64, 2 layers, V 259, T 96): SFT on 8 sequences observed on 8 others;
  optimizers: RMSprop (the SFT phase's), Adam.

The optimizer's state is taken after 3 real steps (non-trivial momentum / second moments). The
target of issue #10 is a ratio ≤ 1.3 (optimizer-aware / plain). Per case and optimizer, three rows:
the prediction split into its causes (the default: one JVP on x_o per cause), ``split=False`` (the
whole update ``J_o U(g)`` in one JVP), and the second-order prediction ``order=2``, each against the
same plain first-order one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldjax
from ldjax import losses, zoo
from ldjax.lm.model import LMConfig, init_params, make_apply_fn


def interleaved(fa, fb, repeats):
    """Times of ``fa`` and ``fb`` called alternately (so that both see the same machine load):
    ``(min, median, max)`` of each and the median of the per-repeat ratios b / a."""
    jax.block_until_ready(fa())
    jax.block_until_ready(fb())
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t)
    stat = lambda ts: (min(ts), float(np.median(ts)), max(ts))  # noqa: E731
    return stat(ta), stat(tb), float(np.median(np.asarray(tb) / np.asarray(ta)))


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def lenet_case():
    rng = np.random.default_rng(0)
    p = zoo.lenet_init(jax.random.PRNGKey(0))
    x_u = jnp.asarray(rng.uniform(size=(64, 28, 28, 1)), jnp.float32)
    y_u = jnp.asarray(rng.integers(0, 10, 64))
    x_o = jnp.asarray(rng.uniform(size=(50, 28, 28, 1)), jnp.float32)
    opts = {
        "sgd momentum 0.9 + wd": optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(1e-3, momentum=0.9)
        ),
        "adam": optax.adam(1e-3),
    }
    return dict(
        f=zoo.lenet_apply, p=p, x_o=x_o, x_u=x_u, loss=_ce, kw=dict(labels=y_u), opts=opts,
        eta=1e-3,
    )  # fmt: skip


def lm_case():
    cfg = LMConfig(d_model=64, n_heads=2, n_layers=2, d_ff=128, max_len=96)
    p = init_params(cfg, jax.random.PRNGKey(0))
    f = make_apply_fn(cfg)
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(3, 259, (16, 97)), jnp.int32)
    x_u, y_u, x_o = tok[:8, :-1], tok[:8, 1:], tok[8:, :-1]
    mask = jnp.asarray(np.arange(96)[None, :] >= 40).repeat(8, 0)
    opts = {"rmsprop": optax.rmsprop(3e-4), "adam": optax.adam(3e-4)}
    return dict(
        f=f, p=p, x_o=x_o, x_u=x_u, loss=losses.sft, kw=dict(targets=y_u, mask=mask), opts=opts,
        eta=3e-4,
    )  # fmt: skip


def state_after(case, tx, steps=3):
    f, p, kw = case["f"], case["p"], case["kw"]
    s = tx.init(p)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.sum(case["loss"](f(q, case["x_u"]), **kw)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        p, s = step(p, s)
    return p, s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(json.dumps(dict(jax=jax.__version__, backend=jax.default_backend(),
                          cpus=os.cpu_count())))  # fmt: skip
    rows = []
    for name, make in (("lenet", lenet_case), ("lm", lm_case)):
        c = make()
        for oname, tx in c["opts"].items():
            p, s = state_after(c, tx)
            run = (c["f"], p, c["x_o"], c["x_u"], c["loss"])
            variants = (("", dict()), (", split=False", dict(split=False)),
                        (", order 2", dict(order=2)))  # fmt: skip
            for suffix, extra in variants:
                plain, aware, ratio = interleaved(
                    lambda run=run, c=c: (
                        ldjax.decompose(*run, eta=c["eta"], loss_kwargs=c["kw"]).delta_logits
                    ),
                    lambda run=run, c=c, s=s, tx=tx, extra=extra: (
                        ldjax.decompose(
                            *run, optimizer=tx, opt_state=s, loss_kwargs=c["kw"], **extra
                        ).delta_logits
                    ),
                    args.repeats,
                )
                row = dict(case=name, optimizer=oname + suffix, plain=plain, aware=aware,
                           ratio_median=aware[1] / plain[1], ratio_paired=ratio)  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| case | optimizer | plain decompose (s) min/med/max | optimizer-aware (s) "
          "min/med/max | ratio of medians | median paired ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    fmt = lambda t: f"{t[0]:.3f} / {t[1]:.3f} / {t[2]:.3f}"  # noqa: E731
    for r in rows:
        print(f"| {r['case']} | {r['optimizer']} | {fmt(r['plain'])} | {fmt(r['aware'])} | "
              f"{r['ratio_median']:.2f}× | {r['ratio_paired']:.2f}× |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
