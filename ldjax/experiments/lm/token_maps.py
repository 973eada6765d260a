"""Token maps on the LM: which positions of a training response move which tokens of each probe.

For one tracked training record (x_u, y_u⁺, y_u⁻) and its probes (x_u's prompt joined with every
probe response, as in :mod:`ldjax.experiments.lm.one_step`), :func:`run_token_maps` computes

* the SFT step's map ``C[o, m, l]`` (:func:`ldjax.token_influence`) for every probe o, ranks the
  probes by the size of their total linear change ``|Σ_{m,l} C[o, m, l]|`` and keeps the K
  largest;
* the DPO step's two maps ``(C⁺, C⁻)`` on the same K probes (policy = reference, so G is the
  first step's).

:func:`token_map_figures` draws them: per kept probe a heatmap with the decoded tokens on both
axes, the training response coloured by each token's total push, and the DPO branches side by
side. Only the CLI writes files (``ldjax lm one-step --token-maps K``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldjax import losses, token_influence
from ldjax.data.preferences import encode_example
from ldjax.data.probes import probe_types
from ldjax.experiments.lm import plots
from ldjax.lm.model import make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer

__all__ = ["run_token_maps", "token_map_figures"]


def run_token_maps(
    params,
    config,
    record: dict,
    k: int,
    *,
    eta: float = 1e-6,
    beta: float = 0.1,
    tokenizer=None,
    float64: bool = True,
) -> dict:
    """The K most influential (probe, training sequence) token maps of one record.

    Args:
      params: the model's parameters; config: a :class:`ldjax.lm.config.PipelineConfig`.
      record: a probe record with ``prompt``, ``chosen``, ``rejected`` and probe responses.
      k: how many probes to keep (the K largest ``|Σ C|``), ``1 <= k``; capped at the number of
        probes.
      eta: the step size of the linear prediction (C is linear in η).
      beta: DPO's β.
      float64: compute in float64 (``jax.enable_x64`` inside this call only).
    Returns:
      A dict of numpy arrays and lists: ``types`` (all probe types), ``total`` (their
      ``Σ C``), ``kept`` (the K kept indices, most influential first), ``sft`` ``(K, T, T)``,
      ``dpo_pos``/``dpo_neg`` ``(K, T, T)``, the token arrays ``probe_targets``/``probe_mask``
      ``(K, T)``, ``u_targets``/``u_mask``/``neg_targets``/``neg_mask`` ``(T,)``, ``eta``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"--token-maps (k) must be an int >= 1, got {k!r}")
    for f in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(f), str):
            raise ValueError(f"record field {f!r} is missing or not a string")
    if float64:
        with jax.enable_x64(True):
            cfg64 = config.replace(model={"dtype": "float64"})
            return run_token_maps(
                params, cfg64, record, k, eta=eta, beta=beta, tokenizer=tokenizer, float64=False
            )
    tok = tokenizer or ByteTokenizer()
    lm = config.lm_config()
    kw = dict(max_len=lm.max_len, max_prompt_len=config.data.max_prompt_len)
    types = probe_types(record)
    u = encode_example(tok, record["prompt"], record["chosen"], **kw)
    neg = encode_example(tok, record["prompt"], record["rejected"], **kw)
    rows = [encode_example(tok, record["prompt"], record[t], **kw) for t in types]
    o = {f: np.stack([r[f] for r in rows]) for f in ("tokens", "targets", "mask")}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, lm.dtype), params)
    apply_fn = make_apply_fn(lm)
    x_o = jnp.asarray(o["tokens"])
    x_u, x_n = jnp.asarray(u["tokens"][None]), jnp.asarray(neg["tokens"][None])
    y_u, m_u = jnp.asarray(u["targets"][None]), jnp.asarray(u["mask"][None])
    y_n, m_n = jnp.asarray(neg["targets"][None]), jnp.asarray(neg["mask"][None])

    c_sft = token_influence(
        apply_fn,
        params,
        x_o,
        x_u,
        losses.sft,
        eta=eta,
        targets_o=o["targets"],
        mask_o=o["mask"],
        loss_kwargs=dict(targets=y_u, mask=m_u),
    )[:, 0]
    total = np.asarray(c_sft, np.float64).sum(axis=(1, 2))
    kept = np.argsort(-np.abs(total), kind="stable")[: min(k, len(types))]

    ref_pos = losses.sequence_logprob(apply_fn(params, x_u), y_u, m_u)
    ref_neg = losses.sequence_logprob(apply_fn(params, x_n), y_n, m_n)
    c_pos, c_neg = token_influence(
        apply_fn,
        params,
        x_o[kept],
        (x_u, x_n),
        losses.dpo,
        eta=eta,
        targets_o=o["targets"][kept],
        mask_o=o["mask"][kept],
        loss_kwargs=dict(
            targets_pos=y_u,
            targets_neg=y_n,
            mask_pos=m_u,
            mask_neg=m_n,
            ref_logp_pos=ref_pos,
            ref_logp_neg=ref_neg,
            beta=beta,
        ),
    )
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return {
        "types": types,
        "total": total,
        "kept": kept,
        "sft": f64(c_sft)[kept],
        "dpo_pos": f64(c_pos)[:, 0],
        "dpo_neg": f64(c_neg)[:, 0],
        "probe_targets": o["targets"][kept],
        "probe_mask": o["mask"][kept],
        "u_targets": u["targets"],
        "u_mask": u["mask"],
        "neg_targets": neg["targets"],
        "neg_mask": neg["mask"],
        "eta": float(eta),
    }


def token_map_figures(maps: dict, tokenizer=None, *, max_tokens: int = 48) -> dict:
    """``{name: Figure}`` for :func:`run_token_maps`'s result: per kept probe ``j`` (rank order)
    ``sft_map_{j}_{type}``, ``sft_push_{j}_{type}`` and ``dpo_maps_{j}_{type}``."""
    tok = tokenizer or ByteTokenizer()
    figs = {}
    for j, i in enumerate(maps["kept"]):
        t = maps["types"][i]
        pt, pm = maps["probe_targets"][j], maps["probe_mask"][j]
        figs[f"sft_map_{j}_{t}"] = plots.plot_token_map(
            maps["sft"][j],
            pt,
            pm,
            maps["u_targets"],
            maps["u_mask"],
            tok,
            max_tokens=max_tokens,
            title=f"SFT step on y_u⁺, probe {t!r}: C[m, l] (Σ = {maps['total'][i]:+.2e})",
        )
        figs[f"sft_push_{j}_{t}"] = plots.plot_token_push(
            maps["sft"][j],
            maps["u_targets"],
            maps["u_mask"],
            tok,
            title=f"y_u⁺ coloured by each token's total push on probe {t!r}",
        )
        figs[f"dpo_maps_{j}_{t}"] = plots.plot_dpo_token_maps(
            maps["dpo_pos"][j],
            maps["dpo_neg"][j],
            pt,
            pm,
            (maps["u_targets"], maps["u_mask"]),
            (maps["neg_targets"], maps["neg_mask"]),
            tok,
            max_tokens=max_tokens,
            title=f"One DPO step (policy = reference), probe {t!r}: the y⁺ and y⁻ terms",
        )
    return figs
