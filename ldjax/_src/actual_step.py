"""The actual one-step change: one real optimizer step on x_u, observed on x_o."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ldjax._src import validate
from ldjax._src.trainable import branches, split_trainable


@dataclasses.dataclass(frozen=True)
class ActualStep:
    """One real optimizer step on x_u, observed on x_o.

    Attributes:
      params: the variables after the step (same structure as given).
      logits: ``(N_o, [T,] V)`` z(x_o) before. logits_after: after.
      loss_u: ``(N_u,)`` loss on x_u before the step.
      opt_state: the optimizer's state after the step.
      update: the parameter update ``Δθ`` the optimizer made (trainable parameters).
    """

    params: Any
    logits: jax.Array
    logits_after: jax.Array
    loss_u: jax.Array
    opt_state: Any = None
    update: Any = None

    @property
    def delta_logits(self) -> jax.Array:
        """Actual Δz(x_o), ``(N_o, [T,] V)``."""
        return self.logits_after - self.logits

    @property
    def delta_logp(self) -> jax.Array:
        """Actual Δlog π(x_o), ``(N_o, [T,] V)``."""
        return jax.nn.log_softmax(self.logits_after, axis=-1) - jax.nn.log_softmax(
            self.logits, axis=-1
        )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step(apply_fn, loss_fn, optimizer, variables, x_o, xs, loss_kwargs, eta, opt_state):
    params, merge = split_trainable(variables)
    if optimizer is None:  # plain SGD with a traced step size: one compilation for every η
        optimizer = optax.sgd(eta)

    def total(p):
        v = merge(p)
        losses = loss_fn(*(apply_fn(v, x) for x in xs), **loss_kwargs)
        return jnp.sum(losses), losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
    state = optimizer.init(params) if opt_state is None else opt_state
    updates, state = optimizer.update(grads, state, params)
    new = merge(optax.apply_updates(params, updates))
    return new, apply_fn(variables, x_o), apply_fn(new, x_o), losses, state, updates


def actual_step(
    apply_fn: Callable,
    params: Any,
    x_o: Any,
    x_u: Any,
    loss_fn: Callable,
    *,
    eta: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss_kwargs: dict | None = None,
    opt_state: Any = None,
) -> ActualStep:
    """Takes one optimizer step on ``Σ_n loss_fn(...)_n`` at x_u and re-evaluates x_o.

    The step is ``optax.sgd(eta)`` (the step :func:`ldjax.decompose` predicts with ``eta``), or
    any optax ``GradientTransformation`` from ``opt_state`` (default: its fresh state, a first
    step) — what ``decompose(..., optimizer=, opt_state=)`` predicts. Give ``eta`` or
    ``optimizer``, not both.

    Raises:
      ValueError: as :func:`ldjax.decompose` (the same checks, in ``ldjax._src.validate``), and
        non-finite logits or loss before or after the step.

    Examples:
      >>> import jax.numpy as jnp, optax, ldjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> x = jnp.array([[1.0, 0.0]])
      >>> step = ldjax.actual_step(apply_fn, params, x, x, ldjax.losses.sft, eta=0.3,
      ...                          loss_kwargs=dict(targets=jnp.array([0])))
      >>> [round(v, 4) for v in step.delta_logits[0].tolist()]   # −0.3 (π − e_0)
      [0.2, -0.1, -0.1]
      >>> y = dict(targets=jnp.array([0]))
      >>> adam = ldjax.actual_step(apply_fn, params, x, x, ldjax.losses.sft,
      ...                          optimizer=optax.adam(0.01), loss_kwargs=y)
      >>> [round(v, 4) for v in adam.delta_logits[0].tolist()]   # Adam's first step: ±lr
      [0.01, -0.01, -0.01]
    """
    if optimizer is None and eta is None:
        raise ValueError("actual_step needs eta (for optax.sgd) or an optimizer")
    if optimizer is not None and eta is not None:
        raise ValueError(
            "pass eta (a plain SGD step) or optimizer (it carries its own learning "
            "rate and schedule), not both"
        )
    if optimizer is None and opt_state is not None:
        raise ValueError("opt_state given without an optimizer")
    eta = None if eta is None else validate.check_eta(eta)
    xs = branches(x_u)
    kw = dict(loss_kwargs or {})
    validate.check_branches(loss_fn, kw, len(xs))
    p, _ = split_trainable(params)
    validate.check_params(p)
    validate.logits_shape(apply_fn, params, x_o, "x_o")
    names = tuple(f"x_u[{k}]" for k in range(len(xs)))
    structs = tuple(validate.logits_struct(apply_fn, params, x, nm) for x, nm in zip(xs, names))
    validate.check_finite_tree(p, "params")
    validate.check_finite_tree(x_o, "x_o")
    for x, nm in zip(xs, names):
        validate.check_finite_tree(x, nm)
    validate.check_loss_call(loss_fn, structs, kw, tuple(f"logits of {nm}" for nm in names))
    new, before, after, losses, state, update = _step(
        apply_fn, loss_fn, optimizer, params, x_o, xs, kw, eta, opt_state
    )
    validate.check_finite(
        before, "logits of x_o", lambda: validate.non_finite_cause({"params": p, "x_o": x_o})
    )
    validate.check_finite(
        losses,
        "loss on x_u",
        lambda: validate.non_finite_cause({"params": p, **dict(zip(names, xs))}),
    )
    validate.check_finite(after, "logits of x_o after the step")
    return ActualStep(new, before, after, losses, state, update)
