"""One exact decomposition on the LM: a single SFT step on (x_u, y_u⁺), observed on the probes.

The step is plain SGD with rate η on the sequence loss ``−log π(y_u⁺|x_u)``
(``ldjax.losses.sft``, summed over response tokens). The observed sequences χ_o are x_u's prompt
joined with every probe response of the record (``chosen`` itself, ``rejected``, the rephrases,
``irr_*``, ``random_*``). For each type we compare the change of the sequence log-probability
log π(y_o|x_u) = Σ_m log π(y_{o,m} | x_u, y_{o,<m}) (response tokens only):

* predicted (Proposition 1): Σ_m [A_m · (−η Σ_l K_{m,l} G_l)]_{y_{o,m}} from
  :func:`ldjax.decompose` (``delta_logp_linear``); also the version without linearising
  log-softmax (``delta_logp_exact``);
* actual: the same sum over :func:`ldjax.actual_step`'s ``delta_logp``: one SGD step of rate η
  (taken as ``optax.sgd(1)`` on η·L, so that one compiled step serves every η).

As η → 0 the relative error of the prediction falls like η (the error is O(η²), the change O(η))
and the eNTK-step error ‖Δz − (−ηKG)‖ over the response positions falls like η²: we report both
and their fitted log-log slopes (≈ 1 and ≈ 2 while η is small; float64 gives clean slopes down
to small η). The sequence loss sums ~100 token losses, so its gradient is large: on the pipeline's
model the linear regime is η ≲ 1e-6 (η = 1e-5 already moves log π(y_u⁺) by several nats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldjax import actual_step, apply_A, compare, decompose, losses
from ldjax.data.preferences import encode_example
from ldjax.data.probes import probe_types
from ldjax.lm import train as T
from ldjax.lm.model import make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer

__all__ = [
    "run_one_step",
    "run_optimizer_step",
    "sequence_delta",
    "loglog_slope",
    "format_table",
    "format_optimizer_table",
]

_SGD1 = optax.sgd(1.0)


def _scaled_sft(logits, targets, mask, scale):
    """η · sft: one SGD step of rate 1 on it is the SGD step of rate η on sft, and η stays a
    traced argument, so :func:`ldjax.actual_step` compiles once for all η."""
    return scale * losses.sft(logits, targets, mask)


def sequence_delta(delta_logp: jax.Array, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Σ_m mask_m Δlog π_m(targets_m): per-token changes ``(N, T, V)`` -> sequence change
    ``(N,)``."""
    d = np.asarray(delta_logp, np.float64)
    picked = np.take_along_axis(d, np.asarray(targets)[..., None].astype(np.int64), axis=-1)[..., 0]
    return np.sum(picked * np.asarray(mask, np.float64), axis=-1)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (NaN if fewer than two positive points)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = (x > 0) & (y > 0) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def run_one_step(
    params,
    config,
    record: dict,
    etas: Sequence[float] = (1e-7, 1e-6, 1e-5, 1e-4),
    *,
    types: Sequence[str] | None = None,
    tokenizer=None,
    float64: bool = False,
) -> dict:
    """Predicted vs actual Δ log π of every probe type after one SFT step on (x_u, y_u⁺).

    Args:
      params: the model's parameters (e.g. after pretraining); cast to the model's dtype.
      config: a :class:`ldjax.lm.config.PipelineConfig` (model shape and lengths).
      record: one probe record: ``prompt``, ``chosen`` and any other response fields.
      etas: learning rates η (ascending is not required).
      types: response fields observed (default: every probe type present in ``record``).
      float64: run in float64 (``jax.enable_x64`` inside this call only; params are cast), so
        that small η are not drowned by float32 rounding.
    Returns:
      A dict with ``types`` (K), ``etas`` (E), ``pred``/``pred_exact``/``actual`` ``(E, K)``
      sequence Δ log π, ``rel_error_linear``/``rel_error_exact`` ``(E,)`` (‖pred − actual‖ /
      ‖actual‖ over the K types), ``entk_rel_error`` (E,) from :func:`ldjax.compare` and
      ``entk_abs_error`` (E,) = ‖Δz_actual − (−ηKG)‖ over response positions, their log-log
      slopes ``slope_*`` (and ``slope_*_small`` over ``small_etas``, the η whose relative error
      is below 0.1), ``sign_agreement`` (E,) of predicted vs actual sequence changes, and
      ``loss_u`` = −log π(y_u⁺|x_u) before the step. Plain lists/floats (JSON-able).
    """
    if float64:
        with jax.enable_x64(True):
            cfg64 = config.replace(model={"dtype": "float64"})
            return run_one_step(params, cfg64, record, etas, types=types, tokenizer=tokenizer)
    tok = tokenizer or ByteTokenizer()
    etas = [float(e) for e in etas]
    if not etas or any(not e > 0 for e in etas):
        raise ValueError(f"etas must be positive numbers, got {etas}")
    for f in ("prompt", "chosen"):
        if not isinstance(record.get(f), str):
            raise ValueError(f"record field {f!r} is missing or not a string")
    lm = config.lm_config()
    types = list(types) if types is not None else probe_types(record)
    if not types:
        raise ValueError("the record has no probe response fields")
    kw = dict(max_len=lm.max_len, max_prompt_len=config.data.max_prompt_len)
    u = encode_example(tok, record["prompt"], record["chosen"], **kw)
    for t in types:
        if not isinstance(record.get(t), str):
            raise ValueError(f"record field {t!r} is missing or not a string")
    rows = [encode_example(tok, record["prompt"], record[t], **kw) for t in types]
    o = {f: np.stack([r[f] for r in rows]) for f in ("tokens", "targets", "mask")}
    dtype = lm.dtype
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    apply_fn = make_apply_fn(lm)
    x_u, x_o = jnp.asarray(u["tokens"][None]), jnp.asarray(o["tokens"])
    loss_kwargs = {"targets": jnp.asarray(u["targets"][None]), "mask": jnp.asarray(u["mask"][None])}
    mask_o = o["mask"]

    pred, pred_exact, actual, rel_lin, rel_ex, entk_rel, entk_abs, agree = ([] for _ in range(8))
    loss_u = None
    for eta in etas:
        dec = decompose(apply_fn, params, x_o, x_u, losses.sft, eta=eta, loss_kwargs=loss_kwargs)
        act = actual_step(
            apply_fn,
            params,
            x_o,
            x_u,
            _scaled_sft,
            optimizer=_SGD1,
            loss_kwargs=dict(loss_kwargs, scale=jnp.asarray(eta, dtype)),
        )
        p = sequence_delta(dec.delta_logp_linear, o["targets"], mask_o)
        pe = sequence_delta(dec.delta_logp_exact, o["targets"], mask_o)
        a = sequence_delta(act.delta_logp, o["targets"], mask_o)
        den = max(np.linalg.norm(a), 1e-300)
        pred.append(p.tolist())
        pred_exact.append(pe.tolist())
        actual.append(a.tolist())
        rel_lin.append(float(np.linalg.norm(p - a) / den))
        rel_ex.append(float(np.linalg.norm(pe - a) / den))
        entk_rel.append(compare(dec, act, mask=mask_o).entk_step)
        dz = np.asarray(act.delta_logits, np.float64) - np.asarray(dec.delta_logits, np.float64)
        entk_abs.append(float(np.sqrt(np.sum(dz**2 * mask_o[..., None]))))
        agree.append(float(np.mean(np.sign(p) == np.sign(a))))
        loss_u = float(np.asarray(dec.loss_u)[0])
    small = [e for e, r in zip(etas, rel_lin) if r < 0.1]  # the asymptotic regime
    return {
        "types": types,
        "etas": etas,
        "pred": pred,
        "pred_exact": pred_exact,
        "actual": actual,
        "rel_error_linear": rel_lin,
        "rel_error_exact": rel_ex,
        "entk_rel_error": entk_rel,
        "entk_abs_error": entk_abs,
        "sign_agreement": agree,
        "loss_u": loss_u,
        "slope_rel_error_linear": loglog_slope(etas, rel_lin),
        "slope_rel_error_exact": loglog_slope(etas, rel_ex),
        "slope_entk_rel_error": loglog_slope(etas, entk_rel),
        "slope_entk_abs_error": loglog_slope(etas, entk_abs),
        "small_etas": small,
        "slope_rel_error_linear_small": loglog_slope(
            small, [r for e, r in zip(etas, rel_lin) if e in small]
        ),
        "slope_entk_abs_error_small": loglog_slope(
            small, [r for e, r in zip(etas, entk_abs) if e in small]
        ),
        "dtype": jnp.dtype(dtype).name,
    }


def format_table(result: dict) -> str:
    """A plain-text table: per η the errors, then per type predicted vs actual at the smallest η."""
    lines = [
        f"one SFT step on (x_u, y_u+), -log pi(y_u+|x_u) = {result['loss_u']:.3f}, "
        f"dtype {result['dtype']}",
        f"{'eta':>10} {'rel.err A.dz':>13} {'rel.err exact':>14} {'eNTK rel':>10} "
        f"{'eNTK abs':>11} {'sign agree':>11}",
    ]
    for i, e in enumerate(result["etas"]):
        lines.append(
            f"{e:>10.3g} {result['rel_error_linear'][i]:>13.3e} "
            f"{result['rel_error_exact'][i]:>14.3e} "
            f"{result['entk_rel_error'][i]:>10.3e} {result['entk_abs_error'][i]:>11.3e} "
            f"{result['sign_agreement'][i]:>11.2f}"
        )
    lines.append(
        f"log-log slopes over all eta: rel.err {result['slope_rel_error_linear']:.2f}, "
        f"eNTK abs {result['slope_entk_abs_error']:.2f}, "
        f"eNTK rel {result['slope_entk_rel_error']:.2f}"
    )
    if len(result.get("small_etas", [])) >= 2:
        lines.append(
            "over eta with rel.err < 0.1 "
            f"({min(result['small_etas']):g}..{max(result['small_etas']):g}): "
            f"rel.err {result['slope_rel_error_linear_small']:.2f}, "
            f"eNTK abs {result['slope_entk_abs_error_small']:.2f}"
        )
    k = int(np.argmin(result["etas"]))
    lines.append(
        f"{'probe type':>20} {'predicted':>12} {'actual':>12}   (eta = {result['etas'][k]:g})"
    )
    for j, t in enumerate(result["types"]):
        lines.append(f"{t:>20} {result['pred'][k][j]:>12.4e} {result['actual'][k][j]:>12.4e}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The real optimizer's step (RMSprop / Adam, clipping, schedule) at the phase's learning rate
# ----------------------------------------------------------------------------------------------


def _rel_err(p, a) -> float:
    return float(np.linalg.norm(p - a) / max(np.linalg.norm(a), 1e-300))


def run_optimizer_step(
    params,
    config,
    records,
    probe_record: dict,
    *,
    phase: str = "sft",
    warm_steps: int = 8,
    types: Sequence[str] | None = None,
    float64: bool = True,
    scales: Sequence[float] = (1.0, 0.3, 0.1, 0.03, 0.01),
) -> dict:
    """Predicted vs actual Δ log π of every probe type after one REAL step of a training phase.

    The phase (``"sft"`` or ``"dpo"``: :func:`ldjax.lm.train.sft`,
    :func:`ldjax.lm.train.preference`, with ``config``'s optimizer — RMSprop, clipping, warm-up
    schedule) first runs ``warm_steps`` updates from ``params`` so the optimizer's state is not
    fresh; then step ``warm_steps`` is predicted three ways on the probe sequences of
    ``probe_record`` (its prompt joined with every probe response) and compared with the step
    itself (:func:`ldjax.actual_step` with the same optimizer and state):

    * ``exact``: :func:`ldjax.decompose` with the optimizer — first order in its actual update;
    * ``kernel``: the optimizer linearised at its state (``K_P`` of its preconditioner + the
      carry-over), without the part not linear in the gradient;
    * ``sgd``: a plain SGD step at the phase's current learning rate, what the paper's formula
      predicts if the optimizer is ignored.

    Where the error comes from is measured by more readings of the same step:

    * ``exact_softmax``: the same Δz, read through ``log_softmax(z + Δz) − log_softmax(z)``
      instead of ``A Δz``: what is left is the network's own nonlinearity in θ;
    * ``second_order``: Δz to second order in the update (``decompose(..., order=2)``: plus
      ``½ D²z[Δθ, Δθ]``), read through ``log_softmax``;
    * the scale sweep: the real update ``U(g)`` scaled by ``s`` (θ + s U(g), x_o evaluated there)
      against ``s`` times the exact prediction, for every ``s`` in ``scales``. A
      first-order prediction has a relative error ∝ s; the s at which it falls under 0.05 says
      how far inside the phase's step the first-order regime ends.

    Returns:
      ``types``, per way ``pred_<way>`` (K,) sequence Δ log π, ``actual`` (K,), ``rel_error_<way>``
      (‖pred − actual‖ / ‖actual‖ over the K types), ``sign_agreement_<way>``, ``lr``,
      ``entk_step`` (:func:`ldjax.compare`'s eNTK-step error of the exact prediction; and
      ``entk_step_second_order``), the phase, the optimizer's name and ``dtype``; ``scales`` and
      per scale ``scale_rel_error_exact``, ``scale_rel_error_exact_softmax`` and
      ``scale_rel_error_second_order``, with ``scale_slope`` (log-log slope of the first over the
      scales). JSON-able.
    """
    if float64:
        with jax.enable_x64(True):
            cfg64 = config.replace(model={"dtype": "float64"})
            return run_optimizer_step(
                params,
                cfg64,
                records,
                probe_record,
                phase=phase,
                warm_steps=warm_steps,
                types=types,
                float64=False,
                scales=scales,
            )
    if phase not in ("sft", "dpo"):
        raise ValueError(f"phase must be 'sft' or 'dpo', got {phase!r}")
    if not isinstance(warm_steps, int) or warm_steps < 1:
        raise ValueError(f"warm_steps must be an int >= 1, got {warm_steps!r}")
    lm = config.lm_config()
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, lm.dtype), params)
    tok = ByteTokenizer()
    mp = config.data.max_prompt_len
    pc = config.sft if phase == "sft" else config.preference.replace(on_policy=False)
    pc = pc.replace(ckpt_every=10**9, eval_every=10**9)
    run = T.sft if phase == "sft" else (lambda p, *a, **k: T.preference(p, p, *a, **k))
    warm = run(params, lm, records, pc, max_prompt_len=mp, stop_at=warm_steps, progress=False)
    theta, state = warm.params, warm.opt_state
    apply_fn = make_apply_fn(lm)
    data_key = T.phase_keys(pc)[0]
    if phase == "sft":
        data = T.sft_examples(tok, records, max_len=lm.max_len, max_prompt_len=mp, extend=pc.extend)
        n = data["tokens"].shape[0]
        idx = T.batch_indices(data_key, warm_steps, n, pc.batch_size)
        b = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        x_u = b["tokens"]
        ntok = jnp.maximum(jnp.sum(b["mask"]), 1).astype(lm.dtype)
        loss_fn, kw = T.sft_objective, dict(targets=b["targets"], mask=b["mask"], ntok=ntok)
    else:
        recs = list(records)[: pc.n_pairs] if pc.n_pairs is not None else list(records)
        pos, neg = T.pair_examples(tok, recs, max_len=lm.max_len, max_prompt_len=mp)
        n = pos["tokens"].shape[0]
        idx = T.batch_indices(data_key, warm_steps, n, pc.batch_size)
        ref_pos = T.sequence_logprobs(params, lm, {k: v[idx] for k, v in pos.items()})
        ref_neg = T.sequence_logprobs(params, lm, {k: v[idx] for k, v in neg.items()})
        x_u = (jnp.asarray(pos["tokens"][idx]), jnp.asarray(neg["tokens"][idx]))
        hyper = {"beta": pc.beta} if pc.loss in ("dpo", "ipo") else {}
        kw = dict(
            targets_pos=jnp.asarray(pos["targets"][idx]),
            targets_neg=jnp.asarray(neg["targets"][idx]),
            mask_pos=jnp.asarray(pos["mask"][idx]),
            mask_neg=jnp.asarray(neg["mask"][idx]),
            ref_logp_pos=jnp.asarray(ref_pos, lm.dtype),
            ref_logp_neg=jnp.asarray(ref_neg, lm.dtype),
            count=jnp.asarray(float(len(idx)), lm.dtype),
            loss=pc.loss,
            **hyper,
        )
        loss_fn = T.pair_objective
    total = pc.total_steps(n)
    tx = T.make_optimizer(pc, total)
    lr = float(T.lr_schedule(pc, total)(warm_steps))
    types = list(types) if types is not None else probe_types(probe_record)
    rows = [
        encode_example(
            tok, probe_record["prompt"], probe_record[t], max_len=lm.max_len, max_prompt_len=mp
        )
        for t in types
    ]
    o = {f: np.stack([r[f] for r in rows]) for f in ("tokens", "targets", "mask")}
    x_o = jnp.asarray(o["tokens"])
    if phase == "dpo":  # pair_objective takes the loss name as a static keyword
        loss_fn = _bind_loss(kw.pop("loss"))
    exact = decompose(
        apply_fn, theta, x_o, x_u, loss_fn, loss_kwargs=kw, optimizer=tx, opt_state=state, order=2
    )
    curv = exact.delta_logits_curvature
    first = _first_order(exact).delta_logits
    sgd = decompose(apply_fn, theta, x_o, x_u, loss_fn, loss_kwargs=kw, eta=lr)
    act = actual_step(
        apply_fn, theta, x_o, x_u, loss_fn, loss_kwargs=kw, optimizer=tx, opt_state=state
    )
    seq = lambda dl: sequence_delta(dl, o["targets"], o["mask"])
    z = exact.logits
    soft = lambda dz: jax.nn.log_softmax(z + dz, axis=-1) - jax.nn.log_softmax(z, axis=-1)
    preds = {
        "exact": seq(apply_A(z, first)),
        "exact_softmax": seq(soft(first)),
        "second_order": seq(soft(first + curv)),
        "kernel": seq(apply_A(z, exact.delta_logits_kernel)),
        "sgd": seq(sgd.delta_logp_linear),
    }
    a = seq(act.delta_logp)
    sweep = {"scales": [float(x) for x in scales], "lin": [], "softmax": [], "second": []}
    logits_o = jax.jit(apply_fn)
    for sc in sweep["scales"]:  # the real update scaled by s, on x_o: θ + s U(g)
        theta_s = jax.tree_util.tree_map(lambda t, u, sc=sc: t + sc * u, theta, act.update)
        a_s = seq(soft(logits_o(theta_s, x_o) - z))
        sweep["lin"].append(_rel_err(seq(apply_A(z, sc * first)), a_s))
        sweep["softmax"].append(_rel_err(seq(soft(sc * first)), a_s))
        sweep["second"].append(_rel_err(seq(soft(sc * first + sc**2 * curv)), a_s))
    out = {
        "phase": phase,
        "types": types,
        "warm_steps": warm_steps,
        "lr": lr,
        "actual": a.tolist(),
        "optimizer": pc.optimizer,
        "grad_clip": pc.grad_clip,
        "dtype": jnp.dtype(lm.dtype).name,
        "entk_step": compare(_first_order(exact), act).entk_step,
        "entk_step_second_order": compare(exact, act).entk_step,
        "scales": sweep["scales"],
        "scale_rel_error_exact": sweep["lin"],
        "scale_rel_error_exact_softmax": sweep["softmax"],
        "scale_rel_error_second_order": sweep["second"],
        "scale_slope": loglog_slope(sweep["scales"], sweep["lin"]),
    }
    for k, p in preds.items():
        out[f"pred_{k}"] = p.tolist()
        out[f"rel_error_{k}"] = _rel_err(p, a)
        out[f"sign_agreement_{k}"] = float(np.mean(np.sign(p) == np.sign(a)))
    return out


def _first_order(d):
    """The decomposition ``d`` without its curvature term (what ``order=1`` returns)."""
    return dataclasses.replace(d, delta_logits_curvature=None)


def format_optimizer_table(steps: dict) -> str:
    """A text table of :func:`run_optimizer_step` results keyed by phase: per phase, the relative
    error and sign agreement of the predictions of the real step, the scale sweep, then Δ log π
    per type."""
    lines = []
    for phase, r in steps.items():
        lines.append(
            f"{phase.upper()}: one real {r['optimizer']} step (lr {r['lr']:.3g}, after "
            f"{r['warm_steps']} warm-up steps, {r['dtype']}); eNTK-step error "
            f"{r['entk_step']:.3g} (second order: "
            f"{r.get('entk_step_second_order', float('nan')):.3g})"
        )
        lines.append(f"{'prediction':>22} {'rel. error':>12} {'sign agreement':>15}")
        for way, what in (
            ("exact", "optimizer, exact"),
            ("exact_softmax", "exact, softmax not lin."),
            ("second_order", "2nd order, softmax"),
            ("kernel", "optimizer, K_P"),
            ("sgd", "plain SGD"),
        ):
            lines.append(
                f"{what:>22} {r['rel_error_' + way]:>12.3g} {r['sign_agreement_' + way]:>15.2f}"
            )
        if r.get("scales"):
            lines.append(
                "the real update scaled by s, against s × the exact prediction "
                f"(log-log slope {r['scale_slope']:.2f}):"
            )
            lines.append(f"{'s':>22} {'rel. error':>12} {'softmax not lin.':>17} {'2nd order':>10}")
            for sc, e1, e2, e3 in zip(
                r["scales"],
                r["scale_rel_error_exact"],
                r["scale_rel_error_exact_softmax"],
                r["scale_rel_error_second_order"],
            ):
                lines.append(f"{sc:>22g} {e1:>12.3g} {e2:>17.3g} {e3:>10.3g}")
        lines.append(f"{'type':>22} {'exact':>12} {'K_P':>12} {'SGD':>12} {'actual':>12}")
        for j, t in enumerate(r["types"]):
            lines.append(
                f"{t:>22} {r['pred_exact'][j]:>12.4e} {r['pred_kernel'][j]:>12.4e} "
                f"{r['pred_sgd'][j]:>12.4e} {r['actual'][j]:>12.4e}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


_PAIR_LOSSES: dict = {}


def _bind_loss(name: str):
    """A pair objective with the loss name bound (one function object per loss: jit caches)."""
    if name not in _PAIR_LOSSES:

        def fn(logits_pos, logits_neg, **kw):
            return T.pair_objective(logits_pos, logits_neg, loss=name, **kw)

        _PAIR_LOSSES[name] = fn
    return _PAIR_LOSSES[name]
