"""Finetuning losses as functions of logits, one value per example (public face of
:mod:`ldjax._src.losses`).

Classifier logits ``(N, V)`` with integer ``targets (N,)``; sequence logits ``(N, T, V)`` with
``targets (N, T)`` already shifted and ``mask (N, T)`` True on response positions. The DPO family
takes two logits arguments, ``(z⁺, z⁻)``; the GRPO family (:data:`GROUP`) one, a group of sampled
responses with their advantages.
"""

from ldjax._src.losses import GROUP as GROUP
from ldjax._src.losses import PAIRWISE as PAIRWISE
from ldjax._src.losses import dpo as dpo
from ldjax._src.losses import group_advantages as group_advantages
from ldjax._src.losses import grpo as grpo
from ldjax._src.losses import grpo_nthr as grpo_nthr
from ldjax._src.losses import ipo as ipo
from ldjax._src.losses import nthr_influence as nthr_influence
from ldjax._src.losses import nthr_weights as nthr_weights
from ldjax._src.losses import sequence_logprob as sequence_logprob
from ldjax._src.losses import sft as sft
from ldjax._src.losses import slic as slic
from ldjax._src.losses import sppo as sppo
from ldjax._src.losses import token_logprobs as token_logprobs

__all__ = [
    "GROUP",
    "PAIRWISE",
    "dpo",
    "group_advantages",
    "grpo",
    "grpo_nthr",
    "ipo",
    "nthr_influence",
    "nthr_weights",
    "sequence_logprob",
    "sft",
    "slic",
    "sppo",
    "token_logprobs",
]
