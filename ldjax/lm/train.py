"""Training phases of the LM: pretrain, SFT, and the DPO family, on the one training loop.

Every phase is one call ``phase(params, ..., cfg, *, ckpt_dir, resume, on_eval, ...)`` that
returns a :class:`PhaseResult`. The phases run on :func:`ldjax.training.train_loop`;
:func:`run_phase` supplies what is the LM's own:

* Optimizer (:func:`make_optimizer`): ``clip_by_global_norm(grad_clip)`` then RMSprop (PyTorch's
  update: ν ← 0.99 ν + 0.01 g², Δθ = −η g / (√ν + 1e-8), the paper's optimizer), Adam or plain SGD,
  with the learning rate η_t of :func:`lr_schedule` (linear warm-up from 0, then constant / linear /
  cosine decay to 0).
* Data order: step ``s`` (0-based) uses batch ``s mod E`` of epoch ``s // E`` (E = ⌊n / B⌋
  drop-last batches), the epoch's order being ``jax.random.permutation(fold_in(data_key, epoch),
  n)`` with ``data_key, sample_key = split(PRNGKey(cfg.seed))``. On-policy sampling at step ``s``
  uses ``fold_in(sample_key, s)``. So the batch and the samples of a step depend only on
  (seed, step): a resumed run sees exactly the data of an uninterrupted one.
* Checkpoints (``ckpt_dir``): the loop's orbax checkpoints (:mod:`ldjax.training.checkpoint`:
  params, optimizer state and data key, with checksums; step, config fingerprint and history as
  JSON), written every ``cfg.ckpt_every`` steps and at the end of the phase.
  ``resume=True`` restores the latest and continues; the final parameters are bit-identical to an
  uninterrupted run. A finished phase resumes to its result without training.
* Hooks: ``on_eval(step, params)`` at step 0 (before any update, skipped when resuming), every
  ``cfg.eval_every`` updates and at the end; ``on_step(step, metrics)`` after every update
  (``step`` = updates done, ``metrics`` host floats). Evaluation runs before the checkpoint of the
  same step.
* Every step's ``G_norm_sq`` = ‖G‖²_F, G = ∂L_batch/∂z the residual of the step's objective
  with respect to all logits of the batch (both branches for the DPO family); the probe tracker's
  LBK proxy uses it (:mod:`ldjax.experiments.lm.tracking`).

Losses come from :mod:`ldjax.losses` only:

* pretrain: ``Σ_n sft(z_n, targets_n, mask_n) / Σ mask`` — next-token cross-entropy averaged over
  all real tokens (mask = every position whose target is not PAD);
* SFT: the same with the response mask (prompt tokens are not trained on), i.e. the token mean of
  ``−log π(y|x)``;
* DPO/IPO/SLiC/SPPO: the mean over pairs of ``ldjax.losses.<name>(z⁺, z⁻, ...)``, reference
  log-probs from the frozen reference model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax import losses
from ldjax.data.preferences import encode_field, encode_prompt
from ldjax.lm.config import PhaseConfig, PreferenceConfig, PretrainConfig, SFTConfig
from ldjax.lm.decode import generate
from ldjax.lm.model import make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer
from ldjax.training.checkpoint import load_params, save_params
from ldjax.training.loop import train_loop
from ldjax.training.monitor import SqueezeMonitor, StepSpec

__all__ = [
    "monitor_spec",
    "squeeze_monitor",
    "phase_keys",
    "sft_objective",
    "pair_objective",
    "PhaseResult",
    "lr_schedule",
    "make_optimizer",
    "batch_indices",
    "encode_texts",
    "encode_ids",
    "sft_examples",
    "pair_examples",
    "sequence_logprobs",
    "sample_responses",
    "run_phase",
    "pretrain",
    "sft",
    "preference",
    "save_params",
    "load_params",
]


@dataclasses.dataclass
class PhaseResult:
    """What a phase returns.

    Attributes:
      params: the parameters after the last step run.
      history: per-step lists (``step``, ``loss``, ``lr``, ``grad_norm``, ``G_norm_sq`` and the
        phase's own metrics), ``step`` counting updates done (1-based).
      total_steps: the phase's planned number of updates; ``step`` the updates done.
      completed: ``step == total_steps`` (False when stopped early by ``stop_at``).
      resumed_from: the checkpoint step resumed from (None: fresh start).
      seconds: wall time of this call.
      last_batch: the host arrays of the last training batch (for inspection/tests).
      opt_state: the optimizer's state after the last step run.
    """

    params: dict
    history: dict
    total_steps: int
    step: int
    completed: bool
    resumed_from: int | None
    seconds: float
    last_batch: dict | None = None
    opt_state: Any = None


# ----------------------------------------------------------------------------------------------
# Optimizer and data order
# ----------------------------------------------------------------------------------------------


def lr_schedule(cfg: PhaseConfig, total_steps: int) -> optax.Schedule:
    """η_t: linear warm-up 0 → ``cfg.lr`` over ``cfg.warmup`` steps, then ``cfg.schedule``."""
    warm = min(cfg.warmup, max(total_steps - 1, 0))
    rest = max(total_steps - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, rest)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, rest)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def make_optimizer(cfg: PhaseConfig, total_steps: int) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm(clip), <optimizer>(η_t))`` (module docstring)."""
    sched = lr_schedule(cfg, total_steps)
    if cfg.optimizer == "rmsprop":
        opt = optax.rmsprop(sched, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    elif cfg.optimizer == "adam":
        opt = optax.adam(sched)
    elif cfg.optimizer == "sgd":
        opt = optax.sgd(sched)
    else:  # config validation makes this unreachable
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if cfg.grad_clip:
        return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), opt)
    return opt


def phase_keys(cfg: PhaseConfig) -> tuple:
    """``(data_key, sample_key)`` of a phase: its batches (:func:`batch_indices`) and on-policy
    samples depend only on these and the step."""
    data_key, sample_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    return data_key, sample_key


_keys = phase_keys


def sft_objective(logits, targets, mask, ntok):
    """One example's share of the SFT/pretraining objective ``Σ_n sft(z_n, y_n, m_n) / Σ mask``:
    ``sft(z, y, m) / ntok`` (``ntok``: the batch's response tokens). Summed over the batch it is
    the objective the phase's optimizer steps on, which :func:`ldjax.decompose` predicts."""
    return losses.sft(logits, targets, mask) / ntok


def pair_objective(logits_pos, logits_neg, *, loss: str, count, **kwargs):
    """One pair's share of the DPO-family objective (the batch mean): ``losses.<loss>(...) /
    count`` (``count``: the batch's pairs)."""
    return losses.PAIRWISE[loss](logits_pos, logits_neg, **kwargs) / count


@functools.lru_cache(maxsize=64)
def _epoch_order(key_bytes: bytes, epoch: int, n: int) -> np.ndarray:
    key = jnp.asarray(np.frombuffer(key_bytes, np.uint32))
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def batch_indices(data_key: jax.Array, step: int, n: int, batch_size: int) -> np.ndarray:
    """Row indices ``(B,)`` of 0-based ``step`` (drop-last batches, reshuffled every epoch)."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"{n} examples give no full batch of {batch_size}")
    epoch, b = divmod(int(step), per_epoch)
    order = _epoch_order(np.asarray(data_key, np.uint32).tobytes(), epoch, n)
    return order[b * batch_size : (b + 1) * batch_size]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, *, eos: bool = True) -> dict:
    """Pretraining examples: each text becomes ``[BOS] + ids (+ [EOS] if eos)``, cut into windows
    of ``max_len`` tokens overlapping by one token (so every token but BOS is a target exactly
    once).

    Returns ``tokens``, ``targets`` int32 and ``mask`` bool, ``(N_windows, max_len)``; ``mask`` is
    True wherever the target is a real token (not PAD).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    rows = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is a {type(t).__name__}, not a str")
        ids = [tokenizer.bos_id] + tokenizer.encode(t) + ([tokenizer.eos_id] if eos else [])
        for s in range(0, max(len(ids) - 1, 1), max_len - 1):
            rows.append(ids[s : s + max_len])
    if not rows:
        raise ValueError("no pretraining text")
    tokens = np.full((len(rows), max_len), tokenizer.pad_id, np.int32)
    for r, w in enumerate(rows):
        tokens[r, : len(w)] = w
    targets = np.full_like(tokens, tokenizer.pad_id)
    targets[:, :-1] = tokens[:, 1:]
    lengths = np.array([len(w) for w in rows])
    mask = np.arange(max_len)[None, :] < (lengths[:, None] - 1)
    return {"tokens": tokens, "targets": targets, "mask": mask}


def encode_ids(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    max_len: int,
    pad_id: int = ByteTokenizer.pad_id,
) -> dict:
    """Teacher-forcing arrays from token ids (e.g. decoded responses), the layout of
    :func:`ldjax.data.preferences.encode_example`: ``tokens = prompt_ids + response_ids`` (the
    prompt already starts with BOS; the response ends with EOS only if the model produced one),
    ``targets[t] = tokens[t+1]``, ``mask[t]`` True where ``targets[t]`` is a response token.
    Responses are cut to fit ``max_len``. Returns ``(N, max_len)`` arrays."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    n = len(prompt_ids)
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        p = list(p)
        if not 1 <= len(p) < max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; need 1 <= len < max_len={max_len}")
        r = list(r)[: max_len - len(p)]
        seq = p + r
        tokens[i, : len(seq)] = seq
        mask[i, len(p) - 1 : len(seq) - 1] = True
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "targets": targets, "mask": mask}


def sft_examples(
    tokenizer, records: Sequence[dict], *, max_len: int, max_prompt_len: int, extend: bool = False
) -> dict:
    """SFT examples: (x, y⁺) for every record, plus (x, y⁻) when ``extend`` (the paper's remedy).
    ``(N or 2N, max_len)`` arrays from :func:`ldjax.data.preferences.encode_field`."""
    kw = dict(max_len=max_len, max_prompt_len=max_prompt_len)
    data = encode_field(tokenizer, records, "chosen", **kw)
    if extend:
        neg = encode_field(tokenizer, records, "rejected", **kw)
        data = {k: np.concatenate([data[k], neg[k]]) for k in data}
    return data


def pair_examples(tokenizer, records: Sequence[dict], *, max_len: int, max_prompt_len: int):
    """``(pos, neg)``: the (x, y⁺) and (x, y⁻) arrays of every record, ``(N, max_len)`` each."""
    kw = dict(max_len=max_len, max_prompt_len=max_prompt_len)
    return (
        encode_field(tokenizer, records, "chosen", **kw),
        encode_field(tokenizer, records, "rejected", **kw),
    )


@functools.lru_cache(maxsize=16)
def _logprob_fn(lm_config):
    apply_fn = make_apply_fn(lm_config)

    @jax.jit
    def f(params, tokens, targets, mask):
        return losses.sequence_logprob(apply_fn(params, tokens), targets, mask)

    return f


def sequence_logprobs(params, lm_config, data: dict, batch_size: int = 64) -> np.ndarray:
    """log π(y|x) = Σ_t mask_t log π(targets_t) of every row of ``data``, ``(N,)`` float64.

    Rows go through one jitted forward in chunks of ``batch_size`` (the last chunk padded)."""
    f = _logprob_fn(lm_config)
    n = data["tokens"].shape[0]
    out = []
    for s in range(0, n, batch_size):
        chunk = {k: data[k][s : s + batch_size] for k in ("tokens", "targets", "mask")}
        m = chunk["tokens"].shape[0]
        if m < batch_size and n > batch_size:
            chunk = {
                k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, 0)])
                for k, v in chunk.items()
            }
        out.append(np.asarray(f(params, chunk["tokens"], chunk["targets"], chunk["mask"]))[:m])
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0,))


def sample_responses(
    params,
    lm_config,
    prompt_ids: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    tokenizer=None,
) -> dict:
    """On-policy responses: ``y ~ π_θ(·|x)`` for each prompt (KV-cache
    :func:`ldjax.lm.decode.generate`, EOS kept when produced), encoded with :func:`encode_ids`.
    ``max_new_tokens`` is capped by the context left after the longest prompt."""
    tok = tokenizer or ByteTokenizer()
    room = lm_config.max_len - max(len(p) for p in prompt_ids)
    new = generate(
        params,
        lm_config,
        [list(p) for p in prompt_ids],
        max(1, min(max_new_tokens, room)),
        temperature=temperature,
        key=key,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        include_eos=True,
    )
    return encode_ids(prompt_ids, new, lm_config.max_len, tok.pad_id)


# ----------------------------------------------------------------------------------------------
# Step functions (jitted, cached per configuration)
# ----------------------------------------------------------------------------------------------


def _opt_key(cfg: PhaseConfig) -> PhaseConfig:
    """Only the fields that define the update rule: phases with equal ones share compiled steps."""
    return PhaseConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        warmup=cfg.warmup,
        schedule=cfg.schedule,
        grad_clip=cfg.grad_clip,
        steps=1,
    )


def _finish(tx, params, opt_state, grads, G, obj, aux, sched, count):
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(
        aux, loss=obj, grad_norm=gnorm, G_norm_sq=jnp.sum(jnp.square(G)), lr=sched(count)
    )
    return params, opt_state, metrics


@functools.lru_cache(maxsize=32)
def _lm_step(lm_config, cfg: PhaseConfig, total: int):
    """``(params, opt_state, batch, count) -> (params, opt_state, metrics)`` on the token-mean
    cross-entropy ``Σ_n losses.sft(z_n, y_n, mask_n) / Σ mask`` (pretrain and SFT)."""
    apply_fn = make_apply_fn(lm_config)
    tx = make_optimizer(cfg, total)
    sched = lr_schedule(cfg, total)

    def objective(logits, batch):  # Σ_n sft_objective(z_n, ...), summed before the division
        per = losses.sft(logits, batch["targets"], batch["mask"])  # (B,) = −log π(y|x)
        ntok = jnp.maximum(jnp.sum(batch["mask"]), 1)
        return jnp.sum(per) / ntok, {"seq_loss": jnp.mean(per), "tokens": ntok}

    @jax.jit
    def step(params, opt_state, batch, count):
        logits, vjp = jax.vjp(lambda p: apply_fn(p, batch["tokens"]), params)
        (obj, aux), G = jax.value_and_grad(objective, has_aux=True)(logits, batch)
        (grads,) = vjp(G)
        return _finish(tx, params, opt_state, grads, G, obj, aux, sched, count)

    return step


def _pair_kwargs(cfg: PreferenceConfig) -> dict:
    if cfg.loss in ("dpo", "ipo"):
        return {"beta": cfg.beta}
    if cfg.loss == "sppo":
        return {"beta": cfg.beta, "c": cfg.c}
    return {"delta": cfg.delta, "lam": cfg.lam}


@functools.lru_cache(maxsize=32)
def _pair_step(lm_config, cfg: PhaseConfig, loss: str, hyper: tuple, total: int):
    """DPO-family step: ``(params, opt_state, batch, count, ref_params) -> ...``; the pair is one
    forward of the stacked ``(2B, T)`` batch. ``ref_params`` is None when the batch carries
    ``ref_pos``/``ref_neg``."""
    apply_fn = make_apply_fn(lm_config)
    tx = make_optimizer(cfg, total)
    sched = lr_schedule(cfg, total)
    loss_fn = losses.PAIRWISE[loss]
    hyper = dict(hyper)

    def objective(logits, batch, ref_pos, ref_neg):
        b = batch["pos_tokens"].shape[0]
        zp, zn = logits[:b], logits[b:]
        per = loss_fn(
            zp,
            zn,
            targets_pos=batch["pos_targets"],
            targets_neg=batch["neg_targets"],
            mask_pos=batch["pos_mask"],
            mask_neg=batch["neg_mask"],
            ref_logp_pos=ref_pos,
            ref_logp_neg=ref_neg,
            **hyper,
        )
        lp = losses.sequence_logprob(zp, batch["pos_targets"], batch["pos_mask"])
        ln = losses.sequence_logprob(zn, batch["neg_targets"], batch["neg_mask"])
        margin = (lp - ref_pos) - (ln - ref_neg)
        aux = {
            "logp_pos": jnp.mean(lp),
            "logp_neg": jnp.mean(ln),
            "margin": jnp.mean(margin),
            "acc": jnp.mean((margin > 0).astype(jnp.float32)),
        }
        return jnp.mean(per), aux

    @jax.jit
    def step(params, opt_state, batch, count, ref_params):
        tokens = jnp.concatenate([batch["pos_tokens"], batch["neg_tokens"]])
        if ref_params is None:
            ref_pos, ref_neg = batch["ref_pos"], batch["ref_neg"]
        else:
            b = batch["pos_tokens"].shape[0]
            zr = apply_fn(ref_params, tokens)
            ref_pos = losses.sequence_logprob(zr[:b], batch["pos_targets"], batch["pos_mask"])
            ref_neg = losses.sequence_logprob(zr[b:], batch["neg_targets"], batch["neg_mask"])
        logits, vjp = jax.vjp(lambda p: apply_fn(p, tokens), params)
        (obj, aux), G = jax.value_and_grad(objective, has_aux=True)(logits, batch, ref_pos, ref_neg)
        (grads,) = vjp(G)
        return _finish(tx, params, opt_state, grads, G, obj, aux, sched, count)

    return step


# ----------------------------------------------------------------------------------------------
# The squeezing monitor's view of a batch (ldjax.training.monitor)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _pair_loss(loss: str, hyper: tuple) -> Callable:
    """``pair_objective`` with the loss name and hyper-parameters bound (one object per pair, so
    the monitor's jitted function traces once)."""
    return functools.partial(pair_objective, loss=loss, **dict(hyper))


def monitor_spec(
    kind: str,
    lm_config,
    cfg: PreferenceConfig | None = None,
    ref_params=None,
    n_batch_probes: int = 4,
):
    """The :class:`~ldjax.training.monitor.StepSpec` of an LM phase's batch (``batch_probes``:
    the first ``n_batch_probes`` responses of the batch, y⁺ for the DPO family).

    ``kind="sft"`` (SFT, pretraining): one branch, ``sft_objective`` with the batch's token count,
    no negative term. ``kind="pair"``: the DPO-family objective of ``cfg.loss`` on ``(x⁺, x⁻)``,
    the y⁻ branch negative; reference log-probs from the batch (``ref_pos``/``ref_neg``) or, when
    the batch has none (on-policy, ``ref_logp="batch"``), from ``ref_params``.
    """
    if kind == "sft":
        return StepSpec(
            sft_objective,
            lambda b: b["tokens"],
            lambda b, p: {
                "targets": b["targets"],
                "mask": b["mask"],
                "ntok": np.float32(max(1, int(np.sum(b["mask"])))),
            },
            batch_probes=lambda b: (b["tokens"][:n_batch_probes], b["mask"][:n_batch_probes]),
        )
    if kind != "pair":
        raise ValueError(f"kind must be 'sft' or 'pair', got {kind!r}")
    if cfg is None:
        raise ValueError("monitor_spec('pair', ...) needs the PreferenceConfig")
    loss_fn = _pair_loss(cfg.loss, tuple(sorted(_pair_kwargs(cfg).items())))
    logprob = _logprob_fn(lm_config)

    def kwargs(b, params):
        if "ref_pos" in b:
            rp, rn = b["ref_pos"], b["ref_neg"]
        elif ref_params is None:
            raise ValueError("the batch has no reference log-probs; pass ref_params")
        else:
            rp = logprob(ref_params, b["pos_tokens"], b["pos_targets"], b["pos_mask"])
            rn = logprob(ref_params, b["neg_tokens"], b["neg_targets"], b["neg_mask"])
        return {
            "targets_pos": b["pos_targets"],
            "targets_neg": b["neg_targets"],
            "mask_pos": b["pos_mask"],
            "mask_neg": b["neg_mask"],
            "ref_logp_pos": rp,
            "ref_logp_neg": rn,
            "count": np.float32(b["pos_tokens"].shape[0]),
        }

    return StepSpec(
        loss_fn,
        lambda b: (b["pos_tokens"], b["neg_tokens"]),
        kwargs,
        negative=(1,),
        negative_tokens=lambda b: (b["neg_targets"], b["neg_mask"]),
        batch_probes=lambda b: (b["pos_tokens"][:n_batch_probes], b["pos_mask"][:n_batch_probes]),
    )


def squeeze_monitor(
    lm_config,
    kind: str,
    probes: Sequence[dict] | tuple,
    *,
    cfg: PreferenceConfig | None = None,
    ref_params=None,
    field: str = "chosen",
    every: int = 20,
    threshold: float = 0.5,
    max_prompt_len: int = 128,
    tokenizer=None,
) -> SqueezeMonitor:
    """A :class:`~ldjax.training.monitor.SqueezeMonitor` for an LM phase: the probes are
    ``(prompt, record[field])`` of ``probes`` (a few records; y⁺ by default), or with
    ``probes=("batch", n)`` the first n responses of each measured step's own batch (y⁺ of
    its pairs); the batch is seen through :func:`monitor_spec`. Pass it in the phase's
    ``callbacks``."""
    n_batch = 4
    if isinstance(probes, tuple) and len(probes) == 2 and probes[0] == "batch":
        n_batch, probe_arg = int(probes[1]), "batch"
    else:
        if not probes or isinstance(probes, str):
            raise ValueError("squeeze_monitor needs probe records or ('batch', n)")
        enc = encode_field(
            tokenizer or ByteTokenizer(),
            probes,
            field,
            max_len=lm_config.max_len,
            max_prompt_len=max_prompt_len,
        )
        probe_arg = {"tokens": enc["tokens"], "mask": enc["mask"]}
    return SqueezeMonitor(
        make_apply_fn(lm_config),
        probe_arg,
        monitor_spec(kind, lm_config, cfg, ref_params, n_batch),
        every=every,
        threshold=threshold,
    )


# ----------------------------------------------------------------------------------------------
# The phase runner (on the one training loop)
# ----------------------------------------------------------------------------------------------


def _lm_fingerprint(lm_config) -> dict:
    d = dataclasses.asdict(lm_config)
    d["dtype"] = jnp.dtype(lm_config.dtype).name
    return d


def run_phase(
    name: str,
    cfg: PhaseConfig,
    n: int,
    params,
    step_fn: Callable,
    get_batch: Callable,
    *,
    fingerprint: dict,
    ckpt_dir=None,
    resume: bool = False,
    resume_older: bool = False,
    on_eval: Callable | None = None,
    on_step: Callable | None = None,
    callbacks: Sequence[Callable] = (),
    stop_at: int | None = None,
    progress: bool = True,
    max_to_keep: int = 2,
) -> PhaseResult:
    """One phase on :func:`ldjax.training.train_loop` (module docstring).

    Args:
      name: phase name (progress bar, errors).
      cfg: the phase's optimisation config; ``n``: number of training examples.
      params: θ_0 of the phase.
      step_fn: ``(params, opt_state, batch, count) -> (params, opt_state, metrics)``.
      get_batch: ``(indices (B,), step, params, sample_key) -> batch`` (host arrays).
      fingerprint: JSON-able description of everything that must match to resume.
      ckpt_dir: orbax folder (None: no checkpoints); ``resume``: continue from its latest step
        (a damaged one is an error); ``resume_older``: fall back to the newest older step that
        passes its checks, saying so (:func:`ldjax.training.train_loop`).
      on_eval: ``on_eval(step, params)``; on_step: ``on_step(step, metrics)``, ``step`` = updates
        done.
      callbacks: the loop's full hooks ``(s, params_before, batch, params_after, metrics,
        opt_state_before) -> dict | None`` (a returned dict is logged to the history), e.g. a
        :class:`ldjax.training.monitor.SqueezeMonitor` built with :func:`monitor_spec`.
      stop_at: stop after this many updates (a checkpoint is written there); resume later.
    """
    total = cfg.total_steps(n)
    tx = make_optimizer(cfg, total)
    data_key, sample_key = _keys(cfg)
    fingerprint = dict(fingerprint, phase=name, n=int(n), config=dataclasses.asdict(cfg))

    def batch_fn(s, params):
        return get_batch(batch_indices(data_key, s, n, cfg.batch_size), s, params, sample_key)

    def hook(s, before, batch, after, metrics, state):  # a notification: its result is not logged
        on_step(s + 1, metrics)

    hook = None if on_step is None else hook
    r = train_loop(
        step_fn,
        params,
        tx.init(params),
        batch_fn,
        total_steps=total,
        name=name,
        extra={"rng": data_key},
        fingerprint=fingerprint,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=cfg.ckpt_every,
        max_to_keep=max_to_keep,
        resume=resume,
        resume_older=resume_older,
        eval_every=cfg.eval_every,
        on_step=hook,
        on_eval=on_eval,
        callbacks=callbacks,
        stop_at=stop_at,
        progress=progress,
    )
    return PhaseResult(
        r.params,
        r.history,
        r.total_steps,
        r.step,
        r.completed,
        r.resumed_from,
        r.seconds,
        r.last_batch,
        r.opt_state,
    )


def _check_data(data: dict, lm_config, what: str) -> dict:
    for k in ("tokens", "targets", "mask"):
        if k not in data:
            raise ValueError(f"{what}: missing array {k!r}")
    t = np.asarray(data["tokens"])
    if t.ndim != 2 or t.shape[1] > lm_config.max_len:
        raise ValueError(
            f"{what}: tokens must be (N, T) with T <= max_len={lm_config.max_len}, got {t.shape}"
        )
    for k in ("targets", "mask"):
        if np.shape(data[k]) != t.shape:
            raise ValueError(f"{what}: {k} has shape {np.shape(data[k])}, tokens {t.shape}")
    if not np.any(data["mask"]):
        raise ValueError(f"{what}: the mask selects no token")
    return {k: np.asarray(data[k]) for k in ("tokens", "targets", "mask")}


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def _lm_phase(name, params, lm_config, data, cfg, **kw) -> PhaseResult:
    data = _check_data(data, lm_config, name)
    n = data["tokens"].shape[0]
    step = _lm_step(lm_config, _opt_key(cfg), cfg.total_steps(n))

    def get_batch(idx, s, params, key):
        return {k: v[idx] for k, v in data.items()}

    return run_phase(
        name,
        cfg,
        n,
        params,
        step,
        get_batch,
        fingerprint={"model": _lm_fingerprint(lm_config)},
        **kw,
    )


def pretrain(
    params,
    lm_config,
    texts: Sequence[str] | dict,
    cfg: PretrainConfig = PretrainConfig(),
    *,
    tokenizer=None,
    eos: bool = True,
    ckpt_dir=None,
    resume: bool = False,
    resume_older: bool = False,
    on_eval=None,
    on_step=None,
    callbacks: Sequence[Callable] = (),
    stop_at: int | None = None,
    progress: bool = True,
) -> PhaseResult:
    """Next-token pretraining, the token mean of ``ldjax.losses.sft`` over every real token.

    ``texts``: a list of documents (encoded by :func:`encode_texts`: windows of ``max_len`` with
    BOS/EOS) or already-encoded ``tokens/targets/mask`` arrays. The pipeline's default text is
    the *prompts* of the training records — HH dialogues with their Human and earlier Assistant
    turns — without the final open ``Assistant:`` turn, the final chosen/rejected responses and
    EOS (``DataConfig.pretrain_source``; the alternatives are prompt + chosen, or prompt + chosen
    and prompt + rejected, as dialogues ending in EOS).
    Other arguments: :func:`run_phase`.
    """
    data = (
        texts
        if isinstance(texts, dict)
        else encode_texts(tokenizer or ByteTokenizer(), texts, lm_config.max_len, eos=eos)
    )
    return _lm_phase(
        "pretrain",
        params,
        lm_config,
        data,
        cfg,
        ckpt_dir=ckpt_dir,
        resume=resume,
        resume_older=resume_older,
        on_eval=on_eval,
        on_step=on_step,
        callbacks=callbacks,
        stop_at=stop_at,
        progress=progress,
    )


def sft(
    params,
    lm_config,
    records: Sequence[dict] | dict,
    cfg: SFTConfig = SFTConfig(),
    *,
    max_prompt_len: int = 128,
    tokenizer=None,
    ckpt_dir=None,
    resume: bool = False,
    resume_older: bool = False,
    on_eval=None,
    on_step=None,
    callbacks: Sequence[Callable] = (),
    stop_at: int | None = None,
    progress: bool = True,
) -> PhaseResult:
    """Supervised finetuning on responses only: token mean of ``ldjax.losses.sft(z, y, mask)``,
    the mask selecting the positions that predict response tokens (incl. EOS).

    ``records`` with ``prompt``/``chosen`` (and ``rejected`` when ``cfg.extend``: the paper's
    remedy trains on (x, y⁺) and (x, y⁻)), or encoded arrays.
    """
    if isinstance(records, dict):
        data = records
    else:
        data = sft_examples(
            tokenizer or ByteTokenizer(),
            records,
            max_len=lm_config.max_len,
            max_prompt_len=max_prompt_len,
            extend=cfg.extend,
        )
    return _lm_phase(
        "sft-extend" if cfg.extend else "sft",
        params,
        lm_config,
        data,
        cfg,
        ckpt_dir=ckpt_dir,
        resume=resume,
        resume_older=resume_older,
        on_eval=on_eval,
        on_step=on_step,
        callbacks=callbacks,
        stop_at=stop_at,
        progress=progress,
    )


def preference(
    params,
    ref_params,
    lm_config,
    records: Sequence[dict],
    cfg: PreferenceConfig = PreferenceConfig(),
    *,
    max_prompt_len: int = 128,
    tokenizer=None,
    ckpt_dir=None,
    resume: bool = False,
    resume_older: bool = False,
    on_eval=None,
    on_step=None,
    callbacks: Sequence[Callable] = (),
    stop_at: int | None = None,
    progress: bool = True,
) -> PhaseResult:
    """DPO / IPO / SLiC / SPPO (``cfg.loss``) against the frozen reference ``ref_params``.

    Off-policy (default): pairs (x, y⁺, y⁻) from ``records`` (the first ``cfg.n_pairs`` if set);
    with ``cfg.ref_logp="dataset"`` the reference log-probs of all pairs are computed once before
    training, else per batch. On-policy (``cfg.on_policy``, SPIN-style): at every step y⁻ is
    sampled from the current policy at temperature ``cfg.temperature`` (:func:`sample_responses`,
    key ``fold_in(sample_key, step)``), y⁺ stays the dataset's chosen, and both reference log-probs
    are computed for the batch. The objective is the batch mean of ``ldjax.losses.<cfg.loss>``.
    """
    tok = tokenizer or ByteTokenizer()
    records = list(records)
    if cfg.n_pairs is not None:
        records = records[: cfg.n_pairs]
    pos, neg = pair_examples(tok, records, max_len=lm_config.max_len, max_prompt_len=max_prompt_len)
    n = pos["tokens"].shape[0]
    total = cfg.total_steps(n)
    step_fn = _pair_step(
        lm_config, _opt_key(cfg), cfg.loss, tuple(sorted(_pair_kwargs(cfg).items())), total
    )
    per_batch_ref = cfg.on_policy or cfg.ref_logp == "batch"
    ref_pos = ref_neg = None
    if not per_batch_ref:
        ref_pos = sequence_logprobs(ref_params, lm_config, pos).astype(np.float32)
        ref_neg = sequence_logprobs(ref_params, lm_config, neg).astype(np.float32)
    prompts = [encode_prompt(tok, r["prompt"], max_prompt_len=max_prompt_len) for r in records]

    def get_batch(idx, s, params, sample_key):
        b = {f"pos_{k}": pos[k][idx] for k in ("tokens", "targets", "mask")}
        if cfg.on_policy:
            smp = sample_responses(
                params,
                lm_config,
                [prompts[i] for i in idx],
                jax.random.fold_in(sample_key, s),
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                tokenizer=tok,
            )
        else:
            smp = {k: neg[k][idx] for k in ("tokens", "targets", "mask")}
        b.update({f"neg_{k}": v for k, v in smp.items()})
        if not per_batch_ref:
            b["ref_pos"], b["ref_neg"] = ref_pos[idx], ref_neg[idx]
        return b

    def step(params, opt_state, batch, count):
        return step_fn(params, opt_state, batch, count, ref_params if per_batch_ref else None)

    name = f"{cfg.loss}{'-onpolicy' if cfg.on_policy else ''}"
    return run_phase(
        name,
        cfg,
        n,
        params,
        step,
        get_batch,
        fingerprint={"model": _lm_fingerprint(lm_config)},
        ckpt_dir=ckpt_dir,
        resume=resume,
        resume_older=resume_older,
        on_eval=on_eval,
        on_step=on_step,
        callbacks=callbacks,
        stop_at=stop_at,
        progress=progress,
    )
