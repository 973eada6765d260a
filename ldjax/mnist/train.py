"""Train the MNIST warm-up classifier with the paper's recipe (optax SGD, orbax checkpoints).

Paper (Figure 1): LeNet on 2,000 training digits, SGD lr 1e-3, momentum 0.9, weight decay 5e-4,
cosine schedule, batch 64, 100 epochs. :class:`TrainConfig` holds exactly these defaults.

Optimizer (``make_optimizer``), the same update as PyTorch's ``SGD(lr, momentum, weight_decay)``
with dampening 0, stepped with a per-step cosine schedule:

    g_t   = grad L(theta_t) + wd * theta_t          (optax.add_decayed_weights, all params incl. biases)
    m_t   = momentum * m_{t-1} + g_t,  m_{-1} = 0   (optax.sgd's trace)
    eta_t = lr * (1 + cos(pi * t / T)) / 2,  t = 0..T-1, T = epochs * steps_per_epoch
    theta_{t+1} = theta_t - eta_t * m_t

The loss is the mean softmax cross-entropy of the batch, ``L = -mean_i log pi(y_i | x_i)``.
Initialisation: ``init_params(..., scheme=config.init)`` from ``init_key``; default "torch" (PyTorch's
default, U(+-1/sqrt(fan_in)) per layer), "flax" for flax's defaults.

Batching: the first ``n_train`` rows of the given arrays are used; each epoch ``e`` (0-based)
visits them in the order ``jax.random.permutation(fold_in(data_key, e), n)`` where
``init_key, data_key = jax.random.split(PRNGKey(seed))``; the last, smaller batch is kept
(``drop_last=False``, like PyTorch's DataLoader), so an epoch has ``ceil(n / batch_size)`` steps.

Checkpoints: with ``ckpt_dir``, an orbax checkpoint is written after every epoch (step number =
epochs completed) holding params, opt_state, the data key, the config and the history. With
``resume=True`` training continues from the latest one and ends bit-identical to an
uninterrupted run (same config required).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ldjax.data.mnist import to_float
from ldjax.mnist.models import INPUT_SHAPE, apply_fn, init_params, make_model

__all__ = [
    "TrainConfig",
    "make_optimizer",
    "steps_per_epoch",
    "initial_params",
    "epoch_order",
    "prepare",
    "loss_and_acc",
    "train",
    "evaluate",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the paper's (Figure 1)."""

    model: str = "lenet"  # "lenet" | "mlp"
    n_train: int | None = 2000  # first n_train rows of the given data; None = all
    batch_size: int = 64
    epochs: int = 100
    lr: float = 1e-3  # peak learning rate eta_0
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2 added to the gradient (PyTorch SGD style)
    schedule: str = "cosine"  # "cosine" (to 0 over all steps) | "constant"
    drop_last: bool = False
    seed: int = 0
    init: str = "torch"  # parameter init scheme for init_params: "torch" | "flax"

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.init not in ("torch", "flax"):
            raise ValueError(f"init must be 'torch' or 'flax', got {self.init!r}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"n_train must be >= 1 or None, got {self.n_train}")


def steps_per_epoch(config: TrainConfig, n: int) -> int:
    """Updates per epoch for ``n`` training rows: ``ceil(n / B)`` (``floor`` with drop_last)."""
    steps = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
    if steps < 1:
        raise ValueError(f"{n} training rows give no full batch of {config.batch_size}")
    return steps


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(wd), sgd(schedule, momentum))`` (module docstring formula)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        sched = optax.cosine_decay_schedule(config.lr, decay_steps=total)
    else:
        sched = optax.constant_schedule(config.lr)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(sched, momentum=config.momentum or None),
    )


def _keys(config: TrainConfig):
    init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
    return init_key, data_key


def initial_params(config: TrainConfig, input_shape=INPUT_SHAPE):
    """The parameters :func:`train` starts from (theta_0)."""
    return init_params(make_model(config.model), _keys(config)[0], input_shape, scheme=config.init)


def epoch_order(data_key: jax.Array, epoch: int, n: int) -> np.ndarray:
    """Row order of 0-based ``epoch``: ``int (n,)``."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))


def prepare(images, labels, n: int | None = None, num_classes: int = 10):
    """Validate and convert data: ``x float32 (n, H, W, 1)``, ``y int32 (n,)``.

    ``images`` may be ``uint8 (N, H, W)`` (converted with ``to_float``) or already
    ``float32 (N, H, W, 1)``; the first ``n`` rows are kept (all when None).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype == np.uint8:
        x = to_float(images)
    elif images.ndim == 4 and np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
    else:
        raise ValueError(
            f"images must be uint8 (N, H, W) or float (N, H, W, C); got {images.dtype} "
            f"{images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if n is not None:
        if n > x.shape[0]:
            raise ValueError(f"n_train={n} but only {x.shape[0]} rows were given")
        x, labels = x[:n], labels[:n]
    return x, labels.astype(np.int32)


def loss_and_acc(f: Callable, params, x, y):
    """Mean cross-entropy ``-mean log pi(y|x)`` and accuracy of ``f(params, x)``; scalars."""
    logits = f(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (jnp.argmax(logits, -1) == y).mean()


@functools.lru_cache(maxsize=16)
def _train_step(config: TrainConfig, spe: int):
    """Jitted ``(params, opt_state, xb, yb) -> (params, opt_state, loss, acc)``, cached per
    recipe so repeated :func:`train` calls (resume, tests) compile once."""
    f = apply_fn(make_model(config.model))
    tx = make_optimizer(config, spe)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        (loss, acc), g = jax.value_and_grad(lambda p: loss_and_acc(f, p, xb, yb), has_aux=True)(
            params
        )
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return train_step


def _empty_history():
    return {"epoch": [], "loss": [], "acc": [], "lr": [], "step_loss": []}


def _checkpoint_manager(ckpt_dir, max_to_keep):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(
        Path(ckpt_dir).absolute(), options=options, item_names=("state", "meta")
    )


def train(
    config: TrainConfig,
    images,
    labels,
    *,
    ckpt_dir=None,
    resume: bool = False,
    max_to_keep: int | None = None,
    on_step: Callable | None = None,
    on_epoch: Callable | None = None,
    progress: bool = True,
):
    """Train ``config.model`` on ``(images, labels)``.

    Args:
      config: the recipe (:class:`TrainConfig`).
      images: ``uint8 (N, 28, 28)`` or ``float32 (N, 28, 28, 1)``; labels ``int (N,)``.
      ckpt_dir: folder for orbax checkpoints, one per epoch (step = epochs completed).
      resume: continue from the latest checkpoint in ``ckpt_dir`` (start fresh if none). Without
        it, a ``ckpt_dir`` that already holds checkpoints is an error.
      max_to_keep: keep only the newest this many checkpoints (None keeps all).
      on_step: ``on_step(step, params_before, batch_x, batch_y, params_after)`` after each update;
        ``step`` is the 0-based global index of the update, ``batch_x (B, 28, 28, 1)``,
        ``batch_y (B,)``.
      on_epoch: ``on_epoch(epoch, params)`` after each epoch's checkpoint; ``epoch`` = epochs
        completed (1-based).
      progress: show a tqdm bar over epochs.

    Returns:
      ``(params, history)``; ``history`` has per-epoch lists ``epoch``, ``loss`` and ``acc``
      (means over the epoch's batches, before each update), ``lr`` (eta of the epoch's last
      step) and the per-step list ``step_loss``.
    """
    x, y = prepare(images, labels, config.n_train)
    model = make_model(config.model)
    n = x.shape[0]
    spe = steps_per_epoch(config, n)
    tx = make_optimizer(config, spe)
    init_key, data_key = _keys(config)
    params = init_params(model, init_key, x.shape[1:], scheme=config.init)
    opt_state = tx.init(params)
    history = _empty_history()
    start_epoch = 0
    sched_lr = (
        optax.cosine_decay_schedule(config.lr, config.epochs * spe)
        if config.schedule == "cosine"
        else (lambda t: config.lr)
    )

    if resume and ckpt_dir is None:
        raise ValueError("resume=True needs ckpt_dir")
    mngr = None
    if ckpt_dir is not None:
        import orbax.checkpoint as ocp

        mngr = _checkpoint_manager(ckpt_dir, max_to_keep)
        latest = mngr.latest_step()
        if latest is not None and not resume:
            mngr.close()
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints (latest epoch {latest}); pass resume=True "
                "or use an empty folder"
            )
        if latest is not None:
            target = {"params": params, "opt_state": opt_state, "rng": data_key}
            restored = mngr.restore(
                latest,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
            saved_cfg = restored["meta"]["config"]
            now_cfg = dataclasses.asdict(config)
            diff = {k: (saved_cfg.get(k), v) for k, v in now_cfg.items() if saved_cfg.get(k) != v}
            if diff:
                mngr.close()
                raise ValueError(
                    f"{ckpt_dir}: checkpoint was written with a different config "
                    f"(field: (saved, now)) {diff}"
                )
            st = restored["state"]
            params, opt_state, data_key = st["params"], st["opt_state"], st["rng"]
            history = restored["meta"]["history"]
            start_epoch = int(restored["meta"]["epoch"])

    train_step = _train_step(config, spe)

    bar = tqdm(
        total=config.epochs,
        initial=start_epoch,
        disable=not progress,
        desc=f"{config.model} n={n}",
        unit="epoch",
    )
    try:
        for epoch in range(start_epoch, config.epochs):
            order = epoch_order(data_key, epoch, n)
            losses, accs = [], []
            for b in range(spe):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                xb, yb = x[idx], y[idx]
                new_params, opt_state, loss, acc = train_step(params, opt_state, xb, yb)
                if on_step is not None:
                    on_step(epoch * spe + b, params, xb, yb, new_params)
                params = new_params
                losses.append(loss)
                accs.append(acc)
            step_loss = [float(v) for v in np.asarray(jnp.stack(losses))]
            history["epoch"].append(epoch + 1)
            history["loss"].append(float(np.mean(step_loss)))
            history["acc"].append(float(np.mean(np.asarray(jnp.stack(accs)))))
            history["lr"].append(float(sched_lr((epoch + 1) * spe - 1)))
            history["step_loss"].extend(step_loss)
            if mngr is not None:
                state = {"params": params, "opt_state": opt_state, "rng": data_key}
                meta = {
                    "epoch": epoch + 1,
                    "config": dataclasses.asdict(config),
                    "history": history,
                }
                mngr.save(
                    epoch + 1,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                )
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", acc=f"{history['acc'][-1]:.3f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, params)
    finally:
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    return params, history


def _eval_sums(model, params, x, y):
    loss, acc = loss_and_acc(apply_fn(model), params, x, y)
    return loss * x.shape[0], acc * x.shape[0]


_eval_sums_jit = jax.jit(_eval_sums, static_argnums=0)


def evaluate(params, model, images, labels, *, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a data set.

    Args:
      params: the model's ``'params'``.
      model: a flax module or a name for :func:`~ldjax.mnist.models.make_model`.
      images: ``uint8 (N, 28, 28)`` or ``float32 (N, 28, 28, 1)``; labels ``int (N,)``.

    Returns:
      ``(loss, acc)`` as Python floats.
    """
    if isinstance(model, str):
        model = make_model(model)
    x, y = prepare(images, labels)
    if x.shape[0] == 0:
        raise ValueError("evaluate needs at least one example")
    tot_loss = tot_acc = 0.0
    for s in range(0, x.shape[0], batch_size):
        l, a = _eval_sums_jit(model, params, x[s : s + batch_size], y[s : s + batch_size])
        tot_loss += float(l)
        tot_acc += float(a)
    return tot_loss / x.shape[0], tot_acc / x.shape[0]
