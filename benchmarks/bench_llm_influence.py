"""``ldjax.influence`` through penzai at a Pythia shape: time, peak RSS, and the float32 sums
checked against a float64 sum of the same vectors (issue 15's real-scale batch readout).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_llm_influence.py --method jvp|gram|factored \\
        [--arch pythia-14m] [--T 128] [--probes 13] [--check 3]

Random init (no weights downloaded); the case of ``bench_llm_memory.py`` (its ``inputs``: one DPO
pair (x, y⁺, y⁻) sharing a prompt with the probes, ``T`` tokens each, the prompt the first half;
its fixed reference log-probs and η = 1e-5), the probes' response log-probabilities as the
readout (``targets_o``, ``mask_o``). Prints one line: the method, the wall time of the call
(compilation included), the process's peak RSS (``ru_maxrss``), the first y⁺ terms; then, for the
first ``--check`` probes, the y⁺ term recomputed as ``−η ⟨∇θ log π(y_o|x), g⁺⟩`` with both
gradients in float32 and their dot product summed in float64: the reference for the float32
sums (``MIN_GEMM_ROWS`` in ``ldjax/_src/influence.py`` came from it).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

import ldjax
from ldjax import llm, losses

sys.path.insert(0, str(Path(__file__).parent))
from bench_llm_memory import ETA, branch_grads, inputs, readout  # noqa: E402  (the same case)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="jvp", choices=("auto", "gram", "jvp", "factored"))
    ap.add_argument("--arch", default="pythia-14m")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--probes", type=int, default=13)
    ap.add_argument("--check", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = llm.gpt_neox_config(args.arch)
    f, p = llm.from_penzai(llm.build_gpt_neox(cfg, seed=0))
    pair, ref, (xo, yo, mo) = inputs(args.T, args.probes, cfg.vocab_size, concrete=True)
    (xp, tp, mp), (xn, tn, mn) = pair
    kw = dict(
        targets_pos=tp, targets_neg=tn, mask_pos=mp, mask_neg=mn,
        ref_logp_pos=ref[0:1], ref_logp_neg=ref[1:2],
    )  # fmt: skip
    t0 = time.time()
    inf = ldjax.influence(
        f, p, (xp, xn), xo, losses.dpo, eta=ETA, loss_kwargs=kw, targets_o=yo, mask_o=mo,
        method=args.method, audit_size=0,
    )  # fmt: skip
    seconds = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pos = np.asarray(inf.terms[0], np.float64)[0]
    print(
        f"{args.arch} T={args.T} probes={args.probes} method={inf.method}: {seconds:.1f} s, "
        f"peak RSS {rss:.2f} GB, y+ terms {pos[: args.check]}",
        flush=True,
    )
    g = np.asarray(ravel_pytree(branch_grads(f, p, pair, ref)[0])[0], np.float64)
    for i in range(min(args.check, args.probes)):
        r = ravel_pytree(jax.grad(readout, argnums=1)(f, p, xo[i], yo[i], mo[i]))[0]
        ref64 = -ETA * float(np.asarray(r, np.float64) @ g)
        print(
            f"probe {i}: y+ term {pos[i]:.7e}, float64-summed {ref64:.7e}, "
            f"relative difference {abs(pos[i] - ref64) / abs(ref64):.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
