"""The one-step decomposition Δlog π(x_o) = −η A(x_o) Σ_b K(x_o, x_b) G_b (Ren & Sutherland,
arXiv 2407.10490, §2–3)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ldjax._src import validate
from ldjax._src.entk import entk
from ldjax._src.entk_vp import kernel_vector_product
from ldjax._src.log_softmax_jacobian import A as log_softmax_jacobian
from ldjax._src.log_softmax_jacobian import apply_A
from ldjax._src.logit_gradient import G as logit_gradient
from ldjax._src.optimizer_update import preconditioner, update_parts
from ldjax._src.trainable import branches, trainable_fn


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "logits",
        "G",
        "delta_logits_terms",
        "loss_u",
        "delta_logits_carry",
        "delta_logits_remainder",
        "delta_logits_curvature",
        "delta_logits_update",
    ],
    meta_fields=["eta"],
)
@dataclasses.dataclass(frozen=True)
class Decomposition:
    """Predicted one-step change on x_o.

    Attributes:
      logits: ``(N_o, [T,] V)`` z(x_o) before the step.
      G: one residual ``(N_u, [T,] V)`` per branch of the loss (DPO family: ``(G⁺, G⁻)``).
      delta_logits_terms: the batch's own part of Δz per branch, ``(N_o, [T,] V)`` each:
        ``−η K(x_o, x_b) G_b`` for SGD; with an optimizer ``−K_P(x_o, x_b) G_b``, the eNTK
        ``K_P = J_o diag(p) J_bᵀ`` of the optimizer linearised at its state (the preconditioned
        gradient, :mod:`ldjax._src.optimizer_update`).
      loss_u: ``(N_u,)`` the loss on x_u before the step.
      eta: the step size η (None with an optimizer: it carries its own rate and schedule).
      delta_logits_carry: with an optimizer, ``J_o U(0)``: what the optimizer's state moves
        whatever the batch (momentum, decoupled weight decay); not the batch's doing. Else None.
      delta_logits_remainder: with an optimizer, ``J_o (U(g) − U(0) − L g)``: the part of the
        exact update that is not linear in the current gradient (zero for SGD with momentum and
        weight decay; Adam's and RMSprop's second moment, clipping). Else None.
      delta_logits_curvature: with ``order=2``, ``½ D²z(x_o)[Δθ, Δθ]``: the second-order term of
        the logits along the step's whole update Δθ (the curvature of the network, not of the
        softmax: read Δlog π through :attr:`delta_logp_exact` for that). Else None.
      delta_logits_update: with an optimizer and ``split=False``, the whole first-order
        prediction ``J_o U(g)`` in one piece; ``delta_logits_terms`` is then ``()`` and the carry
        and remainder None (the causes were not computed). Else None.
    """

    logits: jax.Array
    G: tuple
    delta_logits_terms: tuple
    loss_u: jax.Array
    eta: float | None
    delta_logits_carry: jax.Array | None = None
    delta_logits_remainder: jax.Array | None = None
    delta_logits_curvature: jax.Array | None = None
    delta_logits_update: jax.Array | None = None

    @property
    def parts(self) -> tuple:
        """The additive pieces of :attr:`delta_logits`, each ``(N_o, [T,] V)``: the terms per
        branch, then whichever of the carry-over, the remainder, the unsplit update and the
        curvature term were computed."""
        extras = (
            self.delta_logits_carry,
            self.delta_logits_remainder,
            self.delta_logits_update,
            self.delta_logits_curvature,
        )
        return tuple(self.delta_logits_terms) + tuple(e for e in extras if e is not None)

    @property
    def delta_logits(self) -> jax.Array:
        """Predicted Δz(x_o), ``(N_o, [T,] V)``: ``−η Σ_b K G_b`` for SGD; with an optimizer the
        exact update's ``J_o U(g)`` = the terms + the carry-over + the remainder (or the unsplit
        update); with ``order=2`` plus the curvature term ``½ D²z[Δθ, Δθ]``."""
        parts = self.parts
        return sum(parts[1:], parts[0])

    @property
    def delta_logits_kernel(self) -> jax.Array:
        """The kernel prediction ``Σ_b −K_P G_b`` (+ the carry-over): the optimizer linearised at
        its state, without the remainder (and first order: no curvature term). Equals
        :attr:`delta_logits` for SGD at ``order=1``.

        Raises:
          ValueError: the decomposition was made with ``split=False`` (no kernel terms).
        """
        if not self.delta_logits_terms:
            raise ValueError(
                "this decomposition was made with split=False: it holds the whole update "
                "J_o U(g) only, not the kernel terms; call decompose(..., split=True)"
            )
        d = sum(self.delta_logits_terms[1:], self.delta_logits_terms[0])
        return d if self.delta_logits_carry is None else d + self.delta_logits_carry

    @property
    def A(self) -> jax.Array:
        """A(x_o) = I − 1πᵀ, ``(N_o, [T,] V, V)``."""
        return log_softmax_jacobian(self.logits)

    @property
    def delta_logp_linear_terms(self) -> tuple:
        """Per branch ``A·(−η K G_b)``; for DPO the y⁺ and y⁻ terms apart."""
        return tuple(apply_A(self.logits, t) for t in self.delta_logits_terms)

    @property
    def delta_logp_linear(self) -> jax.Array:
        """Linear prediction ``A·Δz``, ``(N_o, [T,] V)``."""
        return apply_A(self.logits, self.delta_logits)

    @property
    def delta_logp_exact(self) -> jax.Array:
        """``log_softmax(z + Δz) − log_softmax(z)``: no linearisation of A."""
        return jax.nn.log_softmax(self.logits + self.delta_logits, axis=-1) - jax.nn.log_softmax(
            self.logits, axis=-1
        )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(apply_fn, n_branches, variables, x_o, xs):
    """The logits of x_o and of each branch, and whether each is finite (checked on the host)."""
    f, p = trainable_fn(apply_fn, variables)
    z_o, z_u = f(p, x_o), tuple(f(p, x) for x in xs)
    return z_o, z_u, validate.finite_flags((z_o,) + z_u)


@functools.partial(jax.jit, static_argnums=(0,))
def _carry_is_zero(optimizer, opt_state, params):
    """``U(0) == 0`` exactly (no momentum yet, no weight decay: SGD, RMSprop without momentum)."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    carry = optimizer.update(zeros, opt_state, params)[0]
    return jnp.all(jnp.asarray([jnp.all(a == 0) for a in jax.tree_util.tree_leaves(carry)]))


def _branch_grads(f, params, xs, g) -> tuple:
    """``J_bᵀ G_b`` per branch: the loss's gradient in parameter space, one VJP per branch."""
    grads = []
    for x, gb in zip(xs, g):
        _, vjp = jax.vjp(lambda p, x=x: f(p, x), params)
        grads.append(vjp(gb.astype(jax.eval_shape(f, params, x).dtype))[0])
    return tuple(grads)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _predict_update(apply_fn, loss_fn, optimizer, variables, opt_state, x_o, xs, logits_u, kw):
    """``split=False``: only the whole update seen on x_o, ``J_o U(g)``, one JVP (the causes
    would need one JVP each)."""
    f, params = trainable_fn(apply_fn, variables)
    g = logit_gradient(loss_fn, *logits_u, **kw)
    g = g if isinstance(g, tuple) else (g,)
    grads = _branch_grads(f, params, xs, g)
    total = jax.tree_util.tree_map(lambda *a: sum(a[1:], a[0]), *grads)
    update = optimizer.update(total, opt_state, params)[0]
    dz = jax.jvp(lambda p: f(p, x_o), (params,), (update,))[1]
    return g, dz, loss_fn(*logits_u, **kw), update


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 9))
def _predict_optimizer(
    apply_fn, loss_fn, optimizer, variables, opt_state, x_o, xs, logits_u, loss_kwargs, carry=True
):
    """The optimizer's step split into its causes (:func:`update_parts`), all seen on x_o through
    one batched JVP of the logits (``carry=False``: the carry-over is exactly zero and skipped);
    also the update Δθ = U(g) itself, for :func:`_curvature`."""
    f, params = trainable_fn(apply_fn, variables)
    g = logit_gradient(loss_fn, *logits_u, **loss_kwargs)
    g = g if isinstance(g, tuple) else (g,)
    terms, u0, exact = update_parts(optimizer, opt_state, params, _branch_grads(f, params, xs, g))
    # the remainder in parameter space, then every part through one batched JVP of x_o
    rest = jax.tree_util.tree_map(lambda e, c, *t: e - c - sum(t[1:], t[0]), exact, u0, *terms)
    parts = (*terms, rest, u0) if carry else (*terms, rest)
    parts = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts)
    _, jvp_o = jax.linearize(lambda p: f(p, x_o), params)
    dz = jax.vmap(jvp_o)(parts)
    n = len(terms)
    dz_carry = dz[n + 1] if carry else jnp.zeros_like(dz[n])
    return g, tuple(dz[:n]), dz_carry, dz[n], loss_fn(*logits_u, **loss_kwargs), exact


@functools.partial(jax.jit, static_argnums=(0,))
def _curvature(apply_fn, variables, x_o, delta):
    """``½ D²z(x_o)[Δθ, Δθ]`` along the step's update ``delta``: forward over forward, one JVP of
    a JVP of the logits of x_o."""
    f, params = trainable_fn(apply_fn, variables)
    along = lambda p: jax.jvp(lambda q: f(q, x_o), (p,), (delta,))[1]
    return 0.5 * jax.jvp(along, (params,), (delta,))[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _sgd_update(apply_fn, variables, xs, g, eta):
    """The plain SGD update ``−η Σ_b J_bᵀ G_b`` from the residuals G already computed (one VJP
    per branch: the K·G kernel keeps its own direction inside its program)."""
    f, params = trainable_fn(apply_fn, variables)
    grads = _branch_grads(f, params, xs, g)
    return jax.tree_util.tree_map(lambda *d: -eta * sum(d[1:], d[0]), *grads)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict_vp(apply_fn, loss_fn, variables, x_o, xs, logits_u, eta, loss_kwargs):
    g = logit_gradient(loss_fn, *logits_u, **loss_kwargs)
    g = g if isinstance(g, tuple) else (g,)
    terms = tuple(
        -eta * kernel_vector_product(apply_fn, variables, x_o, x, gb) for x, gb in zip(xs, g)
    )
    return g, terms, loss_fn(*logits_u, **loss_kwargs), validate.finite_flags(g + terms)


def decompose(
    apply_fn: Callable,
    params: Any,
    x_o: Any,
    x_u: Any,
    loss_fn: Callable,
    *,
    eta: float | None = None,
    loss_kwargs: dict | None = None,
    method: str = "vp",
    implementation: str = "auto",
    optimizer: optax.GradientTransformation | None = None,
    opt_state: Any = None,
    order: int = 1,
    split: bool = True,
) -> Decomposition:
    """Predicts the change of z(x_o) and log π(x_o) after one step on the loss at x_u: plain SGD at
    rate ``eta``, or the real update of an optax ``optimizer`` from its state ``opt_state``.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, V)`` or ``(N, T, V)`` logits.
      params: parameters (flax variables: only ``params`` is trained).
      x_o: observed inputs, batch ``N_o``.
      x_u: the updated inputs: one batch, or a tuple of batches, one per logits argument of
        ``loss_fn`` (DPO family: ``(x⁺, x⁻)``, the prompt joined with y⁺ and with y⁻).
      loss_fn: ``loss_fn(*logits, **loss_kwargs) -> (N_u,)``, e.g. ``ldjax.losses.dpo``. The step
        is on the summed loss, ``Δθ = −η ∇θ Σ_n L_n``.
      eta: learning rate η > 0 of a plain SGD step (not with ``optimizer``).
      loss_kwargs: targets, masks, reference log-probs, β ... for ``loss_fn``.
      method: ``"vp"`` (one VJP + one JVP per branch, no K) or ``"blocks"`` (exact K blocks from
        :func:`ldjax.entk` contracted with G; same numbers, for analysis; with an optimizer the
        blocks are ``K_P`` of its elementwise preconditioner).
      implementation: the ``entk`` implementation for ``method="blocks"``.
      optimizer: any optax ``GradientTransformation`` (its own learning rate and schedule); the
        prediction is first order in its actual update, ``Δz ≈ J_o Δθ``, and is reported in its
        causes: the batch's preconditioned gradient per branch, the state's carry-over, and the
        part not linear in the gradient (:class:`Decomposition`).
      opt_state: the optimizer's state before the step (default ``optimizer.init(params)``).
      order: 1 (the paper's first-order prediction) or 2: also the curvature term
        ``½ D²z(x_o)[Δθ, Δθ]`` of the logits along the whole update
        (:attr:`Decomposition.delta_logits_curvature`; it costs one more gradient on x_u and a
        JVP of a JVP on x_o). The error of Δz is then O(Δθ³) instead of O(Δθ²):
        use it when one real step is outside the first-order regime (large learning rates,
        adaptive optimizers early in training); read Δlog π through
        :attr:`Decomposition.delta_logp_exact` to drop the softmax's linearisation too.
      split: with an optimizer, report the update in its causes (True: one JVP on x_o per
        cause: each branch's preconditioned gradient, the carry-over when the state has one, the
        remainder) or only the whole prediction ``J_o U(g)`` (False: one JVP, about the cost of
        the plain SGD prediction; :attr:`Decomposition.delta_logits_update`). The same
        :attr:`Decomposition.delta_logits` either way. Use False where only the predicted change
        is wanted, e.g. many x_u against one x_o under Adam.
    Returns:
      A :class:`Decomposition`.
    Raises:
      ValueError: η ≤ 0; x_u not one batch per logits argument of ``loss_fn`` (the DPO family
        needs the pair ``(x⁺, x⁻)``); integer or non-finite params; non-finite inputs or logits;
        loss arguments that do not fit (targets, masks, reference log-probs, β); a non-finite
        prediction. Each names the argument (``ldjax._src.validate``).

    Examples:
      One SGD step on the cross-entropy of a linear model, observed on another input:

      >>> import jax.numpy as jnp, ldjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((2, 3))}                  # uniform π
      >>> x_o, x_u = jnp.array([[1.0, 1.0]]), jnp.array([[1.0, 0.0]])
      >>> kw = dict(eta=0.1, loss_kwargs=dict(targets=jnp.array([2])))
      >>> d = ldjax.decompose(apply_fn, params, x_o, x_u, ldjax.losses.sft, **kw)
      >>> [round(g, 4) for g in d.G[0][0].tolist()]          # G = π − e_2
      [0.3333, 0.3333, -0.6667]
      >>> [round(v, 4) for v in d.delta_logits[0].tolist()]  # −η ⟨x_o, x_u⟩ G
      [-0.0333, -0.0333, 0.0667]
      >>> a = ldjax.actual_step(apply_fn, params, x_o, x_u, ldjax.losses.sft, **kw)
      >>> ldjax.compare(d, a).entk_step < 1e-6                # exact for a linear model
      True
    """
    if optimizer is not None and eta is not None:
        raise ValueError(
            "pass eta (a plain SGD step) or optimizer (it carries its own learning "
            "rate and schedule), not both"
        )
    if optimizer is None:
        if opt_state is not None:
            raise ValueError("opt_state given without an optimizer")
        if eta is None:
            raise ValueError("decompose needs eta (a plain SGD step) or an optimizer")
        eta = validate.check_eta(eta)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}"
        )
    if method not in ("vp", "blocks"):
        raise ValueError(f"method must be 'vp' or 'blocks', got {method!r}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if not isinstance(split, bool):
        raise ValueError(f"split must be True or False, got {split!r}")
    if not split and optimizer is None:
        raise ValueError(
            "split=False is for an optimizer's update (its causes cost one JVP each); the "
            "plain SGD prediction has one term per branch already"
        )
    if not split and method == "blocks":
        raise ValueError("split=False computes J_o U(g) directly: it has no K blocks; use 'vp'")
    xs = branches(x_u)
    kw = dict(loss_kwargs or {})
    validate.check_branches(loss_fn, kw, len(xs))
    f, p = trainable_fn(apply_fn, params)
    validate.check_params(p)
    validate.logits_shape(apply_fn, params, x_o, "x_o")
    names = [f"x_u[{k}]" for k in range(len(xs))]
    shapes = [validate.logits_shape(apply_fn, params, x, nm) for x, nm in zip(xs, names)]
    logits_o, logits_u, ok = _forward(apply_fn, len(xs), params, x_o, xs)
    cause = lambda nm, x: lambda: validate.non_finite_cause({"params": p, nm: x})
    validate.check_flags(
        ok,
        [(logits_o, "logits of x_o", cause("x_o", x_o))]
        + [(z, f"logits of {nm}", cause(nm, x)) for z, x, nm in zip(logits_u, xs, names)],
    )
    validate.check_finite_tree(p, "params")
    validate.check_finite_tree(x_o, "x_o")
    for x, nm in zip(xs, names):
        validate.check_finite_tree(x, nm)
    validate.check_loss_call(loss_fn, logits_u, kw, tuple(f"logits of {nm}" for nm in names))
    if optimizer is not None:
        if opt_state is None:
            opt_state = optimizer.init(p)
        if not split:
            g, dz, loss, update = _predict_update(
                apply_fn, loss_fn, optimizer, params, opt_state, x_o, xs, logits_u, kw
            )
            names = [
                (gb, f"G of x_u[{k}] (the loss's gradient on the logits)") for k, gb in enumerate(g)
            ]
            names.append((dz, "the predicted Δz on x_o (J_o U(g), the optimizer's update)"))
            curv = None
            if order == 2:
                curv = _curvature(apply_fn, params, x_o, update)
                names.append((curv, "the curvature term ½ D²z[Δθ, Δθ] on x_o"))
            validate.check_flags(
                validate.finite_flags(tuple(a for a, _ in names)),
                [(a, name, None) for a, name in names],
            )
            return Decomposition(
                logits_o, tuple(g), (), loss, None,
                delta_logits_curvature=curv, delta_logits_update=dz,
            )  # fmt: skip
        with_carry = not bool(_carry_is_zero(optimizer, opt_state, p))
        g, terms, carry, rest, loss, update = _predict_optimizer(
            apply_fn, loss_fn, optimizer, params, opt_state, x_o, xs, logits_u, kw, with_carry
        )
        if method == "blocks":  # K_P blocks for the terms; the remainder keeps the exact J_o U(g)
            exact = sum(terms[1:], terms[0]) + carry + rest
            pre = preconditioner(optimizer, opt_state, p)
            terms = tuple(
                -_block_term(apply_fn, params, x_o, x, gb, shape, implementation, pre)
                for x, gb, shape in zip(xs, g, shapes)
            )
            rest = exact - carry - sum(terms[1:], terms[0])
        names = [
            (gb, f"G of x_u[{k}] (the loss's gradient on the logits)") for k, gb in enumerate(g)
        ]
        names += [
            (t, f"the predicted Δz on x_o from x_u[{k}] (−K_P G)") for k, t in enumerate(terms)
        ]
        names += [(carry, "the optimizer's carry-over on x_o"), (rest, "the optimizer's remainder")]
        curv = None
        if order == 2:
            curv = _curvature(apply_fn, params, x_o, update)
            names.append((curv, "the curvature term ½ D²z[Δθ, Δθ] on x_o"))
        validate.check_flags(
            validate.finite_flags(
                tuple(g) + tuple(terms) + (carry, rest) + (() if curv is None else (curv,))
            ),
            [(a, name, None) for a, name in names],
        )
        return Decomposition(logits_o, tuple(g), tuple(terms), loss, None, carry, rest, curv)
    if method == "vp":
        g, terms, loss, ok = _predict_vp(apply_fn, loss_fn, params, x_o, xs, logits_u, eta, kw)
    else:
        g = logit_gradient(loss_fn, *logits_u, **kw)
        g = g if isinstance(g, tuple) else (g,)
        terms = tuple(
            -eta * _block_term(apply_fn, params, x_o, x, gb, shape, implementation)
            for x, gb, shape in zip(xs, g, shapes)
        )
        loss = loss_fn(*logits_u, **kw)
        ok = validate.finite_flags(tuple(g) + terms)
    inside = lambda: (
        "; params, inputs, logits and G are finite: the gradient of apply_fn overflows or is "
        "undefined there (e.g. sqrt or log at 0, or a low precision)"
    )
    validate.check_flags(
        ok,
        [(gb, f"G of x_u[{k}] (the loss's gradient on the logits)", None) for k, gb in enumerate(g)]
        + [
            (t, f"the predicted Δz on x_o from x_u[{k}] (−η K G)", inside)
            for k, t in enumerate(terms)
        ],
    )
    curv = None
    if order == 2:
        curv = _curvature(apply_fn, params, x_o, _sgd_update(apply_fn, params, xs, g, eta))
        validate.check_flags(
            validate.finite_flags((curv,)),
            [(curv, "the curvature term ½ D²z[Δθ, Δθ] on x_o", inside)],
        )
    return Decomposition(logits_o, tuple(g), tuple(terms), loss, eta, delta_logits_curvature=curv)


def _block_term(apply_fn, params, x_o, x, gb, shape, implementation, pre=None):
    """``K(x_o, x) G_b`` (``K_P`` with a preconditioner) from exact blocks."""
    K = entk(apply_fn, params, x_o, x, implementation=implementation, preconditioner=pre)
    spec = "oumlij,ulj->omi" if len(shape) == 3 else "ouij,uj->oi"
    return jnp.einsum(spec, K, gb)
