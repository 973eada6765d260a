"""Training infrastructure shared by every model family: one loop, one checkpoint format, one
config style (:mod:`~ldjax.training.loop`, :mod:`~ldjax.training.checkpoint`,
:mod:`~ldjax.training.config`)."""

from ldjax.training.checkpoint import CheckpointError, Checkpoints, load_params, save_params
from ldjax.training.config import Config
from ldjax.training.loop import LoopResult, train_loop

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "Config",
    "LoopResult",
    "load_params",
    "save_params",
    "train_loop",
]
