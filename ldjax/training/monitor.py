"""A live squeezing monitor: a training callback that predicts, every ``k`` steps, what the step
does to a few tracked probes, with the one-step decomposition (Ren & Sutherland, arXiv 2407.10490,
§3.3 "the squeezing effect").

At update ``s`` (every ``every``-th one) and the parameters θ before it, the monitor takes the
step's batch as the decomposition sees it (a :class:`StepSpec`: the inputs of each branch of the
loss, e.g. ``(x⁺, x⁻)`` for DPO, and its arguments), and predicts the change of the probes'
log-probabilities at every response position (``N_o`` probes of ``T`` positions, vocabulary V):

    Δlog π_b(x_o) = A(x_o) · (−η K(x_o, x_u) G_b)      (one term per branch b; SGD at rate η)

The **negative-gradient term** is the sum over the branches named negative in the spec (DPO: the
y⁻ branch, whose G pushes its own response down). With π = softmax z(x_o), v* = argmax π at each
position and Δπ_v = π_v Δlog π_v (first order), the monitor logs

* ``mass_to_argmax``: the probability mass the negative term moves onto the argmax token,
  Σ π_{v*} Δlog π⁻_{v*}, averaged over response positions (probability units per step);
* ``argmax_share``: that mass over all the mass the negative term moves,
  ``½ Σ_v |Δπ⁻_v|`` (sums over positions and probes), in [−1, 1]. Where K acts as the identity
  on the vocabulary, G⁻ = c (e_{y⁻} − π) gives Δlog π⁻_v = α (π_v − ‖π‖² + π_{y⁻} − [v = y⁻])
  (α = ηc > 0): only tokens with π_v > ‖π‖² − π_{y⁻} gain. With π peaky and y⁻ not the peak
  that is the argmax alone and the share is 1 (the squeezing effect: the mass taken from y⁻
  *and* from every other token goes to the peak); with π flat it spreads over all tokens (share
  → 1/(V−1)); with y⁻ the peak it is −1 — the paper's condition as one number;
* ``d_argmax_path``: the predicted change of the argmax path y* = Σ_m log max_v π_m by the
  whole step, mean over probes: A·J_o Δθ of the loop's actual update Δθ = θ_after − θ_before
  when the monitor runs as a loop hook (the real optimizer's step, first order), else of the
  SGD step −η Σ_b K G_b; ``d_argmax_path_neg``: the negative term's part (SGD at rate η);
* ``A_norm``: peakiness, the mean over response positions of ‖A_m‖_F = √(V − 2 + V‖π_m‖²);
* ``neg_is_peak``: the share of the negative branch's response tokens that are the model's own
  argmax at their position (the paper's condition asks for y⁻ *not* to be the peak);
* ``squeezing``: 1.0 when ``argmax_share > threshold`` (default ½: more than half of the mass the
  negative term moves lands on the argmax), else 0.0. Without a negative branch (SFT) the
  negative term is zero, all its numbers are 0 and the flag stays down.

The monitor is an ``on_step``-style callable ``(s, params_before, batch, params_after, metrics,
opt_state_before) -> dict | None``: pass it in ``callbacks`` of :func:`ldjax.training.train_loop`
(or any loop that calls it so) and its dict is logged to the run's history under ``prefix``
(NaN at the steps it skips). ``η`` is ``metrics["lr"]`` when the step reports its learning rate
(the LM phases do), else the ``eta`` given. With an adaptive optimizer (RMSprop, Adam) the
magnitudes are those of an SGD step of the same rate; ``argmax_share`` and the flag do not
depend on the scale. Cost per measured step, in one jitted function: a forward pass of the
batch, a backward pass of its negative branch only (DPO: half of the batch; SFT: none), and one
linearised forward of the few probes with two JVPs (:func:`ldjax.entk_vp`'s cheap form) —
about one training step of the DPO family (its forward needs both branches), less for SFT; at
the default ``every=20`` ≈ 5 % of the training time (``benchmarks/bench_monitor.py``;
``every=10`` ≈ 10 %).

Examples:
  A linear softmax model over V = 10 tokens whose probe shares the batch's input (K = I): DPO
  pushes y⁻ = token 0 down. With a peaky π (peak token 9, π₉ ≈ 0.45) all the moved mass goes to
  the peak; with a flat π (π₉ ≈ 0.13) a fifth of it does:

  >>> import jax.numpy as jnp, ldjax
  >>> from ldjax.training.monitor import SqueezeMonitor, StepSpec
  >>> apply_fn = lambda p, x: (x @ p["w"])[:, None, :]          # (N, T=1, V=10)
  >>> x = jnp.ones((1, 1))
  >>> kw = dict(targets_pos=jnp.array([[1]]), targets_neg=jnp.array([[0]]), beta=1.0,
  ...           ref_logp_pos=jnp.zeros(1), ref_logp_neg=jnp.zeros(1))
  >>> spec = StepSpec(ldjax.losses.dpo, lambda b: (b["x"], b["x"]), lambda b, p: kw,
  ...                 negative=(1,))
  >>> mon = SqueezeMonitor(apply_fn, {"tokens": x, "mask": jnp.ones((1, 1))}, spec, eta=0.1)
  >>> peaky = {"w": jnp.zeros((1, 10)).at[0, 9].set(2.0)}
  >>> r = mon.measure(peaky, {"x": x}, eta=0.1)
  >>> round(r["argmax_share"], 3), r["squeezing"]
  (1.0, 1.0)
  >>> flat = {"w": jnp.zeros((1, 10)).at[0, 9].set(0.3)}
  >>> r = mon.measure(flat, {"x": x}, eta=0.1)
  >>> round(r["argmax_share"], 3), r["squeezing"]
  (0.187, 0.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldjax._src.log_softmax_jacobian import A_norm, apply_A
from ldjax._src.trainable import trainable_fn

__all__ = ["StepSpec", "SqueezeMonitor", "STATS"]

STATS = (
    "mass_to_argmax",
    "argmax_share",
    "d_argmax_path",
    "d_argmax_path_neg",
    "A_norm",
    "neg_is_peak",
    "squeezing",
)
"""The numbers the monitor logs (module docstring), in order."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a training batch looks to the decomposition.

    Attributes:
      loss_fn: ``loss_fn(*logits, **kwargs) -> (N,)``; its sum over the batch is the step's
        objective (e.g. :func:`ldjax.lm.train.sft_objective`, a DPO-family loss / batch size).
        Create it once (it is a static argument of a jitted function).
      inputs: ``batch -> x_u``: one input array, or a tuple with one per logits argument of
        ``loss_fn`` (DPO: ``(x⁺, x⁻)``).
      kwargs: ``(batch, params) -> dict`` of array arguments of ``loss_fn`` (targets, masks,
        reference log-probs ...).
      negative: the branches (indices into ``inputs``) whose term is the negative gradient
        (DPO family: ``(1,)``; SFT: ``()``).
      negative_tokens: ``batch -> (targets, mask)`` of the negative branch's response, ``(N, T)``
        each, for ``neg_is_peak`` (None: not measured, NaN).
      batch_probes: ``batch -> (inputs, mask)``: the probes the monitor takes from the step's
        own batch with ``probes="batch"`` (LM: y⁺ of the step's pairs, the responses that share
        y⁻'s prompt — where the paper's squeezing acts most directly).
    """

    loss_fn: Callable
    inputs: Callable[[Any], Any]
    kwargs: Callable[[Any, Any], dict]
    negative: tuple = ()
    negative_tokens: Callable[[Any], tuple] | None = None
    batch_probes: Callable[[Any], tuple] | None = None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stats(apply_fn, loss_fn, negative, params, x_o, mask_o, xs, kwargs, eta, neg_tok, after):
    f, p = trainable_fn(apply_fn, params)
    delta = (
        None
        if after is None
        else jax.tree_util.tree_map(lambda a, b: a - b, trainable_fn(apply_fn, after)[1], p)
    )
    zs, vjps = [], []
    for x in xs:
        z, vjp = jax.vjp(lambda q, x=x: f(q, x), p)
        zs.append(z)
        vjps.append(vjp)
    grads = jax.grad(lambda *z: jnp.sum(loss_fn(*z, **kwargs)), argnums=tuple(range(len(zs))))(*zs)
    # (a backward pass only where its result is used: with ``delta`` only the negative branches)
    dirs = {
        b: vjps[b](grads[b].astype(zs[b].dtype))[0]
        for b in range(len(zs))
        if delta is None or b in negative
    }
    add = lambda ts: jax.tree_util.tree_map(lambda *a: sum(a[1:], a[0]), *ts)
    zero = jax.tree_util.tree_map(jnp.zeros_like, p)
    # Δθ of the whole step: the loop's actual update, or the SGD step −η Σ_b J_bᵀ G_b
    d_all = (
        delta
        if delta is not None
        else jax.tree_util.tree_map(lambda a: -eta * a, add(list(dirs.values())))
    )
    d_neg = (
        jax.tree_util.tree_map(lambda a: -eta * a, add([dirs[b] for b in negative]))
        if negative
        else zero
    )
    z_o, jvp_o = jax.linearize(lambda q: f(q, x_o), p)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a.astype(b.dtype), b]), d_all, d_neg)
    dz = jax.vmap(jvp_o)(stacked)  # (2, N_o, T, V): Δz of the step and of its negative term
    z_o = z_o.astype(jnp.float32)
    dz = dz.astype(jnp.float32)
    logp = jax.nn.log_softmax(z_o, axis=-1)
    pi = jnp.exp(logp)
    star = jnp.argmax(z_o, axis=-1)[..., None]
    pi_star = jnp.take_along_axis(pi, star, -1)[..., 0]
    dlp_all = apply_A(z_o, dz[0])
    dlp_neg = apply_A(z_o, dz[1])
    at = lambda a: jnp.take_along_axis(a, star, -1)[..., 0]
    m = mask_o.astype(jnp.float32)
    n_pos = jnp.maximum(jnp.sum(m), 1.0)
    to_star = pi_star * at(dlp_neg)  # (N_o, T): Δπ_{v*} from the negative term
    moved = 0.5 * jnp.sum(jnp.abs(pi * dlp_neg), -1)  # ½ Σ_v |Δπ⁻_v|
    tot_moved = jnp.sum(moved * m)
    share = jnp.where(
        tot_moved > 0, jnp.sum(to_star * m) / jnp.where(tot_moved > 0, tot_moved, 1.0), 0.0
    )
    out = {
        "mass_to_argmax": jnp.sum(to_star * m) / n_pos,
        "argmax_share": share,
        "d_argmax_path": jnp.mean(jnp.sum(at(dlp_all) * m, -1)),
        "d_argmax_path_neg": jnp.mean(jnp.sum(at(dlp_neg) * m, -1)),
        "A_norm": jnp.sum(A_norm(z_o) * m) / n_pos,
    }
    if neg_tok is not None:
        (b,) = negative[:1]
        tgt, msk = neg_tok
        hit = (jnp.argmax(zs[b], -1) == tgt).astype(jnp.float32) * msk
        out["neg_is_peak"] = jnp.sum(hit) / jnp.maximum(jnp.sum(msk), 1.0)
    return out


class SqueezeMonitor:
    """The live squeezing monitor (module docstring): a training callback.

    Args:
      apply_fn: ``apply_fn(params, x) -> (N, T, V)`` logits (flax variables: ``params`` trained).
      probes: ``{"tokens": (N_o, T) inputs, "mask": (N_o, T)}``: the tracked probes and the
        positions of their responses (a few; e.g. y⁺ of some training prompts); or ``"batch"``:
        the probes of each measured step's own batch (``spec.batch_probes``).
      spec: the :class:`StepSpec` of the training loss.
      every: measure at updates ``s`` with ``(s + 1) % every == 0`` (and the first, ``s = 0``).
      threshold: flag squeezing when ``argmax_share`` exceeds it, in (0, 1).
      eta: the step size when the step's metrics carry no ``lr``.
      prefix: the history keys are ``prefix + name`` (:data:`STATS`).

    After a run, :attr:`records` holds ``{"step": s + 1, **stats}`` per measured update and
    :meth:`fired` the steps flagged.
    """

    def __init__(
        self,
        apply_fn: Callable,
        probes: dict,
        spec: StepSpec,
        *,
        every: int = 20,
        threshold: float = 0.5,
        eta: float | None = None,
        prefix: str = "squeeze/",
    ):
        if not isinstance(spec, StepSpec):
            raise ValueError(f"spec must be a StepSpec, got {type(spec).__name__}")
        if isinstance(probes, str):
            if probes != "batch" or spec.batch_probes is None:
                raise ValueError(
                    "probes must be a dict of tokens and mask, or 'batch' with a spec that has "
                    f"batch_probes; got {probes!r}"
                )
            self.x_o = self.mask_o = None
        else:
            self.x_o, self.mask_o = self._check_probes(probes)
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 0 < float(threshold) < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if eta is not None and not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        if spec.negative_tokens is not None and len(spec.negative) != 1:
            raise ValueError("negative_tokens needs exactly one negative branch")
        self.apply_fn, self.spec = apply_fn, spec
        self.every, self.threshold, self.eta = int(every), float(threshold), eta
        self.prefix = prefix
        self.records: list[dict] = []
        self._pending = False

    @staticmethod
    def _check_probes(probes) -> tuple:
        if not isinstance(probes, dict) or not {"tokens", "mask"} <= set(probes):
            have = sorted(probes) if isinstance(probes, dict) else type(probes).__name__
            raise ValueError(f"probes needs 'tokens' and 'mask' (have {have})")
        tok, mask = np.asarray(probes["tokens"]), np.asarray(probes["mask"])
        if tok.ndim < 2 or mask.shape != tok.shape[:2]:
            raise ValueError(
                f"probes: mask must be (N_o, T) like the tokens' first two axes, got "
                f"{mask.shape} for tokens {tok.shape}"
            )
        if not mask.any():
            raise ValueError("probes: the mask selects no response position")
        return jnp.asarray(tok), jnp.asarray(mask)

    def due(self, s: int) -> bool:
        """Whether update ``s`` (0-based) is measured."""
        return s == 0 or (s + 1) % self.every == 0

    def measure(self, params, batch, eta: float, params_after=None) -> dict:
        """The statistics (:data:`STATS`) of one step on ``batch`` from ``params`` at rate η.
        With ``params_after`` (the loop's parameters after the step) the whole step's
        ``d_argmax_path`` is ``A·J_o Δθ`` of the actual update Δθ (the real optimizer's) and only
        the negative branches need a backward pass; without, it is the SGD step's."""
        sp = self.spec
        xs = sp.inputs(batch)
        xs = tuple(xs) if isinstance(xs, (tuple, list)) else (xs,)
        for b in sp.negative:
            if not 0 <= b < len(xs):
                raise ValueError(f"negative branch {b} but the spec gives {len(xs)} inputs")
        x_o, mask_o = self.x_o, self.mask_o
        if x_o is None:
            x_o, mask_o = (jnp.asarray(a) for a in sp.batch_probes(batch))
        neg_tok = None
        if sp.negative_tokens is not None:
            neg_tok = tuple(jnp.asarray(a) for a in sp.negative_tokens(batch))
        out = _stats(
            self.apply_fn,
            sp.loss_fn,
            tuple(sp.negative),
            params,
            x_o,
            mask_o,
            tuple(jnp.asarray(x) for x in xs),
            {k: jnp.asarray(v) for k, v in sp.kwargs(batch, params).items()},
            jnp.float32(eta),
            neg_tok,
            params_after,
        )
        r = {k: float(v) for k, v in jax.device_get(out).items()}
        r.setdefault("neg_is_peak", float("nan"))
        r["squeezing"] = float(r["argmax_share"] > self.threshold)
        return {k: r[k] for k in STATS}

    def __call__(self, s, params_before, batch, params_after=None, metrics=None, opt_state=None):
        """The loop hook: measures at due updates, returns ``{prefix + name: value}`` or None. A
        due update with learning rate 0 (a warm-up's first step moves nothing) is measured at
        the next update with a positive rate instead."""
        s = int(s)
        if not (self.due(s) or self._pending):
            return None
        eta = (metrics or {}).get("lr", self.eta)
        if eta is None:
            raise ValueError(
                "SqueezeMonitor: the step's metrics carry no 'lr'; pass eta= to the monitor"
            )
        if not float(eta) > 0:
            self._pending = True
            return None
        self._pending = False
        r = self.measure(params_before, batch, float(eta), params_after)
        self.records.append({"step": s + 1, **r})
        return {self.prefix + k: v for k, v in r.items()}

    def fired(self) -> list[int]:
        """Steps (updates done) where squeezing was flagged."""
        return [r["step"] for r in self.records if r["squeezing"] > 0]

    @staticmethod
    def from_history(history: dict, prefix: str = "squeeze/") -> dict:
        """``{"step": (M,), name: (M,)}``: the measured updates of a run's history."""
        key = prefix + "argmax_share"
        if key not in history:
            raise ValueError(f"the history has no {key!r}: the run had no squeezing monitor")
        v = np.asarray(history[key], np.float64)
        keep = np.isfinite(v)
        out = {"step": np.asarray(history["step"])[keep]}
        for k in STATS:
            if prefix + k in history:
                out[k] = np.asarray(history[prefix + k], np.float64)[keep]
        return out
