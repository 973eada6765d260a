"""``ldjax.influence`` through penzai at a Pythia shape: time, peak RSS, and the float32 sums
checked against a float64 sum of the same vectors (issue 15's real-scale batch readout).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_llm_influence.py --method jvp|gram|factored \\
        [--arch pythia-14m] [--T 128] [--probes 13] [--check 3]

Random init (no weights downloaded), one DPO pair (x, y⁺, y⁻) sharing a prompt with the probes,
``T`` tokens each (prompt the first half), the probes' response log-probabilities as the readout
(``targets_o``, ``mask_o``), η = 1e-5. Prints one line: the method, the wall time of the call
(compilation included), the process's peak RSS (``ru_maxrss``), the first y⁺ terms; then, for the
first ``--check`` probes, the y⁺ term recomputed as ``−η ⟨∇θ log π(y_o|x), g⁺⟩`` with both
gradients in float32 and their dot product summed in float64: the reference for the float32
sums (``MIN_GEMM_ROWS`` in ``ldjax/_src/influence.py`` came from it).
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import ldjax  # noqa: F401  (sets the XLA flag before any JAX computation)
from ldjax import llm, losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="jvp", choices=("auto", "gram", "jvp", "factored"))
    ap.add_argument("--arch", default="pythia-14m")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--probes", type=int, default=13)
    ap.add_argument("--check", type=int, default=3)
    args = ap.parse_args(argv)
    t_len, k = args.T, args.probes
    f, p = llm.from_penzai(llm.build_gpt_neox(llm.gpt_neox_config(args.arch), seed=0))
    rng = np.random.default_rng(0)
    v = llm.gpt_neox_config(args.arch).vocab_size
    x = rng.integers(0, v, (k + 2, t_len)).astype(np.int32)
    x[:, : t_len // 2] = x[0, : t_len // 2]  # one prompt
    xp, xn, xo = jnp.asarray(x[0:1]), jnp.asarray(x[1:2]), jnp.asarray(x[2:])
    m = jnp.zeros((1, t_len), bool).at[:, t_len // 2 - 1 : t_len - 1].set(True)
    tp, tn = jnp.roll(xp, -1, 1), jnp.roll(xn, -1, 1)
    ref = dict(
        ref_logp_pos=losses.sequence_logprob(f(p, xp), tp, m) + 0.3,
        ref_logp_neg=losses.sequence_logprob(f(p, xn), tn, m) - 0.2,
    )
    kw = dict(targets_pos=tp, targets_neg=tn, mask_pos=m, mask_neg=m, beta=0.1, **ref)
    yo, mo = jnp.roll(xo, -1, 1), jnp.broadcast_to(m, (k, t_len))
    eta = 1e-5
    t0 = time.time()
    inf = ldjax.influence(
        f, p, (xp, xn), xo, losses.dpo, eta=eta, loss_kwargs=kw, targets_o=yo, mask_o=mo,
        method=args.method, audit_size=0,
    )  # fmt: skip
    seconds = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pos = np.asarray(inf.terms[0], np.float64)[0]
    print(
        f"{args.arch} T={t_len} probes={k} method={inf.method}: {seconds:.1f} s, peak RSS "
        f"{rss:.2f} GB, y+ terms {pos[: args.check]}",
        flush=True,
    )
    zp, vjp = jax.vjp(lambda th: f(th, xp), p)
    zn = f(p, xn)
    beta = kw.pop("beta")
    gp = jax.grad(lambda a: jnp.sum(losses.dpo(a, zn, beta=beta, **kw)))(zp)
    g = np.asarray(ravel_pytree(vjp(gp)[0])[0], np.float64)

    def readout(th, i):
        lp = jax.nn.log_softmax(f(th, xo[i : i + 1])[0], -1)
        return jnp.sum(jnp.take_along_axis(lp, yo[i][:, None], -1)[:, 0] * mo[i])

    for i in range(min(args.check, k)):
        r = np.asarray(ravel_pytree(jax.grad(readout)(p, i))[0], np.float64)
        ref64 = -eta * float(r @ g)
        print(
            f"probe {i}: y+ term {pos[i]:.7e}, float64-summed {ref64:.7e}, "
            f"relative difference {abs(pos[i] - ref64) / abs(ref64):.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
