"""The MNIST warm-up analyses of the paper (arXiv 2407.10490, §2, Figure 1 and its appendix), on
the engine.

Every K, G, A and predicted change comes from :mod:`ldjax` (``entk``, ``decompose``,
``actual_step``, ``compare``); this module only picks examples, schedules calls and reduces the
results to numbers.

(a) :func:`one_update` — one SGD step on a "4": ``G = π − e_4`` and predicted vs actual Δπ on
    another 4, the most similar non-4 (largest ‖K(x_o, x_u)‖_F) and the least similar one.
(b) :class:`StepTracker` — an ``on_step`` hook for :func:`ldjax.mnist.train.train`: per step,
    the engine's plain-SGD prediction ``Δlog π = −η A K G`` on fixed probes against the actual
    change under the real optimizer (momentum + weight decay), and, every ``compare_every``
    steps, against an actual plain-SGD step from the same parameters.
(c) :func:`accumulated` — the sum over steps of the per-step predictions against the actual
    total change, per probe and class.
(d) :func:`class_confusion` — the 10×10 matrix of mean π(y|x) per true class.
(e) :class:`KernelTracker` / :func:`kernel_class_norms` — ‖K_uo‖_F per class pair at checkpoints,
    ranking stability (Spearman) and the correlation of accumulated influence with the
    time-integral of ‖K_uo‖_F (:func:`influence_vs_kernel`).

Step size convention: the engine's step is on the SUM of per-example losses, while training uses
the batch MEAN with learning rate ``η_t``; one training step is therefore ``eta = η_t / B``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldjax
from ldjax.experiments.stats import pearson, spearman
from ldjax.mnist.models import apply_fn as _apply_fn
from ldjax.mnist.models import make_model
from ldjax.mnist.train import TrainConfig, steps_per_epoch

__all__ = [
    "jitted_apply",
    "learning_rates",
    "momentum_weights",
    "pick_per_class",
    "probs",
    "one_update",
    "StepTracker",
    "accumulated",
    "class_confusion",
    "offdiag_ranks",
    "kernel_class_norms",
    "KernelTracker",
    "spearman",
    "pearson",
    "ranking_stability",
    "influence_matrix",
    "influence_vs_kernel",
    "per_step_summary",
]


@functools.cache
def jitted_apply(model: str = "lenet") -> Callable:
    """``jax.jit(apply_fn(make_model(model)))``, one object per model name.

    The engine's functions take ``apply_fn`` as a static argument: passing the same object every
    time lets every call (and every run in one process) reuse the compiled code.
    """
    return jax.jit(_apply_fn(make_model(model)))


def _sgd_step(apply_fn, params, x_o, x_u, y_u, eta) -> ldjax.ActualStep:
    """The actual plain-SGD step ``Δθ = −η ∇θ Σ_n L_n(x_u)`` (ldjax.actual_step), observed on
    x_o."""
    return ldjax.actual_step(
        apply_fn,
        params,
        x_o,
        x_u,
        ldjax.losses.sft,
        eta=float(eta),
        loss_kwargs=dict(targets=jnp.asarray(y_u)),
    )


def _batch_mean_ce(logits, targets, count):
    """The training objective's per-example share: cross-entropy over the batch size (the loss
    is the batch mean, so the optimizer sees ∇θ Σ_n CE_n / B)."""
    return ldjax.losses.sft(logits, targets) / count


def _decompose_optimizer(apply_fn, params, x_o, x_u, y_u, optimizer, opt_state):
    """The optimizer-aware prediction of the real update (momentum, weight decay, schedule)."""
    kw = dict(targets=jnp.asarray(y_u), count=jnp.asarray(float(np.shape(y_u)[0])))
    return ldjax.decompose(
        apply_fn,
        params,
        x_o,
        x_u,
        _batch_mean_ce,
        loss_kwargs=kw,
        optimizer=optimizer,
        opt_state=opt_state,
    )


def _decompose(apply_fn, params, x_o, x_u, y_u, eta) -> ldjax.Decomposition:
    return ldjax.decompose(
        apply_fn,
        params,
        x_o,
        x_u,
        ldjax.losses.sft,
        eta=float(eta),
        loss_kwargs=dict(targets=jnp.asarray(y_u)),
    )


# ----------------------------------------------------------------------------- schedules


def learning_rates(config: TrainConfig, n: int) -> np.ndarray:
    """``η_t`` of every update of :func:`ldjax.mnist.train.train`, ``(T,)`` float64.

    The same schedule as :func:`ldjax.mnist.train.make_optimizer` (cosine to 0 over
    ``T = epochs · ceil(n / B)`` steps, or constant).
    """
    spe = steps_per_epoch(config, n)
    total = config.epochs * spe
    if config.schedule == "cosine":
        sched = optax.cosine_decay_schedule(config.lr, decay_steps=total)
        return np.asarray(jax.vmap(sched)(jnp.arange(total)), np.float64)
    return np.full(total, float(config.lr))


def momentum_weights(lrs: np.ndarray, momentum: float) -> np.ndarray:
    """``c_s = Σ_{t≥s} η_t μ^{t−s}``, ``(T,)``: the total step that the gradient of step s receives.

    Under heavy-ball SGD (``m_t = μ m_{t−1} + g_t``, ``θ_{t+1} = θ_t − η_t m_t``) the gradient
    ``g_s`` moves θ by ``−c_s g_s`` summed over all later updates; for a constant η,
    ``c_s → η / (1 − μ)``. ``c_s / η_s`` rescales a plain-SGD prediction of step s.
    """
    lrs = np.asarray(lrs, np.float64)
    c = np.zeros_like(lrs)
    acc = 0.0
    for t in range(lrs.size - 1, -1, -1):
        acc = lrs[t] + momentum * acc
        c[t] = acc
    return c


# ----------------------------------------------------------------------------- small helpers


def pick_per_class(labels: np.ndarray, per_class: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, class-major: ``(C·per_class,)``.

    Raises:
      ValueError: a class has fewer than ``per_class`` examples.
    """
    labels = np.asarray(labels)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {c} has {idx.size} examples, fewer than per_class={per_class}")
        out.append(idx[:per_class])
    return np.concatenate(out)


def probs(apply_fn: Callable, params: Any, x: Any, batch_size: int = 500) -> np.ndarray:
    """π(· | x) = softmax(z), ``(N, V)`` float64 (batched forward passes)."""
    out = []
    for s in range(0, len(x), batch_size):
        out.append(
            np.asarray(jax.nn.softmax(apply_fn(params, x[s : s + batch_size]), axis=-1), np.float64)
        )
    return np.concatenate(out)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """∫ y dx by the trapezoid rule over the first axis (numpy < 2 has no np.trapezoid)."""
    dx = np.diff(np.asarray(x, np.float64)).reshape((-1,) + (1,) * (y.ndim - 1))
    return np.sum(dx * (y[1:] + y[:-1]) / 2.0, axis=0)


def _offdiag(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m)
    return m[~np.eye(m.shape[0], dtype=bool)]


# ----------------------------------------------------------------------------- (a) one update


def one_update(
    apply_fn: Callable,
    params: Any,
    pool_x,
    pool_y,
    *,
    label: int = 4,
    u_index: int | None = None,
    eta: float | None = None,
    target_nats: float = 0.02,
) -> dict:
    """One SGD step on one example of class ``label`` seen on three observing examples.

    Args:
      apply_fn: ``f(params, x) -> (N, V)`` logits (pass a ``jax.jit``-ed function: the engine
        traces it for its shape checks on every call).
      params: a (partly) trained model.
      pool_x, pool_y: candidates ``(N, 28, 28, 1)``, ``(N,)``; x_u and the observers come from it.
      label: the class of x_u (the paper's "4").
      u_index: index of x_u in the pool; default the first example of ``label``.
      eta: the step size of ``Δθ = −η ∇θ L(x_u)``; default chosen so that the predicted
        ``Δlog π(label | x_u)`` on x_u itself is ``target_nats`` (predictions are linear in η).
      target_nats: see ``eta``.
    Returns:
      dict with ``u`` (pool index), ``eta``, ``G (V,)``, ``observers`` (list of dicts: ``kind``,
      ``index``, ``label``, ``k_fro`` = ‖K(x_o, x_u)‖_F, ``pi`` before ``(V,)``, ``dpi_pred``
      (from the linear Δlog π: ``π (exp(Δlog π) − 1)``), ``dpi_pred_exact`` (from
      log_softmax(z + Δz_pred)), ``dpi_actual``, ``dlogp_pred``, ``dlogp_actual``), ``compare``
      (the engine's :class:`ldjax.Comparison` as a dict) and ``k_fro_all (N,)``.
    """
    pool_y = np.asarray(pool_y)
    cand = np.flatnonzero(pool_y == label)
    if cand.size < 2:
        raise ValueError(f"the pool needs >= 2 examples of class {label}, found {cand.size}")
    if np.all(pool_y == label):
        raise ValueError(f"the pool holds only class {label}; need other digits to compare")
    u = int(cand[0] if u_index is None else u_index)
    if pool_y[u] != label:
        raise ValueError(f"pool_y[u_index={u}] = {pool_y[u]}, not the class label={label}")
    x_u = pool_x[u : u + 1]
    y_u = np.array([label], np.int32)
    # ‖K(x_o, x_u)‖_F for every candidate, from exact blocks (N, 1, V, V).
    K = np.asarray(ldjax.entk(apply_fn, params, pool_x, x_u, reduction="full"), np.float64)
    k_fro = np.linalg.norm(K[:, 0], axis=(-2, -1))
    other = np.flatnonzero(pool_y != label)
    same = cand[cand != u]
    chosen = [
        ("another " + str(label), int(same[0])),
        (f"most similar non-{label}", int(other[np.argmax(k_fro[other])])),
        (f"least similar non-{label}", int(other[np.argmin(k_fro[other])])),
    ]
    x_o = pool_x[np.array([i for _, i in chosen])]
    if eta is None:
        probe = _decompose(apply_fn, params, x_u, x_u, y_u, 1.0)
        gain = float(np.asarray(probe.delta_logp_linear)[0, label])
        if not gain > 0:
            raise ValueError(
                f"the step on x_u does not raise log π({label}|x_u) (gain {gain}); pass eta"
            )
        eta = target_nats / gain
    dec = _decompose(apply_fn, params, x_o, x_u, y_u, eta)
    act = _sgd_step(apply_fn, params, x_o, x_u, y_u, eta)
    cmp = ldjax.compare(dec, act)
    pi = np.asarray(jax.nn.softmax(dec.logits, axis=-1), np.float64)
    lin = np.asarray(dec.delta_logp_linear, np.float64)
    exact = np.asarray(dec.delta_logp_exact, np.float64)
    actual = np.asarray(act.delta_logp, np.float64)
    obs = []
    for k, (kind, i) in enumerate(chosen):
        obs.append(
            dict(
                kind=kind,
                index=i,
                label=int(pool_y[i]),
                k_fro=float(k_fro[i]),
                pi=pi[k],
                dlogp_pred=lin[k],
                dlogp_actual=actual[k],
                dpi_pred=pi[k] * np.expm1(lin[k]),
                dpi_pred_exact=pi[k] * np.expm1(exact[k]),
                dpi_actual=pi[k] * np.expm1(actual[k]),
            )
        )
    g = np.asarray(dec.G[0], np.float64)[0]
    pi_u = np.asarray(jax.nn.softmax(apply_fn(params, x_u), axis=-1), np.float64)[0]
    return dict(
        u=u,
        label=label,
        eta=float(eta),
        G=g,
        pi_u=pi_u,
        observers=obs,
        compare=dataclasses.asdict(cmp),
        k_fro_all=k_fro,
    )


# ----------------------------------------------------------------------------- (b)+(c) per step


class StepTracker:
    """``on_step`` hook: per-step predicted vs actual Δlog π on fixed probes.

    Every update t: the engine's one-step decomposition for that step's batch at
    ``eta = η_t / B`` (plain SGD; ``pred_linear = A·(−ηKG)`` and ``pred_exact =
    log_softmax(z − ηKG) − log_softmax(z)``), and the actual change ``actual`` of the probes'
    log π under the real optimizer. Every ``compare_every`` updates (and on the first), also an
    actual plain-SGD step from the same parameters (``ldjax.actual_step``) and the engine's
    :class:`ldjax.Comparison` against both actual changes.

    With ``optimizer`` (the training's own optax transformation) the hook also predicts the real
    update itself, optimizer-aware (:func:`ldjax.decompose` with ``optimizer`` and the state the
    update started from, which :func:`ldjax.mnist.train.train` passes as ``opt_state``):
    ``pred_opt_linear (T, P, V)``, its part due to the batch's own gradient ``pred_opt_batch`` and
    ``cmp_opt`` against the real update.

    Arrays after training (:meth:`arrays`): ``pred_linear``, ``pred_exact``, ``actual``
    ``(T, P, V)`` float32; ``lr (T,)``; ``batch (T,)``; ``logp0 (P, V)``; and for the compared
    steps ``cmp_steps (S,)``, ``sgd_actual (S, P, V)``, ``cmp_sgd`` / ``cmp_real`` (/ ``cmp_opt``)
    ``{field: (S,)}``.
    """

    def __init__(
        self,
        apply_fn: Callable,
        probe_x,
        lrs: np.ndarray,
        *,
        compare_every: int = 10,
        optimizer=None,
    ):
        if compare_every < 1:
            raise ValueError(f"compare_every must be >= 1, got {compare_every}")
        self.apply_fn = apply_fn
        self.probe_x = jnp.asarray(probe_x)
        self.lrs = np.asarray(lrs, np.float64)
        self.compare_every = int(compare_every)
        self.pred_linear, self.pred_exact, self.actual = [], [], []
        self.batch, self.steps = [], []
        self.cmp_steps, self.sgd_actual = [], []
        self.cmp_sgd, self.cmp_real = [], []
        self.optimizer = optimizer
        self.pred_opt, self.pred_opt_batch, self.cmp_opt = [], [], []
        self.logp0 = None
        # The previous step's (params_after, logits before it) while its actual change is pending:
        # train() passes that step's params_after as the next params_before, whose probe logits
        # the next decomposition computes anyway (saves one forward pass per step).
        self._pending = None

    def _logp(self, logits):
        return np.asarray(jax.nn.log_softmax(logits, axis=-1))

    def _settle(self, logits_after=None):
        """Records the pending step's actual change (a forward pass when the logits are not
        given)."""
        params_after, logits_before = self._pending
        if logits_after is None:
            logits_after = self.apply_fn(params_after, self.probe_x)
        self.actual.append(self._logp(logits_after) - self._logp(logits_before))
        self._pending = None

    def __call__(self, step, params_before, batch_x, batch_y, params_after, opt_state=None):
        if self.optimizer is not None and opt_state is None:
            raise ValueError(
                "StepTracker(optimizer=...) needs the optimizer state of every step: "
                "pass it as on_step to ldjax.mnist.train.train"
            )
        if step >= self.lrs.size:
            raise ValueError(f"step {step} is past the schedule of {self.lrs.size} steps")
        b = int(np.shape(batch_y)[0])
        eta = self.lrs[step] / b
        dec = _decompose(self.apply_fn, params_before, self.probe_x, batch_x, batch_y, eta)
        if self._pending is not None:
            self._settle(dec.logits if params_before is self._pending[0] else None)
        if self.logp0 is None:
            self.logp0 = self._logp(dec.logits)
        self.pred_linear.append(np.asarray(dec.delta_logp_linear))
        self.pred_exact.append(np.asarray(dec.delta_logp_exact))
        self.batch.append(b)
        self.steps.append(int(step))
        opt = None
        if self.optimizer is not None:
            opt = _decompose_optimizer(
                self.apply_fn,
                params_before,
                self.probe_x,
                batch_x,
                batch_y,
                self.optimizer,
                opt_state,
            )
            self.pred_opt.append(np.asarray(opt.delta_logp_linear))
            self.pred_opt_batch.append(
                np.asarray(ldjax.apply_A(opt.logits, opt.delta_logits_terms[0]))
            )
        self._pending = (params_after, dec.logits)
        if step % self.compare_every == 0:
            z_after = self.apply_fn(params_after, self.probe_x)
            real = ldjax.ActualStep(params_after, dec.logits, z_after, dec.loss_u)
            self._settle(z_after)
            sgd = _sgd_step(self.apply_fn, params_before, self.probe_x, batch_x, batch_y, eta)
            self.cmp_steps.append(int(step))
            self.sgd_actual.append(np.asarray(sgd.delta_logp))
            self.cmp_sgd.append(dataclasses.asdict(ldjax.compare(dec, sgd)))
            self.cmp_real.append(dataclasses.asdict(ldjax.compare(dec, real)))
            if opt is not None:
                self.cmp_opt.append(dataclasses.asdict(ldjax.compare(opt, real)))

    def arrays(self) -> dict:
        """The records as numpy arrays (see the class docstring)."""
        if not self.steps:
            raise ValueError("StepTracker saw no step (was it passed as on_step to train?)")
        if self._pending is not None:
            self._settle()
        steps = np.asarray(self.steps)
        if not np.array_equal(steps, np.arange(steps.size) + steps[0]):
            raise ValueError(
                "StepTracker saw non-consecutive steps; accumulated sums would be wrong"
            )
        cat = lambda rows: {k: np.asarray([r[k] for r in rows]) for k in rows[0]} if rows else {}
        extra = {}
        if self.optimizer is not None:
            extra = dict(
                pred_opt_linear=np.stack(self.pred_opt),
                pred_opt_batch=np.stack(self.pred_opt_batch),
                cmp_opt=cat(self.cmp_opt),
            )
        return dict(
            **extra,
            steps=steps,
            lr=self.lrs[steps],
            batch=np.asarray(self.batch),
            pred_linear=np.stack(self.pred_linear),
            pred_exact=np.stack(self.pred_exact),
            actual=np.stack(self.actual),
            logp0=self.logp0,
            cmp_steps=np.asarray(self.cmp_steps),
            sgd_actual=np.stack(self.sgd_actual),
            cmp_sgd=cat(self.cmp_sgd),
            cmp_real=cat(self.cmp_real),
        )


def per_step_summary(rec: dict) -> dict:
    """(b) in numbers: median relative errors and sign agreement of the per-step predictions."""
    out = {}
    for name in ("cmp_sgd", "cmp_real", "cmp_opt"):
        if name not in rec:
            continue
        c = rec[name]
        out[name] = {
            k: dict(
                median=float(np.median(v)),
                q90=float(np.quantile(v, 0.9)),
                max=float(np.max(v)),
                min=float(np.min(v)),
            )
            for k, v in c.items()
        }
    out["n_compared_steps"] = int(rec["cmp_steps"].size)
    out["n_steps"] = int(rec["steps"].size)
    return out


def accumulated(rec: dict, momentum: float = 0.0, probe_y: np.ndarray | None = None) -> dict:
    """(c) Σ_t predicted Δlog π against the actual total change, per probe and class.

    Args:
      rec: :meth:`StepTracker.arrays` of a run that covered every step.
      momentum: the optimizer's μ; the "momentum-weighted" sum rescales the prediction of step s by
        ``c_s / η_s`` (:func:`momentum_weights`), the total step its gradient receives.
      probe_y: ``(P,)`` labels of the probes (for the split into label / other classes).
    Returns:
      dict with ``pred_sum`` (plain-SGD predictions summed), ``pred_sum_momentum``,
      ``actual_sum`` (``= log π_T − log π_0``), each ``(P, V)``, the curves ``cum_pred``,
      ``cum_pred_momentum``, ``cum_actual`` ``(T, P, V)``, and correlations (Pearson over all P·V
      entries, Spearman, least-squares slope of actual on predicted). With the tracker's
      optimizer-aware predictions (``pred_opt_linear``), also ``pred_sum_optimizer`` and
      ``cum_pred_optimizer``: the real updates predicted step by step, no reweighting needed.
    """
    pred = rec["pred_linear"].astype(np.float64)
    act = rec["actual"].astype(np.float64)
    lr = rec["lr"]
    c = momentum_weights(lr, momentum) if momentum else lr.copy()
    w = (c / lr)[:, None, None]
    cum_pred = np.cumsum(pred, axis=0)
    cum_mom = np.cumsum(pred * w, axis=0)
    cum_act = np.cumsum(act, axis=0)
    out = dict(
        pred_sum=cum_pred[-1],
        pred_sum_momentum=cum_mom[-1],
        actual_sum=cum_act[-1],
        cum_pred=cum_pred,
        cum_pred_momentum=cum_mom,
        cum_actual=cum_act,
    )
    sums = [("plain", cum_pred[-1]), ("momentum", cum_mom[-1])]
    if "pred_opt_linear" in rec:
        cum_opt = np.cumsum(rec["pred_opt_linear"].astype(np.float64), axis=0)
        out.update(pred_sum_optimizer=cum_opt[-1], cum_pred_optimizer=cum_opt)
        sums.append(("optimizer", cum_opt[-1]))
    stats = {}
    for name, p in sums:
        a = cum_act[-1]
        s = dict(
            pearson=pearson(p, a),
            spearman=spearman(p, a),
            slope=float(np.sum(p * a) / np.sum(p * p)),
        )
        if probe_y is not None:
            own = np.zeros(a.shape, bool)
            own[np.arange(a.shape[0]), np.asarray(probe_y)] = True
            s["pearson_label_entries"] = pearson(p[own], a[own])
            s["pearson_other_entries"] = pearson(p[~own], a[~own])
        stats[name] = s
    out["stats"] = stats
    return out


# ----------------------------------------------------------------------------- (d) confusion


def class_confusion(p: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """``M[c, y]`` = mean over examples of true class c of π(y|x), ``(C, C)``.

    Args:
      p: ``(N, C)`` probabilities (:func:`probs`). labels: ``(N,)`` true classes.
    Raises:
      ValueError: a class has no example.
    """
    p = np.asarray(p, np.float64)
    labels = np.asarray(labels)
    m = np.zeros((num_classes, num_classes))
    for c in range(num_classes):
        sel = labels == c
        if not sel.any():
            raise ValueError(f"class {c} has no example; cannot average π(y|x) over it")
        m[c] = p[sel].mean(axis=0)
    return m


def offdiag_ranks(m: np.ndarray) -> dict:
    """Rank (1 = largest) of every off-diagonal entry ``(row, col)`` of a square matrix.

    Returns ``{(r, c): rank}`` and, under ``"order"``, the pairs from largest down.
    """
    m = np.asarray(m)
    n = m.shape[0]
    pairs = [(r, c) for r in range(n) for c in range(n) if r != c]
    order = sorted(pairs, key=lambda rc: -m[rc])
    ranks = {rc: k + 1 for k, rc in enumerate(order)}
    ranks["order"] = order
    return ranks


# ----------------------------------------------------------------------------- (e) eNTK norms


def kernel_class_norms(apply_fn: Callable, params: Any, x, y, num_classes: int = 10) -> np.ndarray:
    """Mean ‖K(x_o, x_u)‖_F per class pair, ``N[u_class, o_class]``, ``(C, C)``.

    K from ``ldjax.entk(..., reduction="full")`` on the set with itself, ``(N, N, V, V)``, then the
    Frobenius norm of each V×V block; pairs of an example with itself are left out. ‖K(x_o, x_u)‖_F
    = ‖K(x_u, x_o)‖_F, so on one set the matrix is symmetric: the asymmetry the paper reports
    lies in the ranking of each row (e.g. 4's nearest class is 9 while 9's may be 7), not in N.
    """
    y = np.asarray(y)
    K = np.asarray(ldjax.entk(apply_fn, params, x, x, reduction="full"), np.float64)
    fro = np.linalg.norm(K, axis=(-2, -1))
    np.fill_diagonal(fro, np.nan)
    out = np.zeros((num_classes, num_classes))
    for u in range(num_classes):
        for o in range(num_classes):
            block = fro[np.ix_(y == o, y == u)]
            if block.size == 0 or np.all(np.isnan(block)):
                raise ValueError(f"the kernel set has no pair for classes (u={u}, o={o})")
            out[u, o] = np.nanmean(block)
    return out


class KernelTracker:
    """``on_epoch`` hook: :func:`kernel_class_norms` at chosen epochs (call :meth:`record` for
    epoch 0).

    ``steps_per_epoch`` converts epochs to update counts for time integrals. :meth:`arrays` gives
    ``epochs (E,)``, ``steps (E,)`` and ``norms (E, C, C)``.
    """

    def __init__(self, apply_fn: Callable, x, y, epochs: Sequence[int], steps_per_epoch: int):
        self.apply_fn, self.x, self.y = apply_fn, jnp.asarray(x), np.asarray(y)
        self.want = set(int(e) for e in epochs)
        self.spe = int(steps_per_epoch)
        self.epochs, self.norms, self.params = [], [], {}

    def record(self, epoch: int, params) -> None:
        self.epochs.append(int(epoch))
        self.norms.append(kernel_class_norms(self.apply_fn, params, self.x, self.y))
        self.params[int(epoch)] = params

    def __call__(self, epoch, params):
        if int(epoch) in self.want:
            self.record(epoch, params)

    def arrays(self) -> dict:
        e = np.asarray(self.epochs)
        return dict(epochs=e, steps=e * self.spe, norms=np.stack(self.norms))


def ranking_stability(norms: np.ndarray, a: int, b: int, *, include_diagonal: bool = False) -> dict:
    """Spearman between checkpoints ``a`` and ``b`` of the ranking over o of ``N[u, o]``.

    Per row u (over the 9 other classes, or all 10 with ``include_diagonal``), averaged over u;
    ``whole`` is the Spearman over all off-diagonal entries at once.
    """
    na, nb = np.asarray(norms[a]), np.asarray(norms[b])
    c = na.shape[0]
    rows = []
    for u in range(c):
        keep = np.ones(c, bool) if include_diagonal else np.arange(c) != u
        rows.append(spearman(na[u, keep], nb[u, keep]))
    return dict(
        mean_row=float(np.mean(rows)),
        min_row=float(np.min(rows)),
        rows=rows,
        whole=spearman(_offdiag(na), _offdiag(nb)),
    )


def influence_matrix(
    per_probe: np.ndarray, probe_y: np.ndarray, num_classes: int = 10
) -> np.ndarray:
    """``I[u, o]`` = mean over probes x_o of class o of ``per_probe[:, u]`` (e.g. accumulated
    Δlog π(u | x_o)), ``(C, C)``: how far training moved label u on digits of class o."""
    m = class_confusion(per_probe, probe_y, num_classes)  # m[o, u]
    return m.T


def influence_vs_kernel(influence: np.ndarray, kernel: dict, lrs: np.ndarray | None = None) -> dict:
    """Correlation of an accumulated-influence matrix with the time-integral of ‖K_uo‖_F.

    Args:
      influence: ``I[u, o]`` ``(C, C)`` (:func:`influence_matrix`).
      kernel: :meth:`KernelTracker.arrays` (``steps (E,)``, ``norms (E, C, C)``).
      lrs: ``η_t (T,)``; if given, also the integral of ``η_t ‖K_uo‖_F`` (the step's size enters
        the one-step change linearly).
    Returns:
      ``integral (C, C)`` (trapezoid over update steps), ``pearson`` / ``spearman`` over the
      C(C−1) off-diagonal pairs (u ≠ o), and the same for the η-weighted integral.
    """
    steps = np.asarray(kernel["steps"], np.float64)
    norms = np.asarray(kernel["norms"], np.float64)
    if steps.size < 2:
        raise ValueError("the time-integral needs >= 2 kernel checkpoints")
    integ = _trapezoid(norms, steps)
    off_i = _offdiag(influence)
    out = dict(
        integral=integ,
        pearson=pearson(off_i, _offdiag(integ)),
        spearman=spearman(off_i, _offdiag(integ)),
        n_pairs=int(off_i.size),
    )
    if lrs is not None:
        lrs = np.asarray(lrs, np.float64)
        t = np.arange(lrs.size, dtype=np.float64)
        # ‖K_uo‖_F interpolated linearly between checkpoints, times η_t, summed over updates.
        flat = norms.reshape(norms.shape[0], -1)
        interp = np.stack([np.interp(t, steps, flat[:, j]) for j in range(flat.shape[1])], axis=1)
        w = (lrs[:, None] * interp).sum(axis=0).reshape(norms.shape[1:])
        out.update(
            integral_eta=w,
            pearson_eta=pearson(off_i, _offdiag(w)),
            spearman_eta=spearman(off_i, _offdiag(w)),
        )
    return out
