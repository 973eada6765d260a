"""ldjax: learning dynamics of finetuning in JAX.

One gradient step on (x_u, y_u) changes the log-probs on x_o by
``Δlog π(x_o) = −η A(x_o) K(x_o, x_u) G(x_u, y_u) + O(η²)`` (Ren & Sutherland, ICLR 2025).
"""

from ldjax import _xla_flags

_xla_flags.apply()  # before any computation: see ldjax/_xla_flags.py (jaxlib 0.10.2 CPU bug)

from ldjax import losses  # noqa: E402
from ldjax.ntk import cost as entk_cost
from ldjax.ntk import entk, last_position_mask
from ldjax.residual import G
from ldjax.softmax_jacobian import A, A_norm, apply_A
from ldjax.trainable import from_nnx, split_trainable
from ldjax.vector_products import entk_vp

__version__ = "0.1.0"
from ldjax.decompose import Decomposition, decompose
from ldjax.step import ActualStep, Comparison, actual_step, compare
