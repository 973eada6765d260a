"""A training run to SIGKILL, for tests/test_kill_resume.py (not a test module itself).

    python tests/kill_driver.py PHASE CKPT_DIR [--sleep S]
        trains PHASE at a tiny size with orbax checkpoints in CKPT_DIR, sleeping S seconds after
        every update (so that the test can kill it between two checkpoints);
    python tests/kill_driver.py PHASE CKPT_DIR --resume OUT.npz
        resumes from CKPT_DIR to the end, then trains the same PHASE uninterrupted without
        checkpoints, and writes both final parameter sets to OUT.npz.

PHASE: mnist, pretrain, sft, sft_extend, dpo, dpo_onpolicy. The sleep changes no number.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ldjax.data.mnist import load_default
from ldjax.data.synthetic import generate_preferences
from ldjax.lm import train as T
from ldjax.lm.config import PreferenceConfig, PretrainConfig, SFTConfig
from ldjax.lm.model import LMConfig, init_params
from ldjax.mnist.train import TrainConfig, train

PHASES = ("mnist", "pretrain", "sft", "sft_extend", "dpo", "dpo_onpolicy")
TOTAL = {"mnist": 12, "pretrain": 12, "sft": 12, "sft_extend": 12, "dpo": 12, "dpo_onpolicy": 8}
LM = LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=48)
PL = 16


def run(phase: str, ckpt_dir, *, resume: bool = False, sleep: float = 0.0):
    """The final parameters of ``phase`` (module docstring)."""
    if phase == "mnist":
        x, y = load_default("train")
        cfg = TrainConfig(n_train=96, batch_size=32, epochs=4, lr=0.05, schedule="cosine")
        hook = (lambda *a: time.sleep(sleep)) if sleep else None
        params, _ = train(cfg, x, y, ckpt_dir=ckpt_dir, resume=resume, on_step=hook, progress=False)
        return params
    records = generate_preferences(20, seed=3)
    p0 = init_params(LM, jax.random.PRNGKey(0))
    kw = dict(
        ckpt_dir=ckpt_dir,
        resume=resume,
        progress=False,
        on_step=(lambda s, m: time.sleep(sleep)) if sleep else None,
    )
    if phase == "pretrain":
        cfg = PretrainConfig(lr=3e-3, warmup=2, batch_size=4, steps=12, ckpt_every=2, seed=1)
        texts = [r["prompt"] + r["chosen"] for r in records]
        r = T.pretrain(p0, LM, texts, cfg, **kw)
    elif phase in ("sft", "sft_extend"):
        cfg = SFTConfig(
            lr=3e-3,
            warmup=2,
            batch_size=4,
            steps=12,
            epochs=0.0,
            ckpt_every=2,
            seed=1,
            extend=phase == "sft_extend",
        )
        r = T.sft(p0, LM, records, cfg, max_prompt_len=PL, **kw)
    else:
        cfg = PreferenceConfig(
            lr=3e-3,
            warmup=2,
            batch_size=4,
            steps=TOTAL[phase],
            epochs=0.0,
            ckpt_every=2,
            seed=1,
            on_policy=phase == "dpo_onpolicy",
            max_new_tokens=8,
        )
        r = T.preference(p0, p0, LM, records, cfg, max_prompt_len=PL, **kw)
    return r.params


def _flat(params) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=PHASES)
    ap.add_argument("ckpt_dir")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--resume", metavar="OUT_NPZ", default=None)
    a = ap.parse_args()
    if a.resume is None:
        run(a.phase, a.ckpt_dir, sleep=a.sleep)
        return
    resumed = run(a.phase, a.ckpt_dir, resume=True)
    full = run(a.phase, None)
    # both runs end on the same parameter tree, finite: the test then compares them bitwise
    r, f = _flat(resumed), _flat(full)
    assert r.keys() == f.keys(), sorted(set(r) ^ set(f))
    for k in r:
        assert r[k].shape == f[k].shape and np.isfinite(r[k]).all(), k
    arrays = {f"resumed{k}": v for k, v in _flat(resumed).items()}
    arrays.update({f"full{k}": v for k, v in _flat(full).items()})
    np.savez(a.resume, **arrays)


if __name__ == "__main__":
    main()
