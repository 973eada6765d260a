"""GRPO on the small LM with the model-free arithmetic reward, and lazy likelihood displacement
(Deng et al. 2025, arXiv 2505.18830) in ldjax's decomposition.

The run (:func:`run_grpo`): from the SFT model, at every update ``prompts_per_step`` arithmetic
prompts each get ``group_size`` responses sampled from the current policy; the string-checked
reward (:mod:`ldjax.data.arithmetic`) gives group-relative advantages
(:func:`ldjax.losses.group_advantages`); one plain SGD step on the mean of
:func:`ldjax.losses.grpo` (or :func:`ldjax.losses.grpo_nthr`, with the NTHR influence of each
token computed from the step's own hidden states, :func:`ldjax.losses.nthr_influence`). Both
variants run with the same seed see the same first batch and the same sampling keys, on the
same training loop (:func:`ldjax.training.train_loop`).

Tracking: at step 0, the first ``n_track`` prompts whose sampled group holds both correct and
incorrect responses are kept with their responses; after every update the log π of those fixed
responses is re-scored (per prompt: the mean over its correct responses and over its incorrect
ones).

The one-step decomposition (:func:`decompose_step`), on each tracked group alone: with
``g_i = ∇θ log π(y_i)`` and the on-policy GRPO gradient ``∇θ L = −(1/N) Σ_i (A_i/|y_i|) g̃_i``
(``g̃_i`` the token-weighted gradient ``∇θ Σ_t w_{i,t} log π(y_{i,t})``, w = 1 for GRPO), the SGD
step ``Δθ = −η ∇θ L`` splits into the correct-response terms (``A_i > 0``) and the
incorrect-response terms (``A_i < 0``), and each correct response's
``Δlog π(y_c) ≈ ⟨g_c, Δθ_correct⟩ + ⟨g_c, Δθ_incorrect⟩``. Lazy likelihood displacement is
``⟨g_c, Δθ_incorrect⟩ < 0``: the penalties on the incorrect responses pull the correct ones down.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax import losses
from ldjax.data.arithmetic import arithmetic_records, reward
from ldjax.data.preferences import encode_prompt
from ldjax.experiments.followups.model import flat_params, sequence_grads
from ldjax.lm import train as T
from ldjax.lm.decode import generate
from ldjax.lm.model import TransformerLM
from ldjax.lm.tokenizer import ByteTokenizer
from ldjax.training import train_loop

__all__ = ["prompts", "sample_group", "decompose_step", "run_grpo", "VARIANTS"]

VARIANTS = ("grpo", "nthr")


def prompts(cfg) -> list[dict]:
    """The GRPO prompts: ``n_prompts`` arithmetic records of seed 2 (not in the SFT data)."""
    return arithmetic_records(cfg.grpo.n_prompts, 2)


def sample_group(params, lm, recs, cfg, key) -> dict:
    """``group_size`` responses to each record's prompt, sampled from ``params``: the encoded
    arrays ``tokens, targets, mask`` ``(P·G, L)``, ``rewards`` ``(P·G,)``, ``advantages``,
    ``texts``, ``anchored`` ``(P,)`` (the groups whose last response is the reference one, with
    ``cfg.grpo.anchor``; cut to the context left, it may lose its answer and score 0) and
    ``accuracy`` (the share of correct responses among the sampled ones)."""
    g = cfg.grpo
    tok = ByteTokenizer()
    ps = [encode_prompt(tok, r["prompt"], max_prompt_len=cfg.sft.max_prompt_len) for r in recs]
    rep = [p for p in ps for _ in range(g.group_size)]
    room = cfg.sft.max_len - max(len(p) for p in ps)
    new = generate(
        params,
        lm,
        rep,
        max(1, min(g.max_new_tokens, room)),
        temperature=g.temperature,
        key=key,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        include_eos=True,
    )
    texts = [tok.decode([t for t in y if t != tok.eos_id]) for y in new]
    rw = np.array(
        [reward(recs[i // g.group_size]["prompt"], t) for i, t in enumerate(texts)], np.float32
    )
    anchored = np.zeros(len(recs), bool)
    if g.anchor:
        for i, r in enumerate(recs):
            last = (i + 1) * g.group_size - 1
            if not rw[i * g.group_size : last + 1].any():
                ref = tok.encode(r["chosen"]) + [tok.eos_id]
                new[last] = ref[:room]
                texts[last] = tok.decode([t for t in new[last] if t != tok.eos_id])
                rw[last] = reward(r["prompt"], texts[last])
                anchored[i] = True
    enc = T.encode_ids(rep, new, cfg.sft.max_len, tok.pad_id)
    adv = np.asarray(losses.group_advantages(jnp.asarray(rw), g.group_size), np.float32)
    sampled = np.ones(rw.shape, bool)
    sampled[np.flatnonzero(anchored) * g.group_size + g.group_size - 1] = False
    return {
        **enc,
        "rewards": rw,
        "advantages": adv,
        "texts": texts,
        "anchored": anchored,
        "accuracy": float(rw[sampled].mean()),
    }


@functools.lru_cache(maxsize=8)
def _forward(lm):
    model = TransformerLM(lm)

    def f(params, tokens):
        z, state = model.apply(
            {"params": params}, tokens, capture_intermediates=lambda mdl, _: mdl.name == "ln_f"
        )
        return state["intermediates"]["ln_f"]["__call__"][0], z

    return f


def _influence(h, z, targets, mask, rewards, group_size):
    """NTHR influence of every token on the correct responses of its own group, ``(N, T)``."""
    n, t = targets.shape
    k = n // group_size
    r = lambda a: a.reshape(k, group_size, *a.shape[1:])
    s = jax.vmap(losses.nthr_influence)(r(h), r(z), r(targets), r(mask), r(rewards > 0))
    return s.reshape(n, t)


def _loss(lm, variant, cfg):
    """``(params, batch) -> (mean loss, aux)`` of one variant."""
    fwd = _forward(lm)
    g = cfg.grpo

    def loss(params, batch):
        h, z = fwd(params, batch["tokens"])
        kw = dict(
            targets=batch["targets"],
            mask=batch["mask"],
            advantages=batch["advantages"],
            clip_eps=g.clip_eps,
        )
        if variant == "nthr":
            s = _influence(
                jax.lax.stop_gradient(h),
                jax.lax.stop_gradient(z),
                batch["targets"],
                batch["mask"],
                batch["rewards"],
                g.group_size,
            )
            flagged = (batch["advantages"][:, None] < 0) & (s > g.tau) & batch["mask"]
            per = losses.grpo_nthr(z, influence=s, tau=g.tau, down_weight=g.down_weight, **kw)
            frac = jnp.sum(flagged) / jnp.maximum(
                jnp.sum((batch["advantages"][:, None] < 0) & batch["mask"]), 1
            )
        else:
            per = losses.grpo(z, **kw)
            frac = jnp.zeros(())
        return jnp.mean(per), frac

    return loss


def token_weights(params, lm, batch, cfg) -> np.ndarray:
    """NTHR's token weights ``(N, T)`` of a sampled batch at ``params`` (1 on masked-out
    positions too; multiply by the mask)."""
    h, z = _forward(lm)(params, jnp.asarray(batch["tokens"]))
    s = _influence(
        h,
        z,
        jnp.asarray(batch["targets"]),
        jnp.asarray(batch["mask"]),
        jnp.asarray(batch["rewards"]),
        cfg.grpo.group_size,
    )
    return np.asarray(
        losses.nthr_weights(s, jnp.asarray(batch["advantages"]), cfg.grpo.tau, cfg.grpo.down_weight)
    )


def decompose_step(params, lm, group: dict, cfg, variant: str) -> dict:
    """The one-step decomposition of the module docstring on ONE group (``group_size`` rows of
    :func:`sample_group`) for ``variant`` ("grpo" or "nthr"): the group's share of a training
    step (SGD at ``cfg.grpo.lr`` on the mean loss over ``prompts_per_step`` groups) times
    ``cfg.grpo.decompose_scale``.

    Returns per-group numbers (means over the group's correct responses): ``correct_term``
    ``⟨g_c, Δθ_correct⟩``, ``incorrect_term`` ``⟨g_c, Δθ_incorrect⟩``, ``predicted`` (their
    sum), ``actual`` (Δlog π(y_c) after the step, taken), and the same for the incorrect
    responses (``*_on_incorrect``)."""
    a = np.asarray(group["advantages"], np.float64)
    mask = np.asarray(group["mask"], np.float32)
    length = np.maximum(mask.sum(1), 1.0)
    correct = np.asarray(group["rewards"]) > 0
    if variant == "nthr":
        w = token_weights(params, lm, group, cfg) * mask
    else:
        w = mask
    g_plain = sequence_grads(params, lm, group)  # ∇ log π(y_i), (G, P)
    g_w = sequence_grads(params, lm, dict(group, mask=w)) if variant == "nthr" else g_plain
    # the group's share of a training step: the loss is the mean over prompts_per_step groups
    n = a.size * cfg.grpo.prompts_per_step
    coef = cfg.grpo.lr * cfg.grpo.decompose_scale * a / length / n  # Δθ = Σ_i coef_i g̃_i
    d_cor = (coef * correct) @ g_w
    d_inc = (coef * ~correct) @ g_w
    t_cor = g_plain @ d_cor
    t_inc = g_plain @ d_inc
    # the actual step on this group alone
    flat, unravel = flat_params(params)
    after = unravel(flat + jnp.asarray(d_cor + d_inc, flat.dtype))
    lp0 = T.sequence_logprobs(params, lm, group)
    lp1 = T.sequence_logprobs(after, lm, group)
    act = lp1 - lp0
    mean = lambda v, sel: float(v[sel].mean()) if sel.any() else float("nan")
    return {
        "correct_term": mean(t_cor, correct),
        "incorrect_term": mean(t_inc, correct),
        "predicted": mean(t_cor + t_inc, correct),
        "actual": mean(act, correct),
        "correct_term_on_incorrect": mean(t_cor, ~correct),
        "incorrect_term_on_incorrect": mean(t_inc, ~correct),
        "actual_on_incorrect": mean(act, ~correct),
    }


def _rows(d: dict, idx) -> dict:
    keep = ("tokens", "targets", "mask", "rewards", "advantages")
    return {k: np.asarray(d[k])[idx] for k in keep}


def run_grpo(params0, lm, cfg, seed: int, *, progress: bool = False, log=print) -> dict:
    """Both variants from ``params0`` with sampling seed ``seed`` (module docstring).

    Returns ``{"tracked": [prompt index per tracked group], "decomposition": {variant: {name:
    (P,)}}, "curves": {variant: {"correct": (E, P), "incorrect": (E, P), "steps": (E,)}},
    "reward": {variant: (steps,)}, "flagged": (steps,) share of incorrect tokens NTHR
    down-weights, "seconds": {...}, "examples": [...]}``; arrays with NaN where a seed found fewer
    than ``n_track`` mixed groups."""
    g = cfg.grpo
    recs = prompts(cfg)
    key = jax.random.PRNGKey(1000 + seed)
    t0 = time.time()
    first = sample_group(params0, lm, recs, cfg, jax.random.fold_in(key, 0))
    gs = g.group_size
    rw = first["rewards"].reshape(len(recs), gs)
    mixed = [i for i in range(len(recs)) if 0 < rw[i].sum() < gs][: g.n_track]
    log(
        f"    seed {seed}: step-0 accuracy {first['accuracy']:.3f}, "
        f"{sum(0 < rw[i].sum() < gs for i in range(len(recs)))} of {len(recs)} groups mixed"
    )
    track_idx = np.concatenate([np.arange(i * gs, (i + 1) * gs) for i in mixed]) if mixed else []
    tracked = _rows(first, np.asarray(track_idx, int))
    out = {
        "tracked": mixed,
        "accuracy0": first["accuracy"],
        "anchored0": float(np.mean(first["anchored"])),
        "decomposition": {},
        "curves": {},
        "reward": {},
        "flagged": [],
        "seconds": {"sample0": time.time() - t0},
        "examples": [
            {
                "prompt": recs[i // gs]["prompt"][-80:],
                "response": first["texts"][i],
                "reward": float(first["rewards"][i]),
            }
            for i in range(min(3, len(first["texts"])))
        ],
    }
    nan = np.full(g.n_track, np.nan)
    for variant in VARIANTS:
        t = time.time()
        dec = {}
        for p, i in enumerate(mixed):
            grp = _rows(first, np.arange(i * gs, (i + 1) * gs))
            for k, v in decompose_step(params0, lm, grp, cfg, variant).items():
                dec.setdefault(k, nan.copy())[p] = v
        out["decomposition"][variant] = dec
        out["seconds"][f"decompose_{variant}"] = time.time() - t
        t = time.time()
        out["curves"][variant], out["reward"][variant], flagged = _train(
            params0, lm, cfg, recs, first, tracked, key, variant, progress
        )
        if variant == "nthr":
            out["flagged"] = flagged
        out["seconds"][f"train_{variant}"] = time.time() - t
    return out


def _train(params0, lm, cfg, recs, first, tracked, key, variant, progress):
    g = cfg.grpo
    gs = g.group_size
    loss = _loss(lm, variant, cfg)
    tx = optax.sgd(g.lr)
    k = g.prompts_per_step

    @jax.jit
    def step(params, opt_state, batch, s):
        (val, frac), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, {"loss": val, "flagged": frac}

    rewards = []

    def batch_fn(s, params):
        order = np.random.default_rng([int(key[1]), s]).permutation(len(recs))[:k]
        if s == 0:  # the first batch is the step-0 sample (same for both variants)
            idx = np.concatenate([np.arange(i * gs, (i + 1) * gs) for i in order])
            b = _rows(first, idx)
            acc = first["accuracy"]
        else:
            b = sample_group(params, lm, [recs[i] for i in order], cfg, jax.random.fold_in(key, s))
            acc = b["accuracy"]
            b = _rows(b, slice(None))
        rewards.append(acc)
        return {kk: jnp.asarray(v) for kk, v in b.items()}

    n_track = g.n_track
    curves = {"steps": [], "correct": [], "incorrect": []}
    has = tracked["tokens"].shape[0] > 0

    def on_eval(s, params):
        row_c, row_i = np.full(n_track, np.nan), np.full(n_track, np.nan)
        if has:
            lp = T.sequence_logprobs(params, lm, tracked).reshape(-1, gs)
            cor = tracked["rewards"].reshape(-1, gs) > 0
            for p in range(lp.shape[0]):
                row_c[p] = lp[p][cor[p]].mean()
                row_i[p] = lp[p][~cor[p]].mean()
        curves["steps"].append(int(s))
        curves["correct"].append(row_c)
        curves["incorrect"].append(row_i)

    r = train_loop(
        step,
        params0,
        tx.init(params0),
        batch_fn,
        total_steps=g.steps,
        name=variant,
        eval_every=1,
        on_eval=on_eval,
        progress=progress,
    )
    curves = {kk: np.asarray(v) for kk, v in curves.items()}
    return curves, np.asarray(rewards), np.asarray(r.history.get("flagged", []))
