"""The batch influence jobs behind ``ldjax analyze mnist|lm``: load a trained checkpoint and the
data, run :func:`ldjax.influence` (streamed to ``<out>/influence``, resumable, audited), and
compute the readouts and figures.

Both jobs return a summary dict (JSON-able) and a dict of figures; only
:mod:`ldjax.experiments.analyze.cli` writes files (figures, ``summary.json``, the top-k tables).

Checkpoints read:

* MNIST: the checkpoint folder that ``ldjax mnist --checkpoint-dir DIR`` (or
  :func:`ldjax.mnist.train.train` with ``ckpt_dir``) writes: numbered epochs, each with
  ``params``, ``opt_state`` and the training config in its fingerprint; the newest is used.
* LM: what :func:`ldjax.lm.checkpoint.load_lm` reads: an ``ldjax lm`` run folder (its SFT model,
  else the pretrained one), a phase's ``ckpt`` folder, or a :func:`~ldjax.lm.checkpoint.save_lm`
  folder.

Every checkpoint is verified (checksums, the meta's SHA-256) by
:class:`ldjax.training.checkpoint.Checkpoints` before use.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ldjax
from ldjax import losses
from ldjax.experiments.analyze import plots, readouts

__all__ = [
    "load_mnist_checkpoint",
    "mnist_probes",
    "run_mnist",
    "lm_pairs",
    "lm_probes",
    "run_lm",
    "lm_token_maps",
    "LM_LOSSES",
]

LM_LOSSES = ("sft", "dpo", "ipo", "slic", "sppo")


# ----------------------------------------------------------------------------- MNIST


def load_mnist_checkpoint(
    path, *, epoch: int | None = None, optimizer: bool = False, n_train: int | None = None
) -> dict:
    """A checkpoint of an MNIST training run (the newest, or that of ``epoch``): ``{"params",
    "config" (TrainConfig), "model" (name), "step" (epochs completed), "path"}``.

    With ``optimizer=True`` also ``"optimizer"`` (the run's optax optimizer,
    :func:`ldjax.mnist.train.make_optimizer`, its schedule over ``n_train`` training rows) and
    ``"opt_state"`` (its state in the checkpoint: momentum, the schedule's count).

    Raises:
      FileNotFoundError: no such folder, or no checkpoint in it.
      ldjax.training.checkpoint.CheckpointError: a damaged or edited checkpoint.
      ValueError: not a checkpoint of ``ldjax mnist`` training (no training config in its
        fingerprint, or parameters that are not the recorded model's).
    """
    from ldjax.mnist.models import init_params, make_model  # noqa: PLC0415
    from ldjax.mnist.train import TrainConfig  # noqa: PLC0415
    from ldjax.training.checkpoint import Checkpoints  # noqa: PLC0415

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {p}: no such folder")
    with Checkpoints(p) as ck:
        if ck.latest() is None:
            raise FileNotFoundError(
                f"--checkpoint {p}: holds no checkpoint (expected the folder that "
                "`ldjax mnist --checkpoint-dir DIR` writes: numbered epoch folders)"
            )
        if epoch is not None and epoch not in ck.steps():
            raise FileNotFoundError(
                f"--checkpoint {p}: no checkpoint of epoch {epoch} (it holds epochs {ck.steps()})"
            )
        state, meta = ck.restore(epoch)
        step = ck.restored_step
    fp = meta.get("fingerprint")
    cfg = fp.get("config") if isinstance(fp, dict) else None
    if not isinstance(cfg, dict) or "model" not in cfg or "params" not in state:
        raise ValueError(
            f"--checkpoint {p}: not a checkpoint of `ldjax mnist` training (no training config "
            "in its fingerprint or no params)"
        )
    try:
        config = TrainConfig(**cfg)
    except TypeError as e:
        raise ValueError(f"--checkpoint {p}: its training config is not ldjax's ({e})") from e
    model = make_model(config.model)
    like = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    params = state["params"]
    same = jax.tree_util.tree_structure(like) == jax.tree_util.tree_structure(params) and all(
        np.shape(a) == b.shape
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(like))
    )
    if not same:
        raise ValueError(
            f"--checkpoint {p}: its parameters are not those of the recorded model "
            f"{config.model!r} (other tree or shapes)"
        )
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    out = dict(params=params, config=config, model=config.model, step=int(step), path=str(p))
    if optimizer:
        out.update(_mnist_optimizer(p, int(step), state, config, n_train))
    return out


def _mnist_optimizer(p: Path, step: int, state: dict, config, n_train: int | None) -> dict:
    """The training run's optimizer and its state, restored with the optimizer's structure."""
    from ldjax.mnist.train import make_optimizer, steps_per_epoch  # noqa: PLC0415
    from ldjax.training.checkpoint import Checkpoints  # noqa: PLC0415

    n = config.n_train if n_train is None else n_train
    if n is None:
        raise ValueError(
            f"--checkpoint {p}: its config trains on all rows (n_train None): the optimizer's "
            "schedule needs the number of training rows"
        )
    tx = make_optimizer(config, steps_per_epoch(config, int(n)))
    like = {"params": state["params"], "opt_state": tx.init(state["params"])}
    like.update({k: v for k, v in state.items() if k not in like})
    with Checkpoints(p) as ck:
        try:
            full, _ = ck.restore(step, like=like)
        except ValueError as e:
            raise ValueError(
                f"--checkpoint {p}: its optimizer state is not that of the recorded recipe ({e})"
            ) from e
    pre = ldjax.preconditioner(tx, full["opt_state"], full["params"], check=False)
    if all(not np.any(np.asarray(a)) for a in jax.tree_util.tree_leaves(pre)):
        raise ValueError(
            f"--checkpoint {p}: the run's learning rate is 0 at epoch {step} (the end of its "
            f"{config.schedule} schedule), so a step on u moves nothing: use --step sgd, or "
            f"--epoch E with an earlier checkpoint (E < {step})"
        )
    return dict(optimizer=tx, opt_state=full["opt_state"])


def sft_batch_share(logits, targets, batch_size):
    """u's share of a training batch's mean cross-entropy: ``sft(logits, targets) / batch_size``
    (the loss of the step on u alone under the training run's optimizer)."""
    return losses.sft(logits, targets) / batch_size


def mnist_probes(spec, test_images, test_labels, seed: int = 0):
    """The probes of ``--probes``: ``(images uint8 (N_o, 28, 28), labels (N_o,), description)``.

    ``spec`` is an int K (K held-out digits of every class, the first in file order of the test
    split) or a path to an ``.npz`` with ``images`` ``(N_o, 28, 28)`` uint8 and ``labels``.
    """
    from ldjax.experiments.mnist.analysis import pick_per_class  # noqa: PLC0415

    text = str(spec)
    if text.isdigit():
        k = int(text)
        if k < 1:
            raise ValueError(f"--probes {spec}: expected K >= 1 digits per class or an .npz file")
        counts = np.bincount(np.asarray(test_labels), minlength=10)
        if counts.min() < k:
            raise ValueError(
                f"--probes {k}: the test split has only {counts.min()} digits of some class"
            )
        idx = pick_per_class(test_labels, k)
        return test_images[idx], np.asarray(test_labels)[idx], f"{k} test digits per class"
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--probes {spec}: neither an integer nor an existing .npz file")
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(
            f"--probes {path}: expected an .npz with 'images' (N, 28, 28) uint8 and 'labels' "
            f"(N,) ({e})"
        ) from e
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"--probes {path}: 'images' must be uint8 (N, 28, 28), got {images.dtype} "
            f"{images.shape}"
        )
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"--probes {path}: 'labels' must be ({len(images)},) ints in 0..9")
    return images, labels.astype(np.int32), str(path)


def _influence_kwargs(opts: dict) -> dict:
    return dict(
        chunk_size=opts["chunk_size"],
        mesh=opts["mesh"],
        out=str(Path(opts["out"]) / "influence"),
        audit_size=opts["audit"],
        audit_seed=opts.get("seed", 0),
        progress=opts.get("progress", False),
        method=opts.get("method", "auto"),
    )


def _speed(inf, pairs: int, seconds: float) -> dict:
    """Chunks computed now (the others were on disk) and the pairs per second of those."""
    frac = inf.chunks_computed / max(inf.chunks, 1)
    return dict(
        chunks=dict(computed=inf.chunks_computed, total=inf.chunks),
        pairs_per_second=round(frac * pairs / max(seconds, 1e-9), 1) if frac else None,
    )


def _audit_summary(audit: dict | None, step: str = "one real SGD step") -> dict:
    if not audit:
        return dict(n=0, note="no audit (--audit 0): the predictions carry no measured error")
    rel = np.asarray(audit["rel_error"], np.float64)
    return dict(
        n=int(rel.size),
        indices=audit["indices"],
        median_rel_error=float(audit["median_rel_error"]),
        max_rel_error=float(rel.max()),
        rel_error=rel,
        median_sign_agreement=float(np.median(audit["sign_agreement"])),
        definition=f"{step} on each audited u alone, taken for real (ldjax.actual_step), against "
        "the prediction: ‖predicted − actual‖ / ‖actual‖ over every probe's readouts",
    )


def run_mnist(
    ckpt: dict,
    train: tuple,
    probes: tuple,
    *,
    eta: float | None,
    opts: dict,
    top: int = 5,
    gallery_probes: int = 6,
) -> tuple[dict, dict, dict]:
    """The MNIST job: the influence of every training digit on every probe digit.

    The step on each u alone is plain SGD at ``eta`` on u's cross-entropy, or (``eta=None``, a
    ``ckpt`` with ``"optimizer"``) the training run's own optimizer from its checkpointed state on
    u's share of a batch's mean loss (``sft / batch_size``): ``delta`` is then u's part of that
    update, and ``summary["carry"]`` what the state moves on every probe whatever u (momentum,
    weight decay).

    Args:
      ckpt: :func:`load_mnist_checkpoint`.
      train: ``(images uint8 (N_u, 28, 28), labels (N_u,))``, the training digits U.
      probes: ``(images, labels)`` of the probes O (:func:`mnist_probes`).
      eta: the step size of the step on each u alone (plain SGD on u's cross-entropy), or None:
        the checkpoint's optimizer (``ckpt["optimizer"]``, ``ckpt["opt_state"]``).
      opts: ``chunk_size``, ``mesh``, ``out`` (the run folder), ``audit``, ``seed``,
        ``progress``, ``method``.
      top: k of the top-k readouts; gallery_probes: probes shown in the gallery.

    Returns:
      ``(summary, figures, tables)``: the JSON-able summary, ``{name: Figure}`` and
      ``{"top_k.json": records}``.
    """
    from ldjax.data.mnist import to_float  # noqa: PLC0415
    from ldjax.mnist.models import apply_fn, make_model  # noqa: PLC0415

    xu_img, yu = train
    xo_img, yo = probes
    f = apply_fn(make_model(ckpt["model"]))
    x_u, x_o = to_float(xu_img), to_float(xo_img)
    if eta is None:
        if "optimizer" not in ckpt:
            raise ValueError("run_mnist: eta=None needs a checkpoint loaded with optimizer=True")
        batch = ckpt["config"].batch_size
        step = dict(optimizer=ckpt["optimizer"], opt_state=ckpt["opt_state"])
        loss_fn, kw = sft_batch_share, dict(targets=np.asarray(yu), batch_size=float(batch))
        what = f"one step of the run's optimizer (epoch {ckpt['step']} state)"
    else:
        step, loss_fn, kw = dict(eta=eta), losses.sft, dict(targets=np.asarray(yu))
        what = f"one SGD step (η={eta:.3g})"
    t0 = time.time()
    inf = ldjax.influence(
        f,
        ckpt["params"],
        jnp.asarray(x_u),
        jnp.asarray(x_o),
        loss_fn,
        loss_kwargs=kw,
        targets_o=np.asarray(yo),
        **step,
        **_influence_kwargs(opts),
    )
    seconds = time.time() - t0
    s = readouts.scores(inf.delta, yo)
    tk = readouts.top_k(s, top)
    classes = list(range(10))
    agg = readouts.aggregate(s, yu, yo, order_u=classes, order_o=classes)
    figs = {
        "heatmap": plots.plot_heatmap(
            s,
            yu,
            yo,
            title=f"MNIST {ckpt['model']}: predicted Δ log π(y_o|x_o) after {what} on u",
            label_u="training digit u, by class",
            label_o="probe digit o, by class",
        ),
        "aggregate": plots.plot_aggregate(
            agg,
            title="mean predicted Δ log π(y_o|x_o) by (class of u, class of o)",
            label_u="class of the training digit u",
            label_o="class of the probe o",
        ),
        "gallery": plots.plot_gallery(
            tk,
            xu_img,
            yu,
            xo_img,
            yo,
            np.linspace(0, len(yo) - 1, min(gallery_probes, len(yo))).astype(int),
        ),
    }
    if inf.audit:
        figs["audit"] = plots.plot_audit(inf.audit, what="Δ log π(·|x_o)")
    table = [
        dict(
            probe=int(o),
            label=int(yo[o]),
            helpful=[
                dict(u=int(u), label=int(yu[u]), score=float(v))
                for u, v in zip(tk["helpful"][o], tk["helpful_score"][o])
            ],
            harmful=[
                dict(u=int(u), label=int(yu[u]), score=float(v))
                for u, v in zip(tk["harmful"][o], tk["harmful_score"][o])
            ],
        )
        for o in range(len(yo))
    ]
    same = np.asarray(yu)[:, None] == np.asarray(yo)[None, :]
    summary = dict(
        family="mnist",
        checkpoint=dict(path=ckpt["path"], epoch=ckpt["step"], model=ckpt["model"]),
        n_u=int(len(yu)),
        n_o=int(len(yo)),
        eta=None if eta is None else float(eta),
        step=what,
        method=inf.method,
        influence_dir=inf.path,
        seconds=round(seconds, 2),
        **_speed(inf, len(yu) * len(yo), seconds),
        audit=_audit_summary(inf.audit, what),
        readouts=dict(
            score=f"S[u, o] = predicted Δ log π(y_o|x_o) after {what} on u alone ("
            + (
                "its cross-entropy)"
                if eta is not None
                else "its share of a batch's mean loss, "
                "u's part of the update without the state's carry-over)"
            ),
            top_k=int(tk["helpful"].shape[1]),
            by_class_pair=dict(mean=agg["mean"], classes=classes),
            mean_same_class=float(s[same].mean()) if same.any() else None,
            mean_other_class=float(s[~same].mean()) if (~same).any() else None,
            fraction_helpful_same_class=float(np.mean(s[same] > 0)) if same.any() else None,
        ),
    )
    if inf.delta_carry is not None:
        carry = np.asarray(inf.delta_carry)[np.arange(len(yo)), np.asarray(yo)]
        summary["carry"] = dict(
            definition="predicted Δ log π(y_o|x_o) that the optimizer's state makes whatever u "
            "(momentum, weight decay): added to every u's part in the audit's prediction",
            mean=float(carry.mean()),
            min=float(carry.min()),
            max=float(carry.max()),
            mean_abs_part_of_u=float(np.abs(s).mean()),
        )
    return summary, figs, {"top_k.json": table}


# ----------------------------------------------------------------------------- LM


def _encode(tok, records, field, max_len, max_prompt_len):
    from ldjax.data.preferences import encode_example  # noqa: PLC0415

    rows = [
        encode_example(tok, r["prompt"], r[field], max_len=max_len, max_prompt_len=max_prompt_len)
        for r in records
    ]
    return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "targets", "mask")}


def lm_pairs(records: Sequence[dict], loss: str, lm_config, params, max_prompt_len: int):
    """``(x_u, loss_kwargs)`` of the training pairs for ``loss``: ``sft`` steps on (x, y⁺);
    the pair losses on (x, y⁺) and (x, y⁻), with reference log-probs from ``params`` themselves
    (the checkpoint is the reference policy: the step is the first one from it)."""
    from ldjax.lm.tokenizer import ByteTokenizer  # noqa: PLC0415
    from ldjax.lm.train import sequence_logprobs  # noqa: PLC0415

    if loss not in LM_LOSSES:
        raise ValueError(f"--loss must be one of {LM_LOSSES}, got {loss!r}")
    tok = ByteTokenizer()
    kw = (lm_config.max_len, max_prompt_len)
    pos = _encode(tok, records, "chosen", *kw)
    if loss == "sft":
        return jnp.asarray(pos["tokens"]), dict(targets=pos["targets"], mask=pos["mask"])
    neg = _encode(tok, records, "rejected", *kw)
    kwargs = dict(
        targets_pos=pos["targets"],
        targets_neg=neg["targets"],
        mask_pos=pos["mask"],
        mask_neg=neg["mask"],
    )
    if loss != "slic":
        kwargs.update(
            ref_logp_pos=sequence_logprobs(params, lm_config, pos).astype(np.float32),
            ref_logp_neg=sequence_logprobs(params, lm_config, neg).astype(np.float32),
        )
    return (jnp.asarray(pos["tokens"]), jnp.asarray(neg["tokens"])), kwargs


def lm_probes(records: Sequence[dict], lm_config, max_prompt_len: int, types=None):
    """Every (record, response type) of the probe records as one probe: ``(data, meta)`` with
    ``data`` the ``tokens``/``targets``/``mask`` ``(N_o, T)`` and ``meta`` a list of
    ``{"record", "type", "prompt", "response"}``."""
    from ldjax.data.probes import probe_types  # noqa: PLC0415
    from ldjax.lm.tokenizer import ByteTokenizer  # noqa: PLC0415

    tok = ByteTokenizer()
    rows, meta = [], []
    for i, r in enumerate(records):
        kinds = [t for t in probe_types(r) if types is None or t in types]
        for t in kinds:
            rows.append(dict(r, _probe=r[t]))
            meta.append(dict(record=i, type=t, prompt=r["prompt"], response=r[t]))
    if not rows:
        raise ValueError(
            "--probes: no probe responses found (records need a 'prompt' and response fields "
            "such as 'chosen', 'rejected', 'chosen_gptsemantic', ...)"
        )
    return _encode(tok, rows, "_probe", lm_config.max_len, max_prompt_len), meta


def _loss_fn(loss: str, beta: float):
    fn = getattr(losses, loss)
    if loss in ("dpo", "ipo", "sppo"):
        return fn, dict(beta=float(beta))
    return fn, {}


def run_lm(
    params,
    lm_config,
    pairs: Sequence[dict],
    probe_records: Sequence[dict],
    *,
    loss: str,
    eta: float,
    opts: dict,
    beta: float = 0.1,
    max_prompt_len: int | None = None,
    top: int = 3,
    token_maps: int = 0,
) -> tuple[dict, dict, dict]:
    """The LM job: the influence of every training pair on every probe response.

    Args:
      params, lm_config: the model (:func:`ldjax.lm.checkpoint.load_lm`).
      pairs: training records (``prompt``, ``chosen``, ``rejected``).
      probe_records: probe records (``prompt`` and response fields, :func:`lm_probes`).
      loss: one of :data:`LM_LOSSES`; eta: the SGD step size of the step on each pair alone.
      opts: as :func:`run_mnist`; beta: the pair losses' β.
      token_maps: K > 0 adds the token maps of the K (pair, probe) entries largest in
        ``|S[u, o]|`` (:func:`lm_token_maps`): figures ``token_maps/*`` and the tables
        ``token_maps/maps.npz`` (arrays) and ``token_maps/ranking.json``.

    Returns:
      ``(summary, figures, tables)``; tables ``top_k.json`` and ``top_k.md`` (text).
    """
    from ldjax.lm.model import make_apply_fn  # noqa: PLC0415

    mpl = max_prompt_len if max_prompt_len is not None else lm_config.max_len // 2
    x_u, kw = lm_pairs(pairs, loss, lm_config, params, mpl)
    data_o, meta = lm_probes(probe_records, lm_config, mpl)
    loss_fn, hyper = _loss_fn(loss, beta)
    t0 = time.time()
    inf = ldjax.influence(
        make_apply_fn(lm_config),
        params,
        x_u,
        jnp.asarray(data_o["tokens"]),
        loss_fn,
        eta=eta,
        loss_kwargs=dict(kw, **hyper),
        targets_o=data_o["targets"],
        mask_o=data_o["mask"],
        **_influence_kwargs(opts),
    )
    seconds = time.time() - t0
    s = readouts.scores(inf.delta)
    tk = readouts.top_k(s, top)
    types = [m["type"] for m in meta]
    from ldjax.data.probes import PROBE_TYPES  # noqa: PLC0415

    order_o = [t for t in PROBE_TYPES if t in set(types)]
    groups_u = np.array(["all pairs"] * s.shape[0])
    agg = readouts.aggregate(s, groups_u, types, order_o=order_o)
    rows, names = [agg["mean"][0]], ["total"]
    if inf.terms is not None:
        for name, term in zip(("y⁺ term", "y⁻ term"), inf.terms):
            rows.append(readouts.aggregate(term, groups_u, types, order_o=order_o)["mean"][0])
            names.append(name)
    by_type = dict(mean=np.stack(rows), count=agg["count"], groups_u=names, groups_o=order_o)
    figs = {
        "heatmap": plots.plot_heatmap(
            s,
            groups_u,
            types,
            order_o=order_o,
            title=f"LM ({loss}): predicted Δ log π(y_o|x_o) after one step (η={eta:.3g}) on pair u",
            label_u="training pair u",
            label_o="probe response, by type",
        ),
        "aggregate": plots.plot_aggregate(
            by_type,
            title=f"mean predicted Δ log π(y_o|x_o) by probe type ({loss})",
            label_u="",
            label_o="probe response type",
        ),
    }
    if inf.audit:
        figs["audit"] = plots.plot_audit(inf.audit, what="Δ log π(y_o|x_o)")
    short = [
        dict(prompt=p["prompt"], chosen=p["chosen"], rejected=p.get("rejected")) for p in pairs
    ]
    table = readouts.top_k_table(tk, meta, short, k=top)
    tables = {"top_k.json": table, "top_k.md": _markdown(table, loss)}
    maps_summary = None
    if token_maps:
        maps = lm_token_maps(
            make_apply_fn(lm_config),
            params,
            x_u,
            dict(kw, **hyper),
            loss_fn,
            data_o,
            s,
            token_maps,
            eta=eta,
        )
        ranking = [
            dict(
                rank=j,
                u=int(u),
                o=int(o),
                influence=float(s[u, o]),
                map_sum=float(maps["map_sum"][j]),
                probe=meta[o],
                pair=short[u],
            )
            for j, (u, o) in enumerate(zip(maps["u"], maps["o"]))
        ]
        tables["token_maps/maps.npz"] = maps
        tables["token_maps/ranking.json"] = ranking
        for j, (u, o) in enumerate(zip(maps["u"], maps["o"])):
            name = f"token_maps/{j:02d}_u{u}_o{o}_{meta[o]['type']}"
            figs[name] = _token_map_figure(maps, j, loss, meta[o]["type"])
        rel = np.abs(maps["map_sum"] - maps["influence"]) / np.maximum(
            np.abs(maps["influence"]), 1e-30
        )
        maps_summary = dict(
            k=len(ranking),
            ranking="the K (u, o) largest in |S[u, o]|, ties to the smaller u then o",
            pairs=[[r["u"], r["o"]] for r in ranking],
            max_rel_diff_sum_vs_influence=float(rel.max()),
        )
    summary = dict(
        family="lm",
        loss=loss,
        beta=float(beta) if hyper else None,
        n_u=int(s.shape[0]),
        n_o=int(s.shape[1]),
        eta=float(eta),
        method=inf.method,
        influence_dir=inf.path,
        seconds=round(seconds, 2),
        **_speed(inf, s.size, seconds),
        audit=_audit_summary(inf.audit),
        readouts=dict(
            score="S[u, o] = predicted Δ log π(y_o|x_o) (summed over response tokens) after one "
            f"SGD step of size eta on pair u alone ({loss})",
            top_k=int(tk["helpful"].shape[1]),
            by_type=dict(rows=names, types=order_o, mean=by_type["mean"]),
        ),
    )
    if maps_summary is not None:
        summary["token_maps"] = maps_summary
    return summary, figs, tables


def lm_token_maps(
    apply_fn, params, x_u, loss_kwargs: dict, loss_fn, data_o: dict, s, k: int, *, eta: float
) -> dict:
    """The token maps (:func:`ldjax.token_influence`) of the ``k`` (pair u, probe o) entries of
    ``s (N_u, N_o)`` largest in ``|s|``
    (:func:`ldjax.experiments.analyze.readouts.top_abs`), computed for the distinct chosen pairs
    and probes only (one call).

    Args:
      apply_fn, params: the model; x_u: ``(N_u, T)`` tokens, or ``(x⁺, x⁻)`` for a pair loss.
      loss_kwargs: the loss's keyword arguments, arrays with leading size ``N_u`` (sliced here)
        and hyper-parameters; loss_fn: the loss; data_o: the probes' ``tokens``/``targets``/
        ``mask`` ``(N_o, T)``; s: the influence matrix the maps decompose; eta: its step size.

    Returns:
      numpy arrays: ``u``, ``o`` ``(K,)`` (most influential first), ``influence`` ``(K,)``
      (``s[u, o]``), ``map_pos`` ``(K, T_o, T_u)`` (the SFT map, or the y⁺ branch's) and, for a
      pair loss, ``map_neg`` (the y⁻ branch's), ``map_sum`` ``(K,)`` (every map summed over both
      positions and branches: ``s[u, o]`` up to round-off), the tokens ``probe_targets``/
      ``probe_mask``, ``pos_targets``/``pos_mask`` (and ``neg_targets``/``neg_mask``) ``(K, T)``,
      ``eta``.
    """
    us, os_ = readouts.top_abs(s, k)
    uu, iu = np.unique(us, return_inverse=True)
    oo, io = np.unique(os_, return_inverse=True)
    pair = isinstance(x_u, tuple)
    xs = tuple(jnp.asarray(x)[uu] for x in x_u) if pair else jnp.asarray(x_u)[uu]
    kw = {
        name: (np.asarray(v)[uu] if np.ndim(v) >= 1 and np.shape(v)[0] == s.shape[0] else v)
        for name, v in loss_kwargs.items()
    }
    c = ldjax.token_influence(
        apply_fn,
        params,
        jnp.asarray(data_o["tokens"])[oo],
        xs,
        loss_fn,
        eta=eta,
        targets_o=np.asarray(data_o["targets"])[oo],
        mask_o=np.asarray(data_o["mask"])[oo],
        loss_kwargs=kw,
    )
    branches = c if isinstance(c, tuple) else (c,)
    picked = [np.asarray(b)[io, iu] for b in branches]  # (K, T_o, T_u) each
    out = dict(
        u=us,
        o=os_,
        influence=np.asarray(s)[us, os_],
        map_pos=picked[0],
        map_sum=sum(p.astype(np.float64).sum(axis=(1, 2)) for p in picked),
        probe_targets=np.asarray(data_o["targets"])[os_],
        probe_mask=np.asarray(data_o["mask"])[os_],
        eta=np.float64(eta),
    )
    names = ("pos", "neg") if pair else ("pos",)
    tk, mk = ("targets_pos", "mask_pos") if pair else ("targets", "mask")
    out["pos_targets"], out["pos_mask"] = np.asarray(kw[tk])[iu], np.asarray(kw[mk])[iu]
    if "neg" in names:
        out["map_neg"] = picked[1]
        out["neg_targets"] = np.asarray(kw["targets_neg"])[iu]
        out["neg_mask"] = np.asarray(kw["mask_neg"])[iu]
    return out


def _token_map_figure(maps: dict, j: int, loss: str, probe_type: str):
    """The figure of ranked entry ``j`` of :func:`lm_token_maps`: one map (SFT) or the y⁺ and y⁻
    maps side by side (pair losses), drawn by :mod:`ldjax.experiments.lm.plots`."""
    from ldjax.experiments.lm import plots as lm_plots  # noqa: PLC0415
    from ldjax.lm.tokenizer import ByteTokenizer  # noqa: PLC0415

    u, o = int(maps["u"][j]), int(maps["o"][j])
    head = (
        f"#{j}: pair u={u} on probe o={o} ({probe_type}), {loss} step η={float(maps['eta']):.3g}: "
        f"S = {maps['influence'][j]:+.3e}, Σ C = {maps['map_sum'][j]:+.3e}"
    )
    probe = (maps["probe_targets"][j], maps["probe_mask"][j])
    pos = (maps["pos_targets"][j], maps["pos_mask"][j])
    if "map_neg" in maps:
        return lm_plots.plot_dpo_token_maps(
            maps["map_pos"][j],
            maps["map_neg"][j],
            *probe,
            pos,
            (maps["neg_targets"][j], maps["neg_mask"][j]),
            ByteTokenizer(),
            title=head,
        )
    return lm_plots.plot_token_map(maps["map_pos"][j], *probe, *pos, ByteTokenizer(), title=head)


def _clip(text: str, n: int = 160) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _markdown(table: list, loss: str) -> str:
    lines = [
        f"# Top training pairs per probe ({loss})",
        "",
        "Score: the predicted Δ log π(y_o|x_o) of the probe response after one step on the pair "
        "alone (positive: the pair raises it).",
        "",
    ]
    for row in table:
        lines += [
            f"## probe {row['probe']}: {row['type']} of record {row['record']}",
            "",
            f"- prompt: {_clip(row['prompt'])}",
            f"- response: {_clip(row['response'])}",
            "",
        ]
        for side in ("helpful", "harmful"):
            lines.append(f"**most {side}**")
            lines.append("")
            for e in row[side]:
                lines.append(
                    f"1. pair {e['u']} ({e['score']:+.3e}): prompt {_clip(e['prompt'], 80)!r}; "
                    f"chosen {_clip(e['chosen'], 80)!r}; rejected {_clip(e['rejected'], 80)!r}"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def config_dict(obj) -> dict:
    """A dataclass config as a dict (for the summary)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
