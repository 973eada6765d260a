"""Train the MNIST warm-up classifier with the paper's recipe (optax SGD, orbax checkpoints).

Paper (Figure 1): LeNet on 2,000 training digits, SGD lr 1e-3, momentum 0.9, weight decay 5e-4,
cosine schedule, batch 64, 100 epochs. :class:`TrainConfig` holds exactly these defaults.

Optimizer (``make_optimizer``), the same update as PyTorch's ``SGD(lr, momentum, weight_decay)``
with dampening 0, stepped with a per-step cosine schedule:

    g_t   = grad L(theta_t) + wd * theta_t          (optax.add_decayed_weights, all params
    incl. biases)
    m_t   = momentum * m_{t-1} + g_t,  m_{-1} = 0   (optax.sgd's trace)
    eta_t = lr * (1 + cos(pi * t / T)) / 2,  t = 0..T-1, T = epochs * steps_per_epoch
    theta_{t+1} = theta_t - eta_t * m_t

The loss is the mean softmax cross-entropy of the batch, ``L = -mean_i log pi(y_i | x_i)``.
Initialisation: ``init_params(..., scheme=config.init)`` from ``init_key``; default "torch"
(PyTorch's default, U(+-1/sqrt(fan_in)) per layer), "flax" for flax's defaults.

Batching: the first ``n_train`` rows of the given arrays are used; each epoch ``e`` (0-based)
visits them in the order ``jax.random.permutation(fold_in(data_key, e), n)`` where
``init_key, data_key = jax.random.split(PRNGKey(seed))``; the last, smaller batch is kept
(``drop_last=False``, like PyTorch's DataLoader), so an epoch has ``ceil(n / batch_size)`` steps.

Training runs on the one loop of ldjax (:func:`ldjax.training.train_loop`). Checkpoints: with
``ckpt_dir``, an orbax checkpoint (:mod:`ldjax.training.checkpoint`) is written after every epoch
(named by epochs completed) holding params, opt_state, the data key, the config and the history.
With ``resume=True`` training continues from the latest one and ends bit-identical to an
uninterrupted run (same config required).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax.data.mnist import to_float
from ldjax.mnist.models import INPUT_SHAPE, apply_fn, init_params, make_model
from ldjax.training.config import Config
from ldjax.training.loop import train_loop

__all__ = [
    "TrainConfig",
    "PAPER",
    "QUICK",
    "PRESETS",
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
class TrainConfig(Config):
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


PAPER = TrainConfig()
"""The paper's recipe (Figure 1): LeNet, 2,000 digits, 100 epochs, SGD lr 1e-3, momentum 0.9."""

QUICK = TrainConfig(n_train=800, epochs=5, lr=0.1)
"""A smoke run: 5 epochs at peak lr 0.1 on 800 digits (about a minute on 2 CPU cores)."""

PRESETS = {"paper": PAPER, "quick": QUICK}


def steps_per_epoch(config: TrainConfig, n: int) -> int:
    """Updates per epoch for ``n`` training rows: ``ceil(n / B)`` (``floor`` with drop_last)."""
    steps = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
    if steps < 1:
        raise ValueError(f"{n} training rows give no full batch of {config.batch_size}")
    return steps


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(wd), sgd(schedule, momentum))`` (module docstring formula)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(_schedule(config, steps_per_epoch), momentum=config.momentum or None),
    )


def _schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """eta_t: cosine decay to 0 over all updates, or constant."""
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, decay_steps=config.epochs * steps_per_epoch)
    return optax.constant_schedule(config.lr)


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
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
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
    """Jitted ``(params, opt_state, batch, s) -> (params, opt_state, metrics)`` (the loop's step
    function), cached per recipe so repeated :func:`train` calls (resume, tests) compile once."""
    f = apply_fn(make_model(config.model))
    tx = make_optimizer(config, spe)
    sched = _schedule(config, spe)

    @jax.jit
    def train_step(params, opt_state, batch, s):
        (loss, acc), g = jax.value_and_grad(
            lambda p: loss_and_acc(f, p, batch["x"], batch["y"]), has_aux=True
        )(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return (
            optax.apply_updates(params, updates),
            opt_state,
            {"loss": loss, "acc": acc, "lr": sched(s)},
        )

    return train_step


def _epoch_history(history: dict, spe: int) -> dict:
    """Per-epoch means of the loop's per-update history (``loss``, ``acc``; ``lr`` of the epoch's
    last update) and every update's loss."""
    loss, acc, lr = history.get("loss", []), history.get("acc", []), history.get("lr", [])
    n = len(loss) // spe
    return {
        "epoch": list(range(1, n + 1)),
        "loss": [float(np.mean(loss[e * spe : (e + 1) * spe])) for e in range(n)],
        "acc": [float(np.mean(acc[e * spe : (e + 1) * spe])) for e in range(n)],
        "lr": [float(lr[(e + 1) * spe - 1]) for e in range(n)],
        "step_loss": [float(v) for v in loss[: n * spe]],
    }


def train(
    config: TrainConfig,
    images,
    labels,
    *,
    ckpt_dir=None,
    resume: bool = False,
    resume_older: bool = False,
    max_to_keep: int | None = None,
    on_step: Callable | None = None,
    on_epoch: Callable | None = None,
    progress: bool = True,
):
    """Train ``config.model`` on ``(images, labels)`` with :func:`ldjax.training.train_loop`.

    Args:
      config: the recipe (:class:`TrainConfig`).
      images: ``uint8 (N, 28, 28)`` or ``float32 (N, 28, 28, 1)``; labels ``int (N,)``.
      ckpt_dir: folder for orbax checkpoints, one per epoch (named by epochs completed).
      resume: continue from the latest checkpoint in ``ckpt_dir`` (start fresh if none). Without
        it, a ``ckpt_dir`` that already holds checkpoints is an error. A damaged latest
        checkpoint is an error too, unless ``resume_older``: then the newest older checkpoint that
        passes its checks is used, and said so on stderr.
      max_to_keep: keep only the newest this many checkpoints (None keeps all).
      on_step: ``on_step(step, params_before, batch_x, batch_y, params_after)`` after each update
        (with a keyword ``opt_state`` in its signature, also the optimizer state the update
        started from, for optimizer-aware predictions);
        ``step`` is the 0-based global index of the update, ``batch_x (B, 28, 28, 1)``,
        ``batch_y (B,)``.
      on_epoch: ``on_epoch(epoch, params)`` after each epoch's checkpoint; ``epoch`` = epochs
        completed (1-based).
      progress: show a progress bar.

    Returns:
      ``(params, history)``; ``history`` has per-epoch lists ``epoch``, ``loss`` and ``acc``
      (means over the epoch's batches, before each update), ``lr`` (eta of the epoch's last
      step) and the per-step list ``step_loss``.
    """
    x, y = prepare(images, labels, config.n_train)
    n = x.shape[0]
    spe = steps_per_epoch(config, n)
    tx = make_optimizer(config, spe)
    init_key, data_key = _keys(config)
    params = init_params(make_model(config.model), init_key, x.shape[1:], scheme=config.init)
    step = _train_step(config, spe)

    def batch_fn(s, _params):
        epoch, b = divmod(s, spe)
        idx = epoch_order(data_key, epoch, n)[b * config.batch_size : (b + 1) * config.batch_size]
        return {"x": x[idx], "y": y[idx]}

    wants_state = on_step is not None and "opt_state" in inspect.signature(on_step).parameters

    def hook(s, before, batch, after, _metrics, state):
        if wants_state:
            on_step(s, before, batch["x"], batch["y"], after, opt_state=state)
        else:
            on_step(s, before, batch["x"], batch["y"], after)

    res = train_loop(
        step,
        params,
        tx.init(params),
        batch_fn,
        total_steps=config.epochs * spe,
        name=f"{config.model} n={n}",
        extra={"rng": data_key},
        fingerprint={"config": dataclasses.asdict(config)},
        checkpoint_dir=ckpt_dir,
        checkpoint_every=spe,
        checkpoint_label=lambda s: s // spe,
        max_to_keep=max_to_keep,
        resume=resume,
        resume_older=resume_older,
        on_step=None if on_step is None else hook,
        on_checkpoint=None if on_epoch is None else (lambda s, p: on_epoch(s // spe, p)),
        progress=progress,
    )
    return res.params, _epoch_history(res.history, spe)


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
