"""The squeezing effect of a negative gradient on a single softmax (arXiv 2407.10490, §3.3 and
App. C).

Model: multiclass logistic regression with weights ``W`` of shape ``(d, V)``,
logits ``z = Wᵀx`` of shape ``(V,)`` and ``π = softmax(z)``.

A *negative-gradient* (NG) step on label ``y⁻`` is gradient **ascent** on the
cross-entropy ``CE(z, y⁻) = −log π(y⁻)``, i.e. gradient descent with rate ``η`` on

    L⁻(z) = log π(y⁻) = −CE(z, y⁻),        G = ∇_z L⁻ = e_{y⁻} − π   (residual, V)

so ``W' = W − η ∇_W L⁻ = W − η x Gᵀ = W + η x (π − e_{y⁻})ᵀ`` and, with
``η' = η‖x‖²``,

    z' = z − η' G = z + η'(π − e_{y⁻})
    π'_i / π_i = exp(η'(π_i − 𝟙[i=y⁻])) / Σ_j π_j exp(η'(π_j − 𝟙[j=y⁻]))

The step functions take ``G`` from ``jax.grad`` of a loss written on the logits
(no hand-written gradient); the closed forms above are what the tests check.

Core functions (:func:`negative_gradient_loss`, :func:`residual`,
:func:`negative_gradient_step`, :func:`ratio_formula`) are plain JAX and compute
in the caller's precision; wrap calls in ``with jax.enable_x64(True):`` for
float64.  The analysis drivers (:func:`run_cases`, :func:`random_instances`,
:func:`check_guarantees`, :func:`squeeze_measures`, :func:`trend_correlations`)
run under float64 themselves and return NumPy ``float64`` arrays.

Squeeze amount (the statistic used for the trend claims 4–6 of the paper (arXiv 2407.10490, §3.3
and App. C)). Let ``y*`` = argmax_{i≠y⁻} π_i and call the other classes ``B`` (bystanders,
all classes except ``y⁻`` and ``y*``).  Write ``q_B = π(B) / (1 − π(y⁻))`` for the
bystanders' share of the mass *not* on ``y⁻``.  The squeeze is

    S = log q_B − log q'_B   (≥ 0 exactly; 0 iff π is uniform off y⁻)

the log-factor by which the bystanders' share shrinks, i.e. how much of the
mass off ``y⁻`` is concentrated into ``y*``.  Because ``q'_i ∝ q_i exp(η'π_i)``
for ``i ≠ y⁻``, S grows monotonically with ``η'`` and falls monotonically with
``π(y⁻)`` for a fixed shape ``q``.  A secondary measure, the raw bystander
mass lost ``Σ_{i∈B} (π_i − π'_i)`` (negative when the step is benign), is also
reported.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldjax.experiments.stats import spearman
from ldjax.training.config import Config

__all__ = [
    "REFERENCE_SEED",
    "ToyConfig",
    "PRESETS",
    "CASE_SPECS",
    "negative_gradient_loss",
    "residual",
    "logits",
    "negative_gradient_step",
    "multi_label_step",
    "ratio_formula",
    "entropy",
    "reference_setup",
    "run_cases",
    "random_instances",
    "check_guarantees",
    "squeeze_measures",
    "spearman",
    "trend_correlations",
    "controlled_trends",
]

REFERENCE_SEED = 10086
"""Seed of the reference notebook (``np.random.seed(10086)`` + ``np.random.randn``)."""


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    """The toy experiment (``ldjax squeeze``).

    Attributes:
      draws: random instances for the guarantee and trend checks.
      seed: seed of the random instances.
      ref_seed: numpy seed of the reference cases (the paper's notebook: 10086).
      sweeps: base instances of the one-factor (controlled) sweeps.
    """

    draws: int = 10000
    seed: int = 0
    ref_seed: int = REFERENCE_SEED
    sweeps: int = 300

    def __post_init__(self):
        if not isinstance(self.draws, int) or self.draws < 3:
            raise ValueError(f"draws must be an int >= 3, got {self.draws!r}")
        if not isinstance(self.sweeps, int) or self.sweeps < 1:
            raise ValueError(f"sweeps must be an int >= 1, got {self.sweeps!r}")


PRESETS = {"default": ToyConfig(), "quick": ToyConfig(draws=2000, sweeps=60)}


def _x64(fn):
    """Run ``fn`` with ``jax_enable_x64`` switched on (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper


def _concrete_int(v) -> int | None:
    """``int(v)`` when ``v`` is concrete, ``None`` for a tracer."""
    try:
        return int(v)
    except TypeError:
        return None


# --------------------------------------------------------------------------- #
# Core: loss on logits, residual, one exact step, closed-form ratio
# --------------------------------------------------------------------------- #


def negative_gradient_loss(z: jax.Array, y_neg) -> jax.Array:
    """``L⁻(z) = log π(y⁻) = −CE(z, y⁻)``: descending it is the NG step.

    Args:
      z: logits ``(V,)``; masked-out classes may hold ``-inf``.
      y_neg: integer label ``y⁻`` (scalar).

    Returns:
      scalar ``log softmax(z)[y⁻]``.
    """
    return jax.nn.log_softmax(z)[y_neg]


def residual(z: jax.Array, y_neg) -> jax.Array:
    """Residual ``G = ∇_z L⁻ = e_{y⁻} − π``, ``(V,)``, by ``jax.grad`` (no closed form)."""
    return jax.grad(negative_gradient_loss)(z, y_neg)


def logits(W: jax.Array, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``z = Wᵀx``: ``W (d, V)``, ``x (d,)`` -> ``(V,)``; ``mask (V,)`` bool sets absent classes to
    ``-inf``."""
    z = W.T @ x
    if mask is not None:
        z = jnp.where(mask, z, -jnp.inf)
    return z


def _check_single(W, x, mask, label, name) -> None:
    if np.ndim(W) != 2:
        raise ValueError(f"W must have shape (d, V); got shape {np.shape(W)}")
    d, V = np.shape(W)
    if np.shape(x) != (d,):
        raise ValueError(
            f"x must have shape (d,) = ({d},) to match W {np.shape(W)}; got {np.shape(x)}"
        )
    if mask is not None and np.shape(mask) != (V,):
        raise ValueError(f"mask must have shape (V,) = ({V},); got {np.shape(mask)}")
    if label is not None:
        if np.ndim(label) != 0:
            raise ValueError(f"{name} must be a scalar label; got shape {np.shape(label)}")
        v = _concrete_int(label)
        if v is not None and not 0 <= v < V:
            raise ValueError(f"{name}={v} is out of range for V={V} classes")


def negative_gradient_step(
    W: jax.Array, x: jax.Array, y_neg, lr, mask: jax.Array | None = None
) -> jax.Array:
    """One exact SGD step of rate ``η = lr`` descending ``L⁻ = log π(y⁻)`` (the negative gradient).

    ``W' = W − η ∇_W log π(y⁻ | x)``, gradient by ``jax.grad``; equals
    ``W + η x (π − e_{y⁻})ᵀ``.

    Args:
      W: weights ``(d, V)``.
      x: input ``(d,)``.
      y_neg: label ``y⁻`` (scalar int).
      lr: learning rate ``η`` (scalar).
      mask: optional ``(V,)`` bool; classes outside it are absent (logit ``-inf``,
        their columns of ``W`` are left unchanged).

    Returns:
      ``W'`` of shape ``(d, V)``.
    """
    _check_single(W, x, mask, y_neg, "y_neg")
    grad_W = jax.grad(lambda w: negative_gradient_loss(logits(w, x, mask), y_neg))(W)
    return W - lr * grad_W


def multi_label_step(W: jax.Array, x: jax.Array, labels, lr) -> jax.Array:
    """The reference notebook's "peaky" construction: one step toward a multi-hot target.

    Descends ``L(z) = logsumexp(z) − Σ_{k∈S} z_k`` whose gradient on ``z`` is
    ``π − y_S`` (``y_S`` multi-hot over the label set ``S``), so
    ``W' = W − η x (π − y_S)ᵀ`` — exactly the reference's ``get_W_K``.  This is
    neither the summed CE over ``S`` (gradient ``|S|π − y_S``) nor the mean CE
    (``π − y_S/|S|``).

    Args:
      W: ``(d, V)``; x: ``(d,)``; labels: sequence of ints ``S``; lr: ``η``.

    Returns:
      ``W'`` of shape ``(d, V)``.
    """
    _check_single(W, x, None, None, "labels")
    V = np.shape(W)[1]
    labels = np.asarray(labels, dtype=int).reshape(-1)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= V:
        raise ValueError(f"labels must be non-empty and in [0, {V}); got {labels.tolist()}")
    y = jnp.zeros(V, dtype=jnp.result_type(W)).at[labels].set(1.0)

    def loss(w):
        z = logits(w, x)
        return jax.nn.logsumexp(z) - jnp.dot(y, z)

    return W - lr * jax.grad(loss)(W)


def ratio_formula(z: jax.Array, y_neg, eta_eff) -> jax.Array:
    """Closed-form ``π'/π`` after an NG step with effective rate ``η' = η‖x‖²``.

    ``π'_i/π_i = exp(η'(π_i − 𝟙[i=y⁻])) / Σ_j π_j exp(η'(π_j − 𝟙[j=y⁻]))``,
    computed in log space.

    Args:
      z: logits ``(..., V)`` (``-inf`` for absent classes; their ratio is meaningless).
      y_neg: labels ``(...)`` int.
      eta_eff: ``η'`` of shape ``(...)`` (or broadcastable).

    Returns:
      ratio ``(..., V)``.
    """
    z = jnp.asarray(z)
    log_pi = jax.nn.log_softmax(z, axis=-1)
    pi = jnp.exp(log_pi)
    onehot = jax.nn.one_hot(y_neg, z.shape[-1], dtype=pi.dtype)
    a = jnp.asarray(eta_eff, dtype=pi.dtype)[..., None] * (pi - onehot)
    return jnp.exp(a - jax.nn.logsumexp(a + log_pi, axis=-1, keepdims=True))


def entropy(pi) -> np.ndarray:
    """Shannon entropy ``H(π) = −Σ π log π`` (nats) over the last axis, ``0 log 0 = 0``."""
    pi = np.asarray(pi, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(pi > 0, pi * np.log(np.where(pi > 0, pi, 1.0)), 0.0)
    return -t.sum(axis=-1)


# --------------------------------------------------------------------------- #
# Reference toy cases (arXiv 2407.10490, §3.3 and App. C)
# --------------------------------------------------------------------------- #


def reference_setup(seed: int = REFERENCE_SEED) -> dict[str, np.ndarray]:
    """Weights and inputs of the reference toy, drawn exactly as the reference notebook.

    Uses ``np.random.RandomState(seed).randn`` (the same stream as
    ``np.random.seed(seed); np.random.randn``) without touching global state, in
    the notebook's order::

        x         = randn(4, 1)                        # d = 4
        W_uniform = randn(4, 50)                       # unused here; keeps the stream aligned
        W_flat    = 1 + 0.05 * randn(4, 50)
        W_peaky   = multi_label_step(randn(4, 50), x, labels 5..12, lr 1)
        x_large   = randn(50, 1)                       # d = 50
        W_large   = 0.5 * randn(50, 1000)              # V = 1000

    Returns:
      dict of float64 arrays: ``x (4,)``, ``W_uniform, W_flat, W_peaky (4, 50)``,
      ``x_large (50,)``, ``W_large (50, 1000)``.
    """
    rs = np.random.RandomState(seed)
    d, V = 4, 50
    x = rs.randn(d, 1)[:, 0]
    W_uniform = rs.randn(d, V)
    W_flat = np.ones((d, V)) + rs.randn(d, V) * 0.05
    W0 = rs.randn(d, V)
    with jax.enable_x64(True):
        peaky = jax.jit(lambda w, v: multi_label_step(w, v, list(range(5, 13)), 1.0))
        W_peaky = np.asarray(peaky(jnp.asarray(W0), jnp.asarray(x)))
    x_large = rs.randn(50, 1)[:, 0]
    W_large = rs.randn(50, 1000) * 0.5
    return dict(
        x=x, W_uniform=W_uniform, W_flat=W_flat, W_peaky=W_peaky, x_large=x_large, W_large=W_large
    )


def _softmax_np(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_jit_step = jax.jit(negative_gradient_step)


def _case_stats(W, x, y_neg, lr) -> dict[str, Any]:
    W, x = np.asarray(W, dtype=np.float64), np.asarray(x, dtype=np.float64)
    with jax.enable_x64(True):
        W_new = np.asarray(_jit_step(jnp.asarray(W), jnp.asarray(x), int(y_neg), float(lr)))
    z, z_new = W.T @ x, W_new.T @ x
    pi, pi_new = _softmax_np(z), _softmax_np(z_new)
    masked = pi.copy()
    masked[y_neg] = -np.inf
    y_star = int(np.argmax(masked))
    others = np.ones(pi.size, bool)
    others[y_neg] = False
    bystanders = others.copy()
    bystanders[y_star] = False
    rose = pi_new > pi
    eta_eff = float(lr) * float(np.dot(np.asarray(x), np.asarray(x)))
    qb, qb_new = (
        pi[bystanders].sum() / (1 - pi[y_neg]),
        pi_new[bystanders].sum() / (1 - pi_new[y_neg]),
    )
    return dict(
        V=int(pi.size),
        d=int(np.asarray(x).size),
        lr=float(lr),
        y_neg=int(y_neg),
        y_star=y_star,
        eta_eff=eta_eff,
        pi_before=pi,
        pi_after=pi_new,
        entropy_before=float(entropy(pi)),
        entropy_after=float(entropy(pi_new)),
        argmax_before=int(np.argmax(pi)),
        argmax_after=int(np.argmax(pi_new)),
        max_prob_before=float(pi.max()),
        max_prob_after=float(pi_new.max()),
        pi_neg_before=float(pi[y_neg]),
        pi_neg_after=float(pi_new[y_neg]),
        pi_star_before=float(pi[y_star]),
        pi_star_after=float(pi_new[y_star]),
        n_others_rose=int(rose[others].sum()),
        n_others_fell=int((pi_new < pi)[others].sum()),
        all_but_star_fell=bool(np.all((pi_new < pi)[others & (np.arange(pi.size) != y_star)])),
        squeeze=float(np.log(qb) - np.log(qb_new)),
        bystander_mass_lost=float(pi[bystanders].sum() - pi_new[bystanders].sum()),
    )


CASE_SPECS = {
    "case1": dict(
        weights="W_flat",
        x="x",
        y_neg=42,
        lr=0.3,
        title="flat π, NG on label 42 (benign: others rise slightly)",
    ),
    "case2": dict(
        weights="W_peaky",
        x="x",
        y_neg="peak",
        lr=0.5,
        title="peaky π, NG on the peak (on-policy: mass spreads)",
    ),
    "case3": dict(
        weights="W_peaky",
        x="x",
        y_neg=42,
        lr=0.5,
        title="peaky π, NG on valley label 42 (squeeze into argmax)",
    ),
    "case4": dict(
        weights="W_large",
        x="x_large",
        y_neg=100,
        lr=1.0,
        title="V=1000, d=50, W~0.5·N(0,1), NG on label 100 (entropy collapses)",
    ),
    "case2_ref11": dict(
        weights="W_peaky",
        x="x",
        y_neg=11,
        lr=0.5,
        title="peaky π, NG on label 11 (the reference notebook's 'peak' case)",
    ),
}
"""The reference cases.  ``case2`` puts the NG on the actual argmax of the peaky π
(label 8 with seed 10086); the reference notebook used label 11 there, which is not
the peak (π ≈ 0.029, third largest) and squeezes instead — kept as ``case2_ref11``."""


@_x64
def run_cases(seed: int = REFERENCE_SEED) -> dict[str, dict[str, Any]]:
    """Run the reference cases of the paper (arXiv 2407.10490, §3.3 and App. C) (see
    :data:`CASE_SPECS`).

    Returns:
      ``{case_name: stats}``; stats hold ``pi_before/pi_after (V,)`` and scalars:
      entropy, argmax / max prob, ``π(y⁻)``, ``π(y*)`` before/after, ``η'``,
      counts of the other classes that rose/fell, the squeeze ``S``.
    """
    setup = reference_setup(seed)
    out = {}
    for name, spec in CASE_SPECS.items():
        W, x = setup[spec["weights"]], setup[spec["x"]]
        y_neg = spec["y_neg"]
        if y_neg == "peak":
            y_neg = int(np.argmax(_softmax_np(W.T @ x)))
        stats = _case_stats(W, x, y_neg, spec["lr"])
        stats["title"] = spec["title"]
        out[name] = stats
    return out


# --------------------------------------------------------------------------- #
# Random instances and the guarantees
# --------------------------------------------------------------------------- #


@jax.jit
def _batched_step(W, x, y_neg, lr, mask):
    """``(B, d, V), (B, d), (B,), (B,), (B, V)`` -> logits before/after ``(B, V)``."""

    def one(W, x, y_neg, lr, mask):
        W_new = negative_gradient_step(W, x, y_neg, lr, mask)
        return logits(W, x, mask), logits(W_new, x, mask)

    return jax.vmap(one)(W, x, y_neg, lr, mask)


def _chunked_step(W, x, y_neg, lr, mask, chunk=2048):
    """NG step on ``n`` stacked instances, ``chunk`` at a time (last chunk padded: one compilation).

    ``W (n, d, V)``, ``x (n, d)``, ``y_neg, lr (n,)``, ``mask (n, V)`` -> logits
    ``z, z_new (n, V)`` float64.
    """
    n, _, V = W.shape
    chunk = max(1, int(chunk))  # fixed (not min(chunk, n)): one compiled shape for every n
    z, z_new = np.empty((n, V)), np.empty((n, V))
    with jax.enable_x64(True):
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            m = sl.stop - sl.start
            args = [W[sl], x[sl], y_neg[sl], lr[sl], mask[sl]]
            if m < chunk:
                args = [np.concatenate([a, np.repeat(a[:1], chunk - m, axis=0)]) for a in args]
            zc, znc = _batched_step(*[jnp.asarray(a) for a in args])
            z[sl], z_new[sl] = np.asarray(zc)[:m], np.asarray(znc)[:m]
    return z, z_new


def _check_range(name, rng, lo_min, integer=False):
    if len(rng) != 2 or not (lo_min <= rng[0] <= rng[1]):
        raise ValueError(f"{name} must be (lo, hi) with {lo_min} <= lo <= hi; got {rng}")
    if integer and any(int(r) != r for r in rng):
        raise ValueError(f"{name} must hold integers; got {rng}")


@_x64
def random_instances(
    n: int,
    seed: int = 0,
    V_range: tuple[int, int] = (3, 100),
    scale_range: tuple[float, float] = (0.05, 2.0),
    lr_range: tuple[float, float] = (0.01, 1.0),
    d: int = 8,
    chunk: int = 2048,
) -> dict[str, np.ndarray]:
    """Draw ``n`` random logistic-regression instances and take one NG step on each (vmapped).

    Per instance (``np.random.default_rng(seed)``): ``V ~ U{V_range}``;
    ``x ~ N(0, I_d)``; ``W = s·N(0,1)`` of shape ``(d, V)`` with peakiness scale
    (inverse temperature) ``s`` log-uniform in ``scale_range``; ``η`` log-uniform
    in ``lr_range``; ``y⁻`` uniform over the ``V`` classes.  Instances are padded
    to ``V_max = V_range[1]`` with a class mask; the step is
    :func:`negative_gradient_step` under ``jit(vmap)``, ``chunk`` draws at a time
    (the last chunk padded, so one compilation serves every ``n``).

    Returns:
      NumPy arrays: ``V (n,)`` int, ``mask (n, V_max)`` bool, float64 ``scale, lr,
      x_sqnorm, eta_eff (n,)`` (``η' = η‖x‖²``), ``y_neg (n,)`` int, logits ``z,
      z_new (n, V_max)`` before/after the step (``-inf`` outside the mask).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer; got {n}")
    _check_range("V_range", V_range, 2, integer=True)
    _check_range("scale_range", scale_range, 1e-12)
    _check_range("lr_range", lr_range, 1e-12)
    if int(d) != d or d < 1:
        raise ValueError(f"d must be a positive integer; got {d}")
    n, d, v_hi = int(n), int(d), int(V_range[1])
    rng = np.random.default_rng(seed)
    V = rng.integers(int(V_range[0]), v_hi + 1, size=n)
    scale = np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]), size=n))
    lr = np.exp(rng.uniform(np.log(lr_range[0]), np.log(lr_range[1]), size=n))
    y_neg = np.floor(rng.uniform(size=n) * V).astype(np.int64)
    x = rng.standard_normal((n, d))
    mask = np.arange(v_hi)[None, :] < V[:, None]
    W_dir = rng.standard_normal((n, d, v_hi))  # drawn whole; 8·n·d·V_max bytes
    z, z_new = _chunked_step(scale[:, None, None] * W_dir, x, y_neg, lr, mask, chunk)
    x_sqnorm = np.einsum("nd,nd->n", x, x)
    return dict(
        V=V,
        mask=mask,
        scale=scale,
        lr=lr,
        x_sqnorm=x_sqnorm,
        eta_eff=lr * x_sqnorm,
        y_neg=y_neg,
        z=z,
        z_new=z_new,
    )


_INSTANCE_FIELDS = ("mask", "y_neg", "eta_eff", "z", "z_new")


def _validate_instances(inst) -> None:
    missing = [k for k in _INSTANCE_FIELDS if k not in inst]
    if missing:
        raise ValueError(f"instances dict lacks fields {missing} (make it with random_instances)")
    n, V = np.shape(inst["z"])
    for k in ("mask", "z_new"):
        if np.shape(inst[k]) != (n, V):
            raise ValueError(f"instances['{k}'] has shape {np.shape(inst[k])}, expected {(n, V)}")
    for k in ("y_neg", "eta_eff"):
        if np.shape(inst[k]) != (n,):
            raise ValueError(f"instances['{k}'] has shape {np.shape(inst[k])}, expected {(n,)}")


def _log_softmax_np(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _y_star(log_pi, mask, y_neg) -> np.ndarray:
    rows = np.arange(log_pi.shape[0])
    lp = np.where(mask, log_pi, -np.inf)
    lp[rows, y_neg] = -np.inf
    return np.argmax(lp, axis=-1)


_jit_ratio = jax.jit(ratio_formula)


@_x64
def check_guarantees(inst: dict[str, np.ndarray]) -> dict[str, Any]:
    """Check claims 1–3 of the paper (arXiv 2407.10490, §3.3 and App. C) on every draw of
    :func:`random_instances`.

    Compares the *actual* update (softmax of ``z_new``) with the closed form
    (:func:`ratio_formula`), in float64.

    Returns:
      dict with ``n``; ``pi_neg_fell`` (draws where ``π(y⁻)`` fell);
      ``pi_star_rose`` (``π(y*)`` rose, ``y* = argmax_{i≠y⁻} π_i``);
      ``threshold_ordered`` (draws where the classes ``i ≠ y⁻`` that rose are
      exactly those with ``π_i`` above some threshold — "rich get richer");
      ``all_others_fell`` (draws where every class but ``y*`` fell);
      ``ratio_max_rel_err`` = max abs(formula/actual − 1) and ``ratio_max_log_err``
      = max abs(log formula − log actual) over all present classes.
    """
    _validate_instances(inst)
    mask = np.asarray(inst["mask"], bool)
    y_neg = np.asarray(inst["y_neg"], int)
    eta = np.asarray(inst["eta_eff"], np.float64)
    lp, lp_new = _log_softmax_np(inst["z"]), _log_softmax_np(inst["z_new"])
    n = lp.shape[0]
    rows = np.arange(n)
    with np.errstate(invalid="ignore"):
        dlog = np.where(mask, lp_new - lp, 0.0)  # actual log(π'/π)
    y_star = _y_star(lp, mask, y_neg)
    fell_neg = dlog[rows, y_neg] < 0
    rose_star = dlog[rows, y_star] > 0

    formula = np.asarray(_jit_ratio(jnp.asarray(inst["z"]), jnp.asarray(y_neg), jnp.asarray(eta)))
    with np.errstate(divide="ignore"):
        log_formula = np.log(formula)
    log_err = np.where(mask, np.abs(log_formula - dlog), 0.0)
    rel_err = np.where(mask, np.abs(formula / np.exp(dlog) - 1.0), 0.0)

    # rich get richer: among i ≠ y⁻, min π of risers > max π of fallers.
    others = mask.copy()
    others[rows, y_neg] = False
    rose = (dlog > 0) & others
    fell = (dlog < 0) & others
    lp_masked_r = np.where(rose, lp, np.inf).min(axis=-1)
    lp_masked_f = np.where(fell, lp, -np.inf).max(axis=-1)
    ordered = lp_masked_r > lp_masked_f
    not_star = others.copy()
    not_star[rows, y_star] = False
    all_others_fell = np.all(~not_star | fell, axis=-1)
    return dict(
        n=int(n),
        pi_neg_fell=int(fell_neg.sum()),
        pi_star_rose=int(rose_star.sum()),
        threshold_ordered=int(ordered.sum()),
        all_others_fell=int(all_others_fell.sum()),
        ratio_max_rel_err=float(rel_err.max()),
        ratio_max_log_err=float(log_err.max()),
    )


# --------------------------------------------------------------------------- #
# Trends (claims 4–6)
# --------------------------------------------------------------------------- #


def squeeze_measures(inst: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-draw squeeze amounts and the three factors, each ``(n,)`` float64.

    Returns:
      ``squeeze`` — ``S = log q_B − log q'_B`` (module docstring);
      ``bystander_mass_lost`` — ``Σ_{i∈B} (π_i − π'_i)``;
      ``frac_bystanders_fell`` — share of bystanders whose π fell;
      ``pi_star_rise`` — ``π'(y*) − π(y*)``;
      factors ``max_prob`` (``max_i π_i``), ``neg_entropy`` (``−H(π)``),
      ``pi_neg`` (``π(y⁻)``), ``eta_eff`` (``η‖x‖²``).
    """
    _validate_instances(inst)
    mask = np.asarray(inst["mask"], bool)
    y_neg = np.asarray(inst["y_neg"], int)
    lp, lp_new = _log_softmax_np(inst["z"]), _log_softmax_np(inst["z_new"])
    pi, pi_new = np.exp(lp), np.exp(lp_new)
    rows = np.arange(pi.shape[0])
    y_star = _y_star(lp, mask, y_neg)
    B = mask.copy()
    B[rows, y_neg] = False
    B[rows, y_star] = False
    nB = B.sum(axis=-1)

    # log of the bystander share of mass off y⁻, via log-sum-exp for accuracy.
    def log_share(l):
        lb = np.where(B, l, -np.inf)
        m = lb.max(axis=-1)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            lsum = m + np.log(np.exp(lb - m[:, None]).sum(axis=-1))
        return lsum - np.log1p(-np.exp(l[rows, y_neg]))

    with np.errstate(invalid="ignore"):
        S = np.where(nB > 0, log_share(lp) - log_share(lp_new), 0.0)
    return dict(
        squeeze=S,
        bystander_mass_lost=np.where(B, pi - pi_new, 0.0).sum(axis=-1),
        frac_bystanders_fell=np.where(
            nB > 0, (B & (pi_new < pi)).sum(axis=-1) / np.maximum(nB, 1), 0.0
        ),
        pi_star_rise=pi_new[rows, y_star] - pi[rows, y_star],
        max_prob=np.where(mask, pi, 0.0).max(axis=-1),
        neg_entropy=-entropy(np.where(mask, pi, 0.0)),
        pi_neg=pi[rows, y_neg],
        eta_eff=np.asarray(inst["eta_eff"], np.float64),
    )


TREND_FACTORS = {
    "max_prob": "peakiness max_i π_i (expect +)",
    "neg_entropy": "peakiness −H(π) (expect +)",
    "pi_neg": "π(y⁻) (expect −)",
    "eta_eff": "η' = η‖x‖² (expect +)",
}


def trend_correlations(inst: dict[str, np.ndarray]) -> dict[str, Any]:
    """Spearman correlations of the squeeze amounts with peakiness, ``π(y⁻)`` and ``η‖x‖²``.

    Marginal correlations over the draws of :func:`random_instances` (the
    factors vary jointly there; ``π(y⁻)`` is correlated with peakiness).

    Returns:
      ``{"n": n, "primary": "squeeze", "spearman": {measure: {factor: ρ}}}`` for the
      measures ``squeeze`` (primary), ``bystander_mass_lost``,
      ``frac_bystanders_fell``, ``pi_star_rise`` and factors :data:`TREND_FACTORS`.
    """
    m = squeeze_measures(inst)
    measures = ("squeeze", "bystander_mass_lost", "frac_bystanders_fell", "pi_star_rise")
    rho = {k: {f: spearman(m[k], m[f]) for f in TREND_FACTORS} for k in measures}
    return dict(n=int(m["squeeze"].size), primary="squeeze", spearman=rho)


@_x64
def controlled_trends(
    n_base: int = 300,
    seed: int = 0,
    k: int = 8,
    V: int = 50,
    d: int = 8,
    scale_range: tuple[float, float] = (0.05, 2.0),
    lr_range: tuple[float, float] = (0.01, 1.0),
    pi_neg_range: tuple[float, float] = (1e-4, 0.9),
    return_curves: bool = False,
) -> dict[str, Any]:
    """Ceteris-paribus trends: sweep one factor per base instance, hold the rest.

    For each of ``n_base`` base instances (``x ~ N(0, I_d)``, direction
    ``W₀ ~ N(0,1) (d, V)``, scale ``s₀``, rate ``η₀``, label ``y⁻₀`` drawn as in
    :func:`random_instances`) three sweeps of ``k`` points each:

    - ``peakiness``: ``W = s·W₀`` over ``s`` geometric in ``scale_range`` (factor ``max π``);
    - ``pi_neg``: only the logit of ``y⁻`` moves (``W[:, y⁻] += δ x/‖x‖²``) so that
      ``π(y⁻)`` runs geometrically over ``pi_neg_range`` while the distribution
      ``q`` over the other classes stays fixed (factor ``π(y⁻)``);
    - ``eta_eff``: ``η`` geometric in ``lr_range`` (factor ``η‖x‖²``).

    Returns:
      per sweep: ``mean_rho`` (mean within-instance Spearman of the squeeze ``S``
      with the factor), ``frac_expected_sign`` (share of base instances whose ρ
      has the expected sign) and ``frac_monotone`` (share with ``|ρ| = 1``);
      plus ``n_base``, ``k``, ``V``, ``d``.  With ``return_curves`` each sweep also
      holds ``factor_values`` and ``squeeze_values``, float64 ``(n_base, k)``.
    """
    if n_base < 1 or k < 3 or V < 3 or d < 1:
        raise ValueError(f"need n_base >= 1, k >= 3, V >= 3, d >= 1; got {n_base}, {k}, {V}, {d}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_base, d))
    W0 = rng.standard_normal((n_base, d, V))
    s0 = np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]), size=n_base))
    lr0 = np.exp(rng.uniform(np.log(lr_range[0]), np.log(lr_range[1]), size=n_base))
    y0 = rng.integers(0, V, size=n_base)
    xs = np.einsum("nd,nd->n", x, x)
    grid_s = np.geomspace(*scale_range, k)
    grid_lr = np.geomspace(*lr_range, k)
    grid_p = np.geomspace(*pi_neg_range, k)
    # π(y⁻) = p with the other logits fixed: z_y = log(p/(1−p)) + logsumexp_{j≠y} z_j.
    Ws = W0 * s0[:, None, None]
    z0 = np.einsum("ndv,nd->nv", Ws, x)
    rows = np.arange(n_base)
    z_rest = z0.copy()
    z_rest[rows, y0] = -np.inf
    mx = z_rest.max(axis=-1)
    lse_rest = mx + np.log(np.exp(z_rest - mx[:, None]).sum(axis=-1))
    target = np.log(grid_p / (1 - grid_p))[None, :] + lse_rest[:, None]  # (n_base, k)
    delta = target - z0[rows, y0][:, None]
    W_p = np.repeat(Ws, k, axis=0)
    W_p[np.arange(n_base * k), :, np.repeat(y0, k)] += delta.reshape(-1)[:, None] * np.repeat(
        x / xs[:, None], k, axis=0
    )

    rep = lambda a: np.repeat(a, k, axis=0)  # (n_base, ...) -> (n_base*k, ...)
    sweeps = {
        "peakiness": (
            "max_prob",
            +1,
            dict(W=rep(W0) * np.tile(grid_s, n_base)[:, None, None], y=rep(y0), lr=rep(lr0)),
        ),
        "pi_neg": ("pi_neg", -1, dict(W=W_p, y=rep(y0), lr=rep(lr0))),
        "eta_eff": (
            "eta_eff",
            +1,
            dict(W=rep(W0 * s0[:, None, None]), y=rep(y0), lr=np.tile(grid_lr, n_base)),
        ),
    }
    mask = np.ones((n_base * k, V), bool)
    out: dict[str, Any] = dict(n_base=int(n_base), k=int(k), V=int(V), d=int(d))
    for name, (factor, sign, a) in sweeps.items():
        z, z_new = _chunked_step(a["W"], rep(x), a["y"], a["lr"], mask)
        inst = dict(mask=mask, y_neg=a["y"], eta_eff=a["lr"] * rep(xs), z=z, z_new=z_new)
        m = squeeze_measures(inst)
        S, f = m["squeeze"].reshape(n_base, k), m[factor].reshape(n_base, k)
        rho = np.array(
            [
                spearman(S[i], f[i]) if np.ptp(S[i]) > 0 and np.ptp(f[i]) > 0 else np.nan
                for i in range(n_base)
            ]
        )
        ok = ~np.isnan(rho)
        out[name] = dict(
            factor=factor,
            expected_sign=sign,
            mean_rho=float(np.nanmean(rho)),
            frac_expected_sign=float(np.mean(sign * rho[ok] > 0)),
            frac_monotone=float(np.mean(sign * rho[ok] >= 1 - 1e-12)),
            n_defined=int(ok.sum()),
        )
        if return_curves:
            out[name].update(factor_values=f, squeeze_values=S)
    return out
