"""Finetuning losses as functions of logits (arXiv 2407.10490, §3 and Figure 2). Each returns a
per-example loss ``(N,)``.

Conventions: sequence logits ``(N, T, V)`` with ``targets[n, t]`` the token that the logits at
position ``t`` predict (already shifted) and ``mask[n, t]`` True on response positions only;
classifier logits ``(N, V)`` with ``targets (N,)``. ``r± = log π(y±|x) − log π_ref(y±|x)``.
The residual G of each loss comes from ``jax.grad`` (see ``ldjax.G``); the closed forms of
the paper (arXiv 2407.10490, §3) are what the tests check it against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldjax._src import validate

# Every loss checks its arguments first (ldjax._src.validate.loss_inputs): shapes and dtypes
# always (at trace time inside jit: free), values (targets in [0, V), finiteness, β > 0) when
# they are concrete. The engine's entry points check the values before they trace a loss.


def _token_logprobs(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.asarray(targets)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _sequence_logprob(logits, targets, mask):
    lp = _token_logprobs(logits, targets)
    if lp.ndim == 1:
        return lp if mask is None else lp * mask
    if mask is not None:
        lp = lp * jnp.asarray(mask).astype(lp.dtype)
    return jnp.sum(lp, axis=-1)


@validate.register_loss("token_logprobs")
def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log π(y_t) per position: ``(N, T, V), (N, T) -> (N, T)`` (or ``(N, V), (N,) -> (N,)``).

    Raises:
      ValueError: targets not integer, not shaped like the logits without V, or outside
        ``[0, V)``; non-finite logits.
    """
    validate.loss_inputs("token_logprobs", (logits,), dict(targets=targets))
    return _token_logprobs(logits, targets)


@validate.register_loss("sequence_logprob")
def sequence_logprob(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Sequence log-probability ``Σ_t mask_t log π(y_t)``: ``(N, T, V) -> (N,)``.

    Classifier logits ``(N, V)`` with targets ``(N,)`` give ``log π(y)`` per example.

    Raises:
      ValueError: as :func:`token_logprobs`, or a mask not shaped like the targets.
    """
    validate.loss_inputs("sequence_logprob", (logits,), dict(targets=targets, mask=mask))
    return _sequence_logprob(logits, targets, mask)


@validate.register_loss("sft")
def sft(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """SFT / cross-entropy: ``−Σ_l log π(y⁺_l)``, per example ``(N,)``. G = π⁺ − y⁺.

    Raises:
      ValueError: targets not integer, not shaped like the logits without V, or outside
        ``[0, V)``; a mask not shaped like the targets; non-finite logits (values: when concrete).

    Examples:
      >>> import jax.numpy as jnp
      >>> from ldjax import losses
      >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> round(float(losses.sft(z, jnp.array([1]))[0]), 4)         # −log 0.25
      1.3863
    """
    validate.loss_inputs("sft", (logits,), dict(targets=targets, mask=mask))
    return -_sequence_logprob(logits, targets, mask)


def _margins(
    logits_pos, logits_neg, targets_pos, targets_neg, mask_pos, mask_neg, ref_logp_pos, ref_logp_neg
):
    r_pos = _sequence_logprob(logits_pos, targets_pos, mask_pos) - ref_logp_pos
    r_neg = _sequence_logprob(logits_neg, targets_neg, mask_neg) - ref_logp_neg
    return r_pos, r_neg


def _check_pair(loss, logits_pos, logits_neg, **kwargs):
    validate.loss_inputs(loss, (logits_pos, logits_neg), kwargs)


@validate.register_loss("dpo")
def dpo(
    logits_pos,
    logits_neg,
    *,
    targets_pos,
    targets_neg,
    ref_logp_pos,
    ref_logp_neg,
    mask_pos=None,
    mask_neg=None,
    beta: float = 0.1,
) -> jax.Array:
    """DPO: ``−log σ(β(r⁺ − r⁻))``, ``(N,)``.

    G⁺ = β(1−a)(π⁺ − y⁺), G⁻ = −β(1−a)(π⁻ − y⁻), a = σ(β(r⁺ − r⁻)).

    Raises:
      ValueError: as :func:`sft` for each branch; the two branches' batch sizes or V differ;
        ``ref_logp_*`` not ``(N,)`` or non-finite; β not a finite number > 0. The other losses of
        the family check the same (IPO and SPPO: β > 0, SPPO's c > 0; SLiC: δ finite, λ ≥ 0).

    Examples:
      At the first step (the policy is the reference) every pair's loss is log 2:

      >>> import jax.numpy as jnp
      >>> from ldjax import losses
      >>> z = jnp.zeros((2, 4, 5))                           # 2 pairs, T 4, V 5
      >>> y, m = jnp.zeros((2, 4), int), jnp.ones((2, 4), bool)
      >>> ref = losses.sequence_logprob(z, y, m)
      >>> kw = dict(targets_pos=y, targets_neg=y + 1, mask_pos=m, mask_neg=m,
      ...           ref_logp_pos=ref, ref_logp_neg=ref)
      >>> [round(v, 4) for v in losses.dpo(z, z, **kw).tolist()]
      [0.6931, 0.6931]
    """
    _check_pair(
        "dpo",
        logits_pos,
        logits_neg,
        targets_pos=targets_pos,
        targets_neg=targets_neg,
        mask_pos=mask_pos,
        mask_neg=mask_neg,
        ref_logp_pos=ref_logp_pos,
        ref_logp_neg=ref_logp_neg,
        beta=beta,
    )
    r_pos, r_neg = _margins(
        logits_pos,
        logits_neg,
        targets_pos,
        targets_neg,
        mask_pos,
        mask_neg,
        ref_logp_pos,
        ref_logp_neg,
    )
    return -jax.nn.log_sigmoid(beta * (r_pos - r_neg))


@validate.register_loss("ipo")
def ipo(
    logits_pos,
    logits_neg,
    *,
    targets_pos,
    targets_neg,
    ref_logp_pos,
    ref_logp_neg,
    mask_pos=None,
    mask_neg=None,
    beta: float = 0.1,
) -> jax.Array:
    """IPO: ``(r⁺ − r⁻ − 1/(2β))²``, ``(N,)``. G⁺ = 2(1/(2β) − h)(π⁺ − y⁺), h = r⁺ − r⁻."""
    _check_pair(
        "ipo",
        logits_pos,
        logits_neg,
        targets_pos=targets_pos,
        targets_neg=targets_neg,
        mask_pos=mask_pos,
        mask_neg=mask_neg,
        ref_logp_pos=ref_logp_pos,
        ref_logp_neg=ref_logp_neg,
        beta=beta,
    )
    r_pos, r_neg = _margins(
        logits_pos,
        logits_neg,
        targets_pos,
        targets_neg,
        mask_pos,
        mask_neg,
        ref_logp_pos,
        ref_logp_neg,
    )
    return (r_pos - r_neg - 1.0 / (2.0 * beta)) ** 2


@validate.register_loss("slic")
def slic(
    logits_pos,
    logits_neg,
    *,
    targets_pos,
    targets_neg,
    mask_pos=None,
    mask_neg=None,
    delta: float = 1.0,
    lam: float = 0.0,
    ref_logp_pos=None,
    ref_logp_neg=None,
) -> jax.Array:
    """SLiC-HF: ``max(0, δ − (log π(y⁺) − log π(y⁻))) + λ·SFT(y_ref)``, ``(N,)``.

    The regulariser's target y_ref is the chosen response y⁺ (SLiC-HF's SFT target), so
    G⁺ = (𝟙[active] + λ)(π⁺ − y⁺) and G⁻ = −𝟙[active](π⁻ − y⁻). No reference model enters
    (``ref_logp_*`` are accepted, checked and ignored so every DPO-family loss takes the same
    arguments; any other keyword, β included, is an error).
    """
    _check_pair(
        "slic",
        logits_pos,
        logits_neg,
        targets_pos=targets_pos,
        targets_neg=targets_neg,
        mask_pos=mask_pos,
        mask_neg=mask_neg,
        ref_logp_pos=ref_logp_pos,
        ref_logp_neg=ref_logp_neg,
        delta=delta,
        lam=lam,
    )
    lp_pos = _sequence_logprob(logits_pos, targets_pos, mask_pos)
    lp_neg = _sequence_logprob(logits_neg, targets_neg, mask_neg)
    return jnp.maximum(0.0, delta - (lp_pos - lp_neg)) - lam * lp_pos


@validate.register_loss("sppo")
def sppo(
    logits_pos,
    logits_neg,
    *,
    targets_pos,
    targets_neg,
    ref_logp_pos,
    ref_logp_neg,
    mask_pos=None,
    mask_neg=None,
    beta: float = 0.1,
    c: float | None = None,
) -> jax.Array:
    """SPPO (hard labels): ``(r⁺ − c/2)² + (r⁻ + c/2)²`` with ``c = 1/β`` by default, ``(N,)``.

    G⁺ = 2(c/2 − r⁺)(π⁺ − y⁺), G⁻ = −2(r⁻ + c/2)(π⁻ − y⁻) (arXiv 2407.10490, §3 and Figure 2).
    """
    _check_pair(
        "sppo",
        logits_pos,
        logits_neg,
        targets_pos=targets_pos,
        targets_neg=targets_neg,
        mask_pos=mask_pos,
        mask_neg=mask_neg,
        ref_logp_pos=ref_logp_pos,
        ref_logp_neg=ref_logp_neg,
        beta=beta,
        c=c,
    )
    c = 1.0 / beta if c is None else c
    r_pos, r_neg = _margins(
        logits_pos,
        logits_neg,
        targets_pos,
        targets_neg,
        mask_pos,
        mask_neg,
        ref_logp_pos,
        ref_logp_neg,
    )
    return (r_pos - c / 2.0) ** 2 + (r_neg + c / 2.0) ** 2


PAIRWISE = {"dpo": dpo, "ipo": ipo, "slic": slic, "sppo": sppo}
"""The DPO family: losses of a (y⁺, y⁻) pair, two logits arguments each."""
