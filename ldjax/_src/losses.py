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


def _checked_margins(loss, logits_pos, logits_neg, **kwargs):
    """The inputs of a reference-relative pair loss checked (:func:`_check_pair`, hyper-parameters
    included), then its implicit rewards ``(r⁺, r⁻)`` (:func:`_margins`)."""
    _check_pair(loss, logits_pos, logits_neg, **kwargs)
    names = ("targets_pos", "targets_neg", "mask_pos", "mask_neg", "ref_logp_pos", "ref_logp_neg")
    return _margins(logits_pos, logits_neg, *(kwargs[n] for n in names))


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
    r_pos, r_neg = _checked_margins(
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
    r_pos, r_neg = _checked_margins(
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
    r_pos, r_neg = _checked_margins(
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
    return (r_pos - c / 2.0) ** 2 + (r_neg + c / 2.0) ** 2


PAIRWISE = {"dpo": dpo, "ipo": ipo, "slic": slic, "sppo": sppo}
"""The DPO family: losses of a (y⁺, y⁻) pair, two logits arguments each."""


# ----------------------------------------------------------------------------- GRPO family


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages of GRPO (Shao et al. 2024, arXiv 2402.03300, §4.1.2).

    ``rewards`` ``(N,)`` hold ``N/G`` consecutive groups of ``G = group_size`` sampled responses
    to one prompt each; ``A_i = (r_i − mean_g r) / (std_g r + eps)`` within its group (std with
    ddof 0). A group whose rewards are all equal gets ``A = 0`` (it teaches nothing).

    Raises:
      ValueError: ``rewards`` not 1-D real and finite, or ``N`` not a multiple of
        ``group_size``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from ldjax import losses
      >>> [round(a, 3) for a in losses.group_advantages(jnp.array([1., 0, 0, 0]), 4).tolist()]
      [1.732, -0.577, -0.577, -0.577]
    """
    r = jnp.asarray(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {r.shape}")
    validate.check_real_array(r, r.shape, "rewards", "one reward per sampled response")
    if not isinstance(group_size, int) or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(
            f"group_size must be an int >= 1 dividing N = {r.shape[0]}, got {group_size!r}"
        )
    g = r.astype(jnp.result_type(r.dtype, jnp.float32)).reshape(-1, group_size)
    a = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


def _grpo(logits, targets, mask, advantages, old_logp, clip_eps, weights, length_normalize):
    lp = _token_logprobs(logits, targets)  # (N, T)
    m = jnp.ones_like(lp) if mask is None else jnp.asarray(mask).astype(lp.dtype)
    old = jax.lax.stop_gradient(lp) if old_logp is None else jnp.asarray(old_logp, lp.dtype)
    ratio = jnp.exp(lp - old)
    a = jnp.asarray(advantages, lp.dtype)[:, None]
    surr = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    w = m if weights is None else m * jax.lax.stop_gradient(weights)
    per = jnp.sum(w * surr, axis=-1)
    if length_normalize:
        per = per / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return -per


@validate.register_loss("grpo")
def grpo(
    logits: jax.Array,
    *,
    targets: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    old_logp: jax.Array | None = None,
    clip_eps: float = 0.2,
    length_normalize: bool = True,
) -> jax.Array:
    """GRPO's clipped policy-gradient loss of sampled responses, per response ``(N,)``.

    .. math::
      L_n = -\\frac{1}{|y_n|} \\sum_t m_{n,t}\\, \\min\\big(\\rho_{n,t} A_n,\\
            \\mathrm{clip}(\\rho_{n,t}, 1-\\epsilon, 1+\\epsilon) A_n\\big),
      \\qquad \\rho_{n,t} = \\exp(\\log\\pi(y_{n,t}) - \\log\\pi_{old}(y_{n,t}))

    (Shao et al. 2024, arXiv 2402.03300, eq. 3, without the KL term). ``old_logp=None`` is the
    on-policy step (π_old = π, so ρ = 1 with the gradient of ``log π``); given ``(N, T)``
    per-token old log-probs, the ratio is clipped at ``1 ± clip_eps`` as in PPO.
    ``length_normalize=False`` sums over tokens instead of averaging (Dr. GRPO).

    G (on-policy, or ratio inside the clip range):
    ``G_{n,t} = (A_n ρ_{n,t} m_{n,t} / |y_n|)(π_{n,t} − e_{y_{n,t}})``; a token whose ratio is
    clipped (``A > 0, ρ > 1+ε`` or ``A < 0, ρ < 1−ε``) has ``G = 0``.

    Args:
      logits: ``(N, T, V)``: N sampled responses (groups of G consecutive rows, one prompt
        each, as :func:`group_advantages` expects).
      targets: ``(N, T)`` int, shifted; mask: ``(N, T)`` True on response positions.
      advantages: ``(N,)`` one per response (:func:`group_advantages` of the rewards).
      old_logp: ``(N, T)`` log π_old of each target token, or None (on-policy).
      clip_eps: ε of the ratio clip (> 0).
    Raises:
      ValueError: as :func:`sft`; advantages not ``(N,)``, old_logp not ``(N, T)``, either
        non-finite; clip_eps not > 0; logits not ``(N, T, V)``.

    Examples:
      On-policy, a response with advantage 1 has loss ``−1`` (ρ = 1), one with ``−1`` has ``+1``:

      >>> import jax.numpy as jnp
      >>> from ldjax import losses
      >>> z, y = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int)
      >>> losses.grpo(z, targets=y, advantages=jnp.array([1., -1.])).tolist()
      [-1.0, 1.0]
    """
    validate.loss_inputs(
        "grpo",
        (logits,),
        dict(
            targets=targets, mask=mask, advantages=advantages, old_logp=old_logp, clip_eps=clip_eps
        ),
    )
    return _grpo(logits, targets, mask, advantages, old_logp, clip_eps, None, length_normalize)


def nthr_weights(
    influence: jax.Array, advantages: jax.Array, tau: float = 1.0, down_weight: float = 0.5
) -> jax.Array:
    """NTHR-style token weights ``(N, T)``: ``down_weight`` on the tokens of responses with a
    negative advantage whose ``influence`` exceeds ``tau``, 1 elsewhere (see :func:`grpo_nthr`)."""
    a = jnp.asarray(advantages)[:, None]
    s = jnp.asarray(influence)
    hit = (a < 0) & (s > tau)
    return jnp.where(hit, jnp.asarray(down_weight, s.dtype), jnp.ones((), s.dtype))


def nthr_influence(
    hidden: jax.Array,
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    correct: jax.Array,
) -> jax.Array:
    """Each token's head-level influence on the correct responses of its group, ``(N, T)``.

    With ``h`` the last hidden state (the input of the linear head ``z = W h + b``) and
    ``r = e_y − π`` the gradient of ``log π(y_t)`` on the logits, ``∇_{W,b} log π(y_t) =
    (r hᵀ, r)``. The influence of token ``(n, t)`` on the anchors (the rows with ``correct``) is
    the head eNTK summed over the anchors' response tokens, normalised:

    .. math::
      s_{n,t} = \\frac{1}{\\bar s_C} \\sum_{m \\in C} \\frac{1}{|y_m|} \\sum_{t'} m_{m,t'}\\,
                (\\langle h_{n,t}, h_{m,t'} \\rangle + 1)\\langle r_{n,t}, r_{m,t'} \\rangle

    where ``s̄_C`` is the same sum averaged over the anchors' own tokens (so ``s = 1`` is "as
    aligned with the correct responses as an average correct token"). A GRPO step on a negative
    response (``A_n < 0``) changes the anchors' mean per-token-normalised log-probability by
    ``η A_n s_{n,t} s̄_C / |y_n|`` through the head at first order: ``s > 0`` tokens pull
    the correct responses down. This is the quantity NTHR (Deng et al. 2025, arXiv 2505.18830)
    thresholds, computed here from the head's gradient (the same eNTK ldjax decomposes, restricted
    to W and b). Gradients do not flow through it.

    Args:
      hidden: ``(N, T, D)`` last hidden states; logits: ``(N, T, V)``; targets, mask:
        ``(N, T)`` as for :func:`grpo`; correct: ``(N,)`` bool, the anchors (one group: the
        correct responses to the same prompt).
    Returns:
      ``(N, T)`` float, 0 at masked positions; all 0 when no row is correct.
    """
    h = jax.lax.stop_gradient(jnp.asarray(hidden))
    z = jax.lax.stop_gradient(jnp.asarray(logits))
    if h.ndim != 3 or h.shape[:2] != z.shape[:2]:
        raise ValueError(
            f"hidden has shape {h.shape}; expected (N, T, D) with (N, T) = {z.shape[:2]}"
        )
    validate.loss_inputs(
        "grpo", (z,), dict(targets=targets, mask=mask, advantages=jnp.zeros(z.shape[0]))
    )
    c = jnp.asarray(correct)
    if c.shape != (z.shape[0],):
        raise ValueError(f"correct has shape {c.shape}; expected ({z.shape[0]},)")
    m = jnp.asarray(mask).astype(z.dtype)
    r = jax.nn.one_hot(targets, z.shape[-1], dtype=z.dtype) - jax.nn.softmax(z, axis=-1)
    wa = m * c.astype(z.dtype)[:, None] / jnp.maximum(m.sum(-1, keepdims=True), 1.0)  # (N, T)
    anchor_w = jnp.einsum("nt,ntd,ntv->dv", wa, h, r)  # Σ w h ⊗ r
    anchor_b = jnp.einsum("nt,ntv->v", wa, r)
    s = jnp.einsum("ntd,dv,ntv->nt", h, anchor_w, r) + jnp.einsum("ntv,v->nt", r, anchor_b)
    n_anchor_tok = jnp.sum(m * c.astype(z.dtype)[:, None])
    ref = jnp.sum(s * m * c.astype(z.dtype)[:, None]) / jnp.maximum(n_anchor_tok, 1.0)
    s = jnp.where(ref > 0, s / jnp.where(ref > 0, ref, 1.0), 0.0)
    return s * m


@validate.register_loss("grpo_nthr")
def grpo_nthr(
    logits: jax.Array,
    *,
    targets: jax.Array,
    advantages: jax.Array,
    influence: jax.Array,
    mask: jax.Array | None = None,
    old_logp: jax.Array | None = None,
    clip_eps: float = 0.2,
    tau: float = 1.0,
    down_weight: float = 0.5,
    length_normalize: bool = True,
) -> jax.Array:
    """GRPO with NTHR-style token reweighting, per response ``(N,)``.

    :func:`grpo` with each token's term multiplied by ``w_{n,t}`` (:func:`nthr_weights`):
    ``w = down_weight`` where ``A_n < 0`` and ``influence_{n,t} > tau``, else 1. ``influence``
    is :func:`nthr_influence` (the token's head-eNTK alignment with the correct responses of its
    group, 1 = an average correct token's). The tokens of incorrect responses whose penalty would
    pull the correct responses down most are penalised less; correct responses and the other
    tokens are untouched. Deng et al. (2025, arXiv 2505.18830) propose this (NTHR) against lazy
    likelihood displacement; ldjax's variant is defined by the formula above (a fixed threshold
    on the normalised head-level influence and one down-weight), not a copy of their code.

    G: as :func:`grpo` with ``m_{n,t}`` replaced by ``w_{n,t} m_{n,t}`` (the weights are
    constants: no gradient flows through ``influence``).

    Raises:
      ValueError: as :func:`grpo`; influence not ``(N, T)`` or non-finite; tau not finite;
        down_weight outside ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from ldjax import losses
      >>> z, y = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), int)
      >>> s = jnp.array([[0., 0, 0], [2., 2, 0]])     # two tokens of the negative flagged
      >>> [round(v, 4) for v in losses.grpo_nthr(z, targets=y, advantages=jnp.array([1., -1.]),
      ...     influence=s, tau=1.0, down_weight=0.25).tolist()]
      [-1.0, 0.5]
    """
    validate.loss_inputs(
        "grpo_nthr",
        (logits,),
        dict(
            targets=targets,
            mask=mask,
            advantages=advantages,
            old_logp=old_logp,
            clip_eps=clip_eps,
            influence=influence,
            tau=tau,
            down_weight=down_weight,
        ),
    )
    w = nthr_weights(influence, advantages, tau, down_weight)
    return _grpo(logits, targets, mask, advantages, old_logp, clip_eps, w, length_normalize)


GROUP = {"grpo": grpo, "grpo_nthr": grpo_nthr}
"""The GRPO family: losses of a group of sampled responses, one logits argument."""
