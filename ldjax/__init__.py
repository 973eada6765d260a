"""ldjax: learning dynamics of finetuning in JAX.

One gradient step on (x_u, y_u) changes the log-probabilities on x_o by

    Δlog π(x_o) = −η A(x_o) K(x_o, x_u) G(x_u, y_u) + O(η²)

(Ren & Sutherland, "Learning Dynamics of LLM Finetuning", ICLR 2025, arXiv 2407.10490, §2–3):
``A`` is the Jacobian of log-softmax (:func:`A`), ``K`` the empirical NTK of the logit network
(:func:`entk`, :func:`entk_vp`) and ``G`` the loss's gradient on the logits (:func:`G`).
:func:`decompose` predicts a step, :func:`actual_step` takes it and :func:`compare` measures the
difference. This module is the engine's public face; the implementation lives in ``ldjax._src``.
"""

from ldjax._src import xla_flags as _xla_flags

# before any computation: jaxlib 0.10.2 miscompiles CPU reductions (xla_flags.py)
_xla_flags.apply()

from ldjax import _moved, losses
from ldjax._src.actual_step import ActualStep, actual_step
from ldjax._src.compare import Comparison, compare
from ldjax._src.decompose import Decomposition, decompose
from ldjax._src.entk import (
    DEFAULT_MEMORY_BUDGET,
    IMPLEMENTATIONS,
    REDUCTIONS,
    entk,
    last_position_mask,
)
from ldjax._src.entk import cost as entk_cost
from ldjax._src.entk_vp import entk_vp
from ldjax._src.influence import Influence, default_mesh, influence, load_influence
from ldjax._src.influence import audit as influence_audit
from ldjax._src.log_softmax_jacobian import A, A_norm, apply_A
from ldjax._src.logit_gradient import G
from ldjax._src.optimizer_update import preconditioner
from ldjax._src.projected import (
    ProjectedFeatures,
    ProjectedK,
    entk_projected,
    load_projected_features,
    projected_features,
    projected_kernel,
    projected_kernel_vector,
)
from ldjax._src.token_influence import token_influence
from ldjax._src.trainable import from_nnx, split_trainable
from ldjax._src.version import __version__ as __version__

_moved.install()  # old import paths of the experiments (ldjax.squeeze.lm, ...) keep working

__all__ = [
    "A",
    "A_norm",
    "ActualStep",
    "Comparison",
    "DEFAULT_MEMORY_BUDGET",
    "Decomposition",
    "G",
    "Influence",
    "IMPLEMENTATIONS",
    "ProjectedFeatures",
    "ProjectedK",
    "REDUCTIONS",
    "actual_step",
    "apply_A",
    "compare",
    "decompose",
    "default_mesh",
    "entk",
    "entk_cost",
    "entk_projected",
    "entk_vp",
    "from_nnx",
    "influence",
    "influence_audit",
    "load_influence",
    "last_position_mask",
    "load_projected_features",
    "losses",
    "preconditioner",
    "projected_features",
    "projected_kernel",
    "projected_kernel_vector",
    "split_trainable",
    "token_influence",
]
