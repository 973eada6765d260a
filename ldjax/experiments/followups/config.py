"""Configuration of ``ldjax reproduce followups`` (frozen dataclasses, JSON round-trip, presets).

One :class:`FollowupsConfig` holds the small LM, its SFT, the DPO-pair analyses
(entanglement, displacement) and the GRPO run. Two presets: :data:`QUICK` (a tiny model, a few
dozen steps: the CI run, ≤ 3 minutes on 2 quiet cores) and :data:`DEFAULT` (the full run, ≤ 30
minutes on 2 quiet cores).
"""

from __future__ import annotations

import dataclasses
import os

from ldjax.lm.config import ModelConfig
from ldjax.training.config import Config

__all__ = [
    "SFTModelConfig",
    "PairsConfig",
    "GRPOConfig",
    "FollowupsConfig",
    "QUICK",
    "DEFAULT",
    "PRESETS",
    "load_config",
]


@dataclasses.dataclass(frozen=True)
class SFTModelConfig(Config):
    """The SFT model every analysis starts from: a byte-level transformer trained from scratch
    by SFT (response tokens only) on the synthetic records' chosen responses
    (``n_records`` of every topic, seed 0) plus ``n_arith`` extra arithmetic records (seed 1),
    so that the arithmetic template is learnt well enough to sample correct answers.

    Attributes:
      model: the transformer's shape. max_len, max_prompt_len: context and prompt tokens
        (the prompt's end is kept). steps, batch_size, lr, warmup: Adam with a cosine schedule.
    """

    model: ModelConfig = ModelConfig(d_model=64, n_heads=2, n_layers=2, d_ff=256)
    max_len: int = 224
    max_prompt_len: int = 96
    n_records: int = 300
    n_arith: int = 300
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30


@dataclasses.dataclass(frozen=True)
class PairsConfig(Config):
    """The per-pair DPO analyses (entanglement, displacement).

    Attributes:
      n_pairs: preference pairs (the first synthetic records of seed 0, every topic: the SFT
        model was trained on their chosen responses).
      beta: DPO's β. eta: the SGD step taken on each pair alone (from the SFT model, which is
        also π_ref, so the DPO gradient is ``−β/2 (∇log π(y⁺) − ∇log π(y⁻))``); None: one η for
        all pairs, chosen so that the median predicted ``|Δlog π(y⁺)| + |Δlog π(y⁻)|`` over the
        pairs is ``step_nats`` (a small step whose first-order prediction is informative).
    """

    n_pairs: int = 96
    beta: float = 0.1
    eta: float | None = None
    step_nats: float = 2.0


@dataclasses.dataclass(frozen=True)
class GRPOConfig(Config):
    """The GRPO run (on-policy, one update per sampled batch, plain SGD so the one-step
    decomposition is the update itself).

    Attributes:
      n_prompts: arithmetic training prompts (records of seed 2, never seen in SFT).
      prompts_per_step, group_size: prompts per update and responses sampled per prompt.
      max_new_tokens: sampled response length cap; temperature: sampling temperature.
      steps, lr: updates and SGD step size. clip_eps: the ratio clip (inactive on-policy).
      n_track: tracked prompts (the first prompts whose group at step 0 has both correct and
        incorrect responses); their step-0 responses are re-scored after every update.
      tau, down_weight: NTHR's threshold on the normalised influence and the weight of the
        flagged tokens (:func:`ldjax.losses.grpo_nthr`).
      decompose_scale: the one-step decomposition is of a step this many times the training
        step (a smaller step, where the first-order prediction is close to the actual one; the
        terms scale with it).
      anchor: a group with no correct sampled response gets the record's reference (chosen)
        response in place of its last sample, so every group has a correct response to anchor
        on (off-policy guidance; without it a weak SFT model gives groups of zero advantage).
      seeds: number of seeds (the sampling keys; the SFT model is the same).
    """

    n_prompts: int = 64
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 127
    temperature: float = 1.0
    steps: int = 30
    lr: float = 0.05
    clip_eps: float = 0.2
    n_track: int = 8
    tau: float = 1.0
    down_weight: float = 0.5
    decompose_scale: float = 0.1
    anchor: bool = True
    seeds: int = 3


@dataclasses.dataclass(frozen=True)
class FollowupsConfig(Config):
    """Everything ``ldjax reproduce followups`` runs: the SFT model, the pair analyses, the GRPO
    run, and ``seed`` (the SFT model's initialisation and batch order)."""

    sft: SFTModelConfig = SFTModelConfig()
    pairs: PairsConfig = PairsConfig()
    grpo: GRPOConfig = GRPOConfig()
    seed: int = 0

    def lm_config(self):
        """The :class:`ldjax.lm.model.LMConfig` of the SFT model."""
        return self.sft.model.lm_config(self.sft.max_len)


DEFAULT = FollowupsConfig()
QUICK = FollowupsConfig(
    sft=SFTModelConfig(
        model=ModelConfig(d_model=32, n_heads=2, n_layers=1, d_ff=128),
        max_len=224,
        max_prompt_len=96,
        n_records=96,
        n_arith=96,
        steps=150,
        lr=5e-3,
        warmup=10,
    ),
    pairs=PairsConfig(n_pairs=32),
    grpo=GRPOConfig(
        n_prompts=16,
        prompts_per_step=4,
        group_size=6,
        max_new_tokens=62,
        steps=5,
        n_track=4,
        seeds=3,
    ),
)
PRESETS = {"default": DEFAULT, "quick": QUICK}


def load_config(path: str | os.PathLike, base: FollowupsConfig = DEFAULT) -> FollowupsConfig:
    """A JSON file (full or partial) merged onto ``base``; unknown fields are errors."""
    return FollowupsConfig.load(path, base)
