"""Finetuning losses as functions of logits, one value per example (public face of
:mod:`ldjax._src.losses`).

Classifier logits ``(N, V)`` with integer ``targets (N,)``; sequence logits ``(N, T, V)`` with
``targets (N, T)`` already shifted and ``mask (N, T)`` True on response positions. The DPO family
takes two logits arguments, ``(z⁺, z⁻)``.
"""

from ldjax._src.losses import PAIRWISE as PAIRWISE
from ldjax._src.losses import dpo as dpo
from ldjax._src.losses import ipo as ipo
from ldjax._src.losses import sequence_logprob as sequence_logprob
from ldjax._src.losses import sft as sft
from ldjax._src.losses import slic as slic
from ldjax._src.losses import sppo as sppo
from ldjax._src.losses import token_logprobs as token_logprobs

__all__ = ["PAIRWISE", "dpo", "ipo", "sequence_logprob", "sft", "slic", "sppo", "token_logprobs"]
