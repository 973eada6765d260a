"""Keeps XLA:CPU from offloading reductions to YNNPACK, which miscompiles them in jaxlib 0.10.2.

jaxlib 0.10.2 (the release pip installs today) sends large reductions on CPU to a
``__ynn_fusion`` that returns **wrong numbers without any error** for some fusions of
broadcast-multiply-reduce (jax-ml/jax#39103; openxla/xla#48714 is a sibling). For ldjax it
hits exactly the Jacobians the eNTK is made of: ``jax.jit(jax.jacrev(layer_norm))`` on a
``(16, 32)`` float32 input is off by 25 % (the vmapped backward pass over ≥ 256 cotangents
is the fusion that breaks), so every Jacobian-row K of a float32 transformer with
``T·V ≳ 256`` was wrong. ``--xla_cpu_experimental_ynn_fusion_type=-reduce`` takes
reductions off that path (dots and element-wise fusions keep it); with it, every
implementation agrees with eager ``jacrev`` and with float64 to 1e-6 again
(``tests/test_entk.py::test_float32_long_sequence``).

XLA reads ``XLA_FLAGS`` once, when the CPU backend starts, so :func:`apply` must run before
the first computation. ``import ldjax`` calls it: it appends the flag unless the user's
``XLA_FLAGS`` already says something about ``xla_cpu_experimental_ynn_fusion_type`` or
``LDJAX_KEEP_XLA_FLAGS=1`` is set. If a backend is already running, it warns instead (the
flag can no longer take effect; restart, or ``import ldjax`` before running anything).
Once the backends have started (and read the flag), ``XLA_FLAGS`` is put back as it was, so
child processes do not inherit it. The flag only concerns the CPU backend; GPU and TPU runs are
unaffected.
"""

from __future__ import annotations

import os
import re
import warnings

try:  # importing jax does not start a backend, so XLA_FLAGS set after this still counts
    from jax._src import xla_bridge as _xla_bridge
except Exception:  # pragma: no cover - private API moved: assume the worst, but do not fail
    _xla_bridge = None

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
_NAME = "xla_cpu_experimental_ynn_fusion_type"
# First jaxlib whose XLA knows the flag: 0.8.0 and older abort the process on it
# ("Unknown flag(s) in XLA_FLAGS"), so on those the flag is not added.
_MIN_JAXLIB = (0, 8, 1)


def _jaxlib_knows_flag() -> bool:
    try:
        from jaxlib import version  # noqa: PLC0415 - read before jax starts, never fails import
    except Exception:  # pragma: no cover - no jaxlib: nothing to configure
        return False
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version.__version__)
    return m is None or tuple(map(int, m.groups())) >= _MIN_JAXLIB


def _backends_started() -> bool:
    if _xla_bridge is None:  # pragma: no cover
        return False
    try:
        return bool(_xla_bridge.backends_are_initialized())
    except Exception:  # pragma: no cover - private API moved: assume the worst, but do not fail
        return False


def apply() -> bool:
    """Adds :data:`FLAG` to ``XLA_FLAGS``; returns whether the running process will use it."""
    if os.environ.get("LDJAX_KEEP_XLA_FLAGS") == "1":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if _NAME in flags:
        return FLAG in flags.split()
    if not _jaxlib_knows_flag():
        return False
    if _backends_started():
        warnings.warn(
            "ldjax was imported after JAX started its backends, so it could not add "
            f"{FLAG} to XLA_FLAGS. On CPU, jaxlib 0.10.2 then miscompiles some large reductions "
            "(wrong Jacobians, no error; jax-ml/jax#39103). Import ldjax before running any JAX "
            f"computation, or set XLA_FLAGS={FLAG} yourself.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    had = "XLA_FLAGS" in os.environ
    os.environ["XLA_FLAGS"] = (flags + " " + FLAG).strip()
    _restore_after_backend_start(flags if had else None)
    return True


def _restore_after_backend_start(original):
    """Puts the user's ``XLA_FLAGS`` back once the backends have read it, so that child
    processes (e.g. an older jaxlib, which rejects unknown flags) do not inherit the flag."""
    # jax < 0.10.2 has no such hook: the flag then stays in XLA_FLAGS
    register = getattr(_xla_bridge, "register_backend_initialization_hook", None)
    if register is None:  # pragma: no cover
        return
    done = []

    def hook(_backend):
        if done:
            return
        done.append(True)
        if original is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = original

    register(hook)
