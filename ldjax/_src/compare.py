"""How a predicted one-step change compares with the actual one: the two error sources apart."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ldjax._src.actual_step import ActualStep
from ldjax._src.decompose import Decomposition


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Relative errors (‖·‖ over the selected entries) of the prediction against the actual step.

    Attributes:
      entk_step: ``‖Δz_actual − (−ηKG)‖ / ‖Δz_actual‖`` — the eNTK step's error, O(η²).
      linearisation: ``‖A·Δz_actual − Δlog π_actual‖ / ‖Δlog π_actual‖`` — the error of
        linearising log-softmax alone (it uses the actual Δz, so the two sources stay apart).
      linear: ``‖A·Δz_pred − Δlog π_actual‖ / ‖Δlog π_actual‖`` — both together.
      exact: ``‖(log_softmax(z+Δz_pred) − log_softmax(z)) − Δlog π_actual‖ / ‖Δlog π_actual‖``.
      sign_agreement: fraction of entries where predicted and actual Δlog π agree in sign.
    """

    entk_step: float
    linearisation: float
    linear: float
    exact: float
    sign_agreement: float


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def _apply_A(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``A v = v − ⟨π, v⟩`` in float64 (the engine's ``apply_A``, here exact for any model
    dtype)."""
    return v - np.sum(np.exp(_log_softmax(z)) * v, -1, keepdims=True)


def _rel(a, b, w):
    num = np.sqrt(np.sum(w * (a - b) ** 2))
    den = np.sqrt(np.sum(w * b**2))
    return float(num / den) if den > 0 else float(num)


def compare(predicted: Decomposition, actual: ActualStep, mask: Any | None = None) -> Comparison:
    """Splits the prediction's error into the eNTK step and the linearisation of A.

    Everything is computed in float64 from the logits the two sides hold, whatever the model's
    dtype, so that rounding does not pass for an error of the prediction.

    ``mask`` (``(N_o,)`` or ``(N_o, T)``, optional) restricts the norms to selected examples or
    positions (e.g. response tokens).

    Examples:
      >>> import jax.numpy as jnp, ldjax
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"])       # not linear: the error is O(η²)
      >>> params = {"w": jnp.full((2, 3), 0.1)}
      >>> x_o, x_u, y = jnp.array([[1.0, 0.5]]), jnp.array([[0.5, 1.0]]), jnp.array([1])
      >>> err = []
      >>> for eta in (1e-2, 1e-3):
      ...     kw = dict(eta=eta, loss_kwargs=dict(targets=y))
      ...     d = ldjax.decompose(apply_fn, params, x_o, x_u, ldjax.losses.sft, **kw)
      ...     a = ldjax.actual_step(apply_fn, params, x_o, x_u, ldjax.losses.sft, **kw)
      ...     err.append(ldjax.compare(d, a).entk_step)
      >>> 5 < err[0] / err[1] < 20                           # 10× smaller η: about 10× smaller
      True
    """
    if np.shape(predicted.logits) != np.shape(actual.logits):
        raise ValueError(
            f"predicted logits {np.shape(predicted.logits)} and actual logits "
            f"{np.shape(actual.logits)} differ: not the same x_o"
        )
    z = np.asarray(predicted.logits, np.float64)
    z_act = np.asarray(actual.logits, np.float64)
    z_after = np.asarray(actual.logits_after, np.float64)
    dz_a = z_after - z_act
    dz_p = sum(np.asarray(t, np.float64) for t in predicted.parts)
    dl_a = _log_softmax(z_after) - _log_softmax(z_act)
    lin_a = _apply_A(z_act, dz_a)
    lin_p = _apply_A(z, dz_p)
    ex_p = _log_softmax(z + dz_p) - _log_softmax(z)
    w = np.ones(dz_a.shape[:-1] + (1,))
    if mask is not None:
        m = np.asarray(mask, np.float64)
        if m.shape != dz_a.shape[: m.ndim] or m.ndim >= dz_a.ndim:
            raise ValueError(f"mask of shape {m.shape} does not fit logits of shape {dz_a.shape}")
        w = w * m.reshape(m.shape + (1,) * (dz_a.ndim - m.ndim))
    sel = np.broadcast_to(w, dz_a.shape) > 0
    agree = float(np.mean(np.sign(lin_p[sel]) == np.sign(dl_a[sel])))
    return Comparison(
        _rel(dz_p, dz_a, w), _rel(lin_a, dl_a, w), _rel(lin_p, dl_a, w), _rel(ex_p, dl_a, w), agree
    )
