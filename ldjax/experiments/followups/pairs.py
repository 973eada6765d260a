"""One DPO step on each preference pair alone, measured: the numbers the entanglement and the
displacement analyses read.

For pair ``(x, y⁺, y⁻)`` at the SFT model θ (which is also π_ref, so DPO's ``a = σ(0) = 1/2``):
``g± = ∇θ log π(y±|x)`` (summed over response tokens), the DPO gradient ``−β/2 (g⁺ − g⁻)``, and
one SGD step ``Δθ = η β/2 (g⁺ − g⁻)`` on that pair only. Measured per pair:

* ``dot = ⟨g⁺, g⁻⟩``, ``norm_pos = ‖g⁺‖``, ``norm_neg = ‖g⁻‖``, ``cos = dot/(‖g⁺‖‖g⁻‖)``:
  the sequence-level eNTK entry between y⁺ and y⁻ and its normalised form (Yuan et al. 2024,
  arXiv 2410.13828, "gradient entanglement");
* ``pred_pos = ⟨g⁺, Δθ⟩ = ηβ/2 (‖g⁺‖² − dot)``, ``pred_neg = ηβ/2 (dot − ‖g⁻‖²)``: ldjax's
  first-order prediction of Δlog π(y±) — the decomposition ``−η A K G`` summed over the response
  tokens (the tests check it against :func:`ldjax.decompose` on a pair);
* ``act_pos``, ``act_neg``: the actual Δlog π(y±) after the step;
* ``ches = ⟨Σ_k h⁺_k, Σ_k h⁻_k⟩ − ‖Σ_k h⁺_k‖²`` and ``ln_ches`` (the same with the sums replaced
  by means over tokens), where ``h±_k`` is the last hidden state at the position that predicts
  the k-th response token (Razin et al., ICLR 2025, arXiv 2410.08847, eq. 3 and the
  length-normalised variant); ``len_pos``, ``len_neg``: response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import losses
from ldjax.experiments.followups.model import flat_params, hidden_and_logits, sequence_grads
from ldjax.lm import train as T
from ldjax.lm.model import TransformerLM
from ldjax.lm.tokenizer import ByteTokenizer

__all__ = ["encode_pairs", "measure_pairs", "ches"]


def encode_pairs(records, cfg) -> tuple[dict, dict]:
    """``(pos, neg)`` teacher-forcing arrays of the first ``cfg.pairs.n_pairs`` records."""
    recs = list(records)[: cfg.pairs.n_pairs]
    return T.pair_examples(
        ByteTokenizer(), recs, max_len=cfg.sft.max_len, max_prompt_len=cfg.sft.max_prompt_len
    )


def ches(h_pos, m_pos, h_neg, m_neg, normalize: bool = False) -> np.ndarray:
    """CHES per pair, ``(N,)``: ``⟨H⁺, H⁻⟩ − ‖H⁺‖²`` with ``H = Σ_k m_k h_k`` (or the mean over
    response positions when ``normalize``: ln-CHES). ``h`` ``(N, T, D)``, ``m`` ``(N, T)``."""
    mp, mn = np.asarray(m_pos, np.float64), np.asarray(m_neg, np.float64)
    hp = np.einsum("nt,ntd->nd", mp, np.asarray(h_pos, np.float64))
    hn = np.einsum("nt,ntd->nd", mn, np.asarray(h_neg, np.float64))
    if normalize:
        hp = hp / mp.sum(1, keepdims=True)
        hn = hn / mn.sum(1, keepdims=True)
    return np.sum(hp * hn, 1) - np.sum(hp * hp, 1)


def _logp_after(params, lm, deltas, pos, neg, batch: int = 8) -> np.ndarray:
    """``(N, 2)``: log π(y⁺), log π(y⁻) of pair i at ``θ + deltas[i]``."""
    flat, _ = flat_params(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.prod(l.shape)) for l in leaves]
    shapes = [l.shape for l in leaves]
    model = TransformerLM(lm)

    @jax.jit
    def run(deltas, tokens, targets, mask):
        def one(delta, tok, tgt, msk):
            parts, off = [], 0
            for size, shape in zip(sizes, shapes):
                parts.append((flat[off : off + size] + delta[off : off + size]).reshape(shape))
                off += size
            p = jax.tree_util.tree_unflatten(treedef, parts)
            return losses.sequence_logprob(model.apply({"params": p}, tok), tgt, msk)

        return jax.vmap(one)(deltas, tokens, targets, mask)

    stack = lambda k: np.stack([pos[k], neg[k]], 1)  # (N, 2, T)
    tok, tgt, msk = stack("tokens"), stack("targets"), stack("mask")
    n = tok.shape[0]
    out = []
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        d, a, b, c = deltas[sl], tok[sl], tgt[sl], msk[sl]
        m = d.shape[0]
        if m < batch:
            d, a, b, c = (
                np.concatenate([x, np.repeat(x[-1:], batch - m, 0)]) for x in (d, a, b, c)
            )
        out.append(np.asarray(run(jnp.asarray(d, flat.dtype), a, b, c), np.float64)[:m])
    return np.concatenate(out)


def measure_pairs(
    params, lm, pos: dict, neg: dict, *, beta: float, eta: float | None, step_nats: float = 0.5
) -> dict:
    """The per-pair measurements of the module docstring, each ``(N,)`` float64, and ``eta``
    (the step size used: ``eta``, or with None the one that makes the median predicted
    ``|Δ⁺| + |Δ⁻|`` equal ``step_nats``)."""
    gp = sequence_grads(params, lm, pos)
    gn = sequence_grads(params, lm, neg)
    dot = np.sum(gp * gn, 1)
    sq_p, sq_n = np.sum(gp * gp, 1), np.sum(gn * gn, 1)
    if eta is None:
        eta = step_nats / float(np.median(beta / 2.0 * (np.abs(sq_p - dot) + np.abs(dot - sq_n))))
    c = eta * beta / 2.0
    deltas = c * (gp - gn)
    del gp, gn
    lp0 = np.stack([T.sequence_logprobs(params, lm, pos), T.sequence_logprobs(params, lm, neg)], 1)
    lp1 = _logp_after(params, lm, deltas, pos, neg)
    hp, _ = hidden_and_logits(params, lm, pos["tokens"])
    hn, _ = hidden_and_logits(params, lm, neg["tokens"])
    return {
        "dot": dot,
        "norm_pos": np.sqrt(sq_p),
        "norm_neg": np.sqrt(sq_n),
        "cos": dot / np.sqrt(sq_p * sq_n),
        "pred_pos": c * (sq_p - dot),
        "pred_neg": c * (dot - sq_n),
        "act_pos": lp1[:, 0] - lp0[:, 0],
        "act_neg": lp1[:, 1] - lp0[:, 1],
        "logp_pos": lp0[:, 0],
        "logp_neg": lp0[:, 1],
        "ches": ches(hp, pos["mask"], hn, neg["mask"]),
        "ln_ches": ches(hp, pos["mask"], hn, neg["mask"], normalize=True),
        "len_pos": np.asarray(pos["mask"]).sum(1).astype(np.float64),
        "len_neg": np.asarray(neg["mask"]).sum(1).astype(np.float64),
        "eta": float(eta),
    }
