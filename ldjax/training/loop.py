"""The one training loop of ldjax: the MNIST recipe, every LM phase and the squeeze LM train on it.

:func:`train_loop` runs a jitted ``step_fn`` over step-indexed batches, checkpoints (orbax,
:mod:`ldjax.training.checkpoint`), resumes, and calls hooks. What a model family brings is
its step function, its batches and its fingerprint; the loop owns everything else.

Order of work at each update ``s`` (0-based; ``step = s + 1`` updates are done after it)::

    batch = batch_fn(s, params)                     # host arrays; depends only on s (and params)
    params, opt_state, metrics = step_fn(params, opt_state, batch, s)
    on_step(s, params_before, batch, params_after, metrics, opt_state_before)
    each of callbacks(...) with the same arguments; a returned dict is logged to the history
    on_eval(step, params)        if step % eval_every == 0 or step == total_steps
    save checkpoint              if step % checkpoint_every == 0, step == total_steps or stop_at
    on_checkpoint(step, params)  at the same steps as a checkpoint (also without checkpoint_dir)

``on_eval(0, params)`` also runs once before the first update of a fresh run. Evaluation runs
before the checkpoint of the same step, so whatever it records belongs to the resumable state.

Resume: with ``resume=True`` the loop restores the newest checkpoint of ``checkpoint_dir``
(parameters, optimizer state, ``extra`` state and the per-step history), verified by
:meth:`~ldjax.training.checkpoint.Checkpoints.restore`; refuses one whose ``fingerprint`` differs
from this run's or whose step, history and folder name disagree; and continues. A damaged newest
checkpoint is an error; only ``resume_older=True`` falls back to an older one, saying so. Since
batches depend only on the step, a resumed run ends bit-identical to an uninterrupted one. A
finished run resumes to its result without training. Without ``resume``, a ``checkpoint_dir``
that already holds checkpoints is an error (nothing is overwritten).

The history holds one entry per update: ``history["step"]`` (updates done) and one list per
metric that ``step_fn`` returns (host floats). A hook (``on_step`` or one of ``callbacks``) that
returns a dict ``{name: float}`` logs it at that update: ``history[name]`` is a per-update list
too, NaN at the updates where the hook returned nothing (a monitor that measures every k steps,
e.g. :class:`ldjax.training.monitor.SqueezeMonitor`). Such entries are saved with the
checkpoints and survive a resume like the step metrics.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ldjax.training.checkpoint import CheckpointError, Checkpoints
from ldjax.training.config import to_jsonable

__all__ = ["LoopResult", "train_loop"]


@dataclasses.dataclass
class LoopResult:
    """What :func:`train_loop` returns.

    Attributes:
      params, opt_state, extra: the state after the last update run.
      history: per-update lists: ``step`` (updates done, 1-based) and every metric.
      step: updates done; total_steps: updates planned.
      completed: ``step == total_steps`` (False when stopped early by ``stop_at``).
      resumed_from: the checkpoint step resumed from (None: a fresh start).
      seconds: wall time of this call.
      last_batch: the host arrays of the last batch trained on (None if none was).
    """

    params: Any
    opt_state: Any
    extra: Any
    history: dict
    step: int
    total_steps: int
    completed: bool
    resumed_from: int | None
    seconds: float
    last_batch: dict | None = None


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _log(history: dict, logged, where: str) -> None:
    """Appends a hook's ``{name: float}`` to the history at the last update (NaN-padded)."""
    if logged is None:
        return
    if not isinstance(logged, dict):
        raise TypeError(
            f"{where} must return None or a dict of floats, got {type(logged).__name__}"
        )
    n = len(history["step"])
    for k, v in logged.items():
        if k == "step":
            raise ValueError(f"{where} returned the reserved history key 'step'")
        col = history.setdefault(k, [])
        col.extend([float("nan")] * (n - 1 - len(col)))
        col.append(float(v))


def _pad(history: dict, keys) -> None:
    """NaN-pads columns to one entry per update (hook-logged ones skip updates)."""
    n = len(history["step"])
    for k in keys:
        col = history.get(k)
        if col is not None and len(col) < n:
            col.extend([float("nan")] * (n - len(col)))


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def train_loop(
    step_fn: Callable,
    params: Any,
    opt_state: Any,
    batch_fn: Callable[[int, Any], Any],
    *,
    total_steps: int,
    name: str = "train",
    extra: Any = None,
    fingerprint: dict | None = None,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    checkpoint_label: Callable[[int], int] = lambda step: step,
    max_to_keep: int | None = None,
    resume: bool = False,
    resume_older: bool = False,
    eval_every: int | None = None,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
    on_checkpoint: Callable | None = None,
    callbacks: Sequence[Callable] = (),
    stop_at: int | None = None,
    progress: bool = True,
) -> LoopResult:
    """Trains ``params`` for ``total_steps`` updates (module docstring for the order of work).

    Args:
      step_fn: ``(params, opt_state, batch, s) -> (params, opt_state, metrics)``, usually jitted;
        ``s`` is the 0-based update index as an int32 array (for schedules), ``metrics`` a dict
        of scalars (``loss`` is shown on the progress bar).
      params, opt_state: the state before the first update.
      batch_fn: ``(s, params) -> batch``, the batch of update ``s`` (host arrays).
      total_steps: updates of the whole run.
      name: shown on the progress bar and in errors.
      extra: more state to checkpoint and restore with the parameters (e.g. RNG keys), a pytree.
      fingerprint: a JSON-able description of everything that must match to resume.
      checkpoint_dir: orbax folder (None: no checkpoints).
      checkpoint_every: checkpoint (and ``on_checkpoint``) every this many updates; the end of
        the run (and ``stop_at``) always checkpoints.
      checkpoint_label: the step number a checkpoint is saved under, from updates done (e.g.
        ``lambda s: s // steps_per_epoch`` names checkpoints by epoch).
      max_to_keep: keep only the newest this many checkpoints.
      resume: continue from the newest checkpoint of ``checkpoint_dir`` (fresh if there is none).
        A newest checkpoint that fails a check (:class:`~ldjax.training.checkpoint.CheckpointError`)
        is an error.
      resume_older: with ``resume``, when the newest checkpoint fails a check, resume from the
        newest older one that passes, print which to stderr, and set the rejected ones aside
        (renamed ``<step>.rejected``); never the default.
      eval_every: ``on_eval`` every this many updates (and at 0 and the end).
      on_step: ``on_step(s, params_before, batch, params_after, metrics, opt_state_before)``
        after every update (the optimizer state the update started from, for optimizer-aware
        predictions of the step).
      callbacks: more hooks with ``on_step``'s arguments, called after it in order (training
        monitors; any callable). A dict returned by ``on_step`` or a callback is logged to the
        history (module docstring).
      on_eval: ``on_eval(step, params)``.
      on_checkpoint: ``on_checkpoint(step, params)`` after each checkpoint step.
      stop_at: stop after this many updates (with a checkpoint), to resume later.
      progress: show a progress bar.
    Returns:
      A :class:`LoopResult`.
    """
    t0 = time.time()
    total = int(total_steps)
    if total < 1:
        raise ValueError(f"{name}: total_steps must be >= 1, got {total_steps}")
    if resume and checkpoint_dir is None:
        raise ValueError(f"{name}: resume=True needs a checkpoint folder")
    fingerprint = to_jsonable(dict(fingerprint or {}, total_steps=total))
    history: dict = {"step": []}
    start, resumed_from = 0, None
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = Checkpoints(checkpoint_dir, max_to_keep=max_to_keep)
        latest = ckpt.latest()
        if latest is not None and not resume:
            ckpt.close()
            raise ValueError(
                f"{checkpoint_dir} already holds {name} checkpoints (latest {latest}); "
                "pass resume=True (--resume) or use an empty folder"
            )
        if latest is not None:
            like = {"params": params, "opt_state": opt_state, "extra": extra}

            def check_meta(loaded: int, meta: dict) -> None:
                """Before any array is read: the same configuration, a consistent meta."""
                where = f"{name} checkpoint {ckpt.directory / str(loaded)}"
                saved = meta.get("fingerprint")
                if saved != fingerprint:
                    saved = saved if isinstance(saved, dict) else {}
                    diff = {
                        k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v
                    }
                    raise ValueError(
                        f"{where}: written with another configuration; different config "
                        f"fields (saved, now): {diff}"
                    )
                hist, step = meta.get("history"), meta.get("step")
                n = len(hist.get("step", ())) if isinstance(hist, dict) else None
                label = checkpoint_label(step) if isinstance(step, int) else None
                if (
                    n != step
                    or label != loaded
                    or not (isinstance(step, int) and 0 < step <= total)
                ):
                    raise CheckpointError(
                        f"{where}: its meta disagrees with itself: step {step!r}, {n} updates in "
                        f"its history, saved as step {loaded} (expected {label}), total_steps "
                        f"{total}"
                    )

            try:
                state, meta = ckpt.restore(like=like, fallback=resume_older, check_meta=check_meta)
                for s, _reason in ckpt.rejected:
                    print(
                        f"{name}: set aside the rejected checkpoint as {ckpt.set_aside(s)}",
                        file=sys.stderr,
                    )
            except BaseException:
                ckpt.close()
                raise
            params, opt_state, extra = state["params"], state["opt_state"], state["extra"]
            history = meta["history"]
            start = resumed_from = meta["step"]

    def save(step):
        if ckpt is not None:
            ckpt.save(
                checkpoint_label(step),
                {"params": params, "opt_state": opt_state, "extra": extra},
                {"step": step, "fingerprint": fingerprint, "history": history},
            )

    end = total if stop_at is None else min(total, max(int(stop_at), start))
    hooks = ([on_step] if on_step is not None else []) + list(callbacks)
    batch, step = None, start
    bar = tqdm(
        total=total, initial=start, disable=not progress, desc=name, unit="step", mininterval=2.0
    )
    try:
        if start == 0 and on_eval is not None:
            on_eval(0, params)
        for s in range(start, end):
            batch = batch_fn(s, params)
            before, state_before = params, opt_state
            params, opt_state, metrics = step_fn(
                params, opt_state, batch, jnp.asarray(s, jnp.int32)
            )
            host = _host(metrics)
            step = s + 1
            history["step"].append(step)
            for k, v in host.items():
                history.setdefault(k, []).append(v)
            for i, hook in enumerate(hooks):
                _log(
                    history, hook(s, before, batch, params, host, state_before), f"{name}: hook {i}"
                )
            _pad(history, list(history))
            bar.update(1)
            if "loss" in host and (step % 5 == 0 or step == end):
                bar.set_postfix(loss=f"{host['loss']:.4f}")
            if on_eval is not None and (_due(step, eval_every) or step == total):
                on_eval(step, params)
            if _due(step, checkpoint_every) or step == total or step == end:
                save(step)
                if on_checkpoint is not None:
                    on_checkpoint(step, params)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    last = None
    if batch is not None and isinstance(batch, dict):
        last = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, (list, tuple))}
    return LoopResult(
        params,
        opt_state,
        extra,
        history,
        step,
        total,
        step == total,
        resumed_from,
        time.time() - t0,
        last,
    )
