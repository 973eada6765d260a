"""``ldjax analyze mnist|lm``: the influence of every training example on every probe, from a
trained checkpoint, sharded over the devices, streamed to disk, resumable and audited.

Usage::

    ldjax analyze mnist                    # fresh clone: train a small LeNet, then analyze it
    ldjax analyze mnist --quick            # the same, smaller (a minute)
    ldjax analyze mnist --checkpoint runs/mnist/ckpt --train DATA/mnist --probes 5 --out out/a
    ldjax analyze lm                       # fresh clone: pretrain a tiny LM, then analyze DPO
    ldjax analyze lm --checkpoint runs/lm --pairs pairs.jsonl --probes probes.jsonl --loss dpo \\
        --out out/lm

Writes under ``--out``: ``influence/`` (the zarr arrays, their manifest and the audit, see
:func:`ldjax.influence`), ``summary.json`` (the job, its speed, the audit's median relative
error, the aggregates), ``top_k.json`` (and ``top_k.md`` for the LM: the pairs as text), and the
figures ``analyze_{heatmap,aggregate,gallery,audit}.png``; with ``lm --token-maps K`` also the
token maps of the K entries largest in ``|S|`` (``token_maps/maps.npz``,
``token_maps/ranking.json``, ``figures/token_maps/*.png``). Without ``--checkpoint`` a small model
is trained first into ``--out``/train (with the one training loop and its checkpoints).

Rerunning the same command resumes an interrupted job at its first unfinished chunk; a finished
job computes no influence again (the readouts and figures are rewritten from the stored arrays).
A changed checkpoint, data set or setting is refused with the list of what differs: use another
``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ldjax.experiments import common
from ldjax.experiments.common import nonneg_int, positive_float, positive_int

__all__ = ["main", "parser"]

PROG = "ldjax analyze"


def _shared(p: argparse.ArgumentParser, out: str) -> None:
    common.add_common_arguments(p, out=out, quick=None, progress=None, seed=0)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="the trained model (default: train a small one into OUT/train first)",
    )
    p.add_argument(
        "--eta",
        type=positive_float,
        default=None,
        help="SGD step size of the step on each u alone (default: mnist, the checkpoint's peak "
        "lr / batch size; lm, 1e-5)",
    )
    p.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="devices to shard U over (default: all; on CPU, N host devices)",
    )
    p.add_argument(
        "--chunk-size", type=positive_int, default=32, help="training examples per chunk (32)"
    )
    p.add_argument(
        "--audit",
        type=nonneg_int,
        default=32,
        help="audit the prediction with a real step on this many random u (default 32)",
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="k of the top-k readouts (5)")
    p.add_argument(
        "--method",
        choices=("auto", "gram", "jvp", "factored"),
        default="auto",
        help="algorithm (auto)",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``ldjax analyze``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="family", required=True)
    what = "MNIST classifier: every training digit on every probe digit"
    m = sub.add_parser("mnist", help=what, description=what + " (guide: docs/guides/analyze.md)")
    _shared(m, "out/analyze_mnist")
    m.add_argument(
        "--train",
        default=None,
        help="MNIST-layout IDX folder (train-*/t10k-*); default: the embedded 800/200 digits",
    )
    m.add_argument(
        "--step",
        choices=("sgd", "optimizer"),
        default="sgd",
        help="the step on each u alone: plain SGD at --eta (sgd, default), or the training run's "
        "own optimizer (SGD momentum + weight decay, its schedule) from the checkpoint's state on "
        "u's share of a batch's mean loss (optimizer; the state's carry-over is reported apart)",
    )
    m.add_argument(
        "--epoch",
        type=positive_int,
        default=None,
        help="the checkpoint of this epoch (default: the newest)",
    )
    m.add_argument(
        "--n-train",
        type=positive_int,
        default=None,
        help="training digits U: the first N of the train split (default: those trained on)",
    )
    m.add_argument(
        "--probes",
        default=None,
        help="K held-out digits per class from the test split, or an .npz with images/labels "
        "(default 5; --quick 2)",
    )
    what = "LM: every training pair on every probe response"
    lm = sub.add_parser("lm", help=what, description=what + " (guide: docs/guides/analyze.md)")
    _shared(lm, "out/analyze_lm")
    lm.add_argument("--pairs", default=None, help="JSONL of prompt/chosen/rejected training pairs")
    lm.add_argument(
        "--probes",
        default=None,
        help="JSONL of probe records (prompt + response fields: chosen, rejected, rephrases...)",
    )
    lm.add_argument(
        "--loss", choices=("sft", "dpo", "ipo", "slic", "sppo"), default="dpo", help="(dpo)"
    )
    lm.add_argument("--beta", type=positive_float, default=0.1, help="β of dpo/ipo/sppo (0.1)")
    lm.add_argument(
        "--n-pairs", type=positive_int, default=None, help="use the first N pairs (default all)"
    )
    lm.add_argument(
        "--n-probe-records",
        type=positive_int,
        default=None,
        help="use the first N probe records (default all)",
    )
    lm.add_argument(
        "--token-maps",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="also write the token maps of the K (pair, probe) entries largest in |influence| "
        "(OUT/token_maps/maps.npz, ranking.json; OUT/figures/token_maps/*.png); default 0: none",
    )
    return p


def _devices(n: int | None):
    """The devices of ``--devices`` (on CPU: ``n`` host devices, set before JAX starts)."""
    import jax  # noqa: PLC0415

    if n is not None:
        try:
            jax.config.update("jax_num_cpu_devices", int(n))
        except RuntimeError:  # a backend already running (in-process callers): take what exists
            pass
    devs = jax.devices()
    if n is not None:
        if n > len(devs):
            raise ValueError(f"--devices {n}: only {len(devs)} {devs[0].platform} devices here")
        devs = devs[:n]
    return devs


def _train_mnist(args, out: Path, xi, yi):
    from ldjax.mnist.train import QUICK, TrainConfig, train  # noqa: PLC0415

    cfg = (
        TrainConfig(n_train=min(256, len(xi)), epochs=1, lr=0.1, batch_size=32, seed=args.seed)
        if args.quick
        else QUICK.replace(n_train=min(QUICK.n_train, len(xi)), seed=args.seed)
    )
    ckpt = out / "train" / "ckpt"
    print(
        f"{PROG} mnist: no --checkpoint: training {cfg.model} on {cfg.n_train} digits "
        f"({cfg.epochs} epochs) into {ckpt}",
        file=sys.stderr,
    )
    train(cfg, xi, yi, ckpt_dir=ckpt, resume=True, progress=common.progress_enabled(args))
    return ckpt


def _run_mnist(args, out: Path, mesh) -> tuple:
    from ldjax.data.mnist import load_default, load_mnist  # noqa: PLC0415
    from ldjax.experiments.analyze import pipeline  # noqa: PLC0415

    if args.train is not None:
        if not Path(args.train).is_dir():
            raise FileNotFoundError(f"--train {args.train}: no such folder")
        xi, yi = load_mnist(args.train, "train")
        try:
            xt, yt = load_mnist(args.train, "test")
        except (FileNotFoundError, ValueError):
            xt, yt = load_default("test")
        source = str(Path(args.train).absolute())
    else:
        xi, yi = load_default("train")
        xt, yt = load_default("test")
        source = "embedded default (ldjax.data.mnist.load_default)"
    if xi.shape[1:] != (28, 28):
        raise ValueError(f"--train {args.train}: images must be 28x28, got {xi.shape[1:]}")
    if args.step == "optimizer" and args.eta is not None:
        raise ValueError(
            "--eta sets the plain SGD step; --step optimizer takes the run's own optimizer and "
            "learning rate from the checkpoint: drop --eta"
        )
    ckpt_dir = args.checkpoint or _train_mnist(args, out, xi, yi)
    ckpt = pipeline.load_mnist_checkpoint(
        ckpt_dir, epoch=args.epoch, optimizer=args.step == "optimizer"
    )
    cfg = ckpt["config"]
    n = args.n_train or cfg.n_train or len(xi)
    if n > len(xi):
        raise ValueError(f"--n-train {n}: the train split has only {len(xi)} digits")
    probes = pipeline.mnist_probes(
        args.probes if args.probes is not None else (2 if args.quick else 5), xt, yt
    )
    eta = None if args.step == "optimizer" else (args.eta or cfg.lr / cfg.batch_size)
    summary, figs, tables = pipeline.run_mnist(
        ckpt,
        (xi[:n], yi[:n]),
        probes[:2],
        eta=eta,
        opts=_opts(args, out, mesh),
        top=args.top_k,
    )
    summary["data"] = dict(train=source, n_train=int(n), probes=probes[2])
    summary["eta_rule"] = (
        "--eta"
        if args.eta is not None
        else "the checkpoint's optimizer and state (--step optimizer)"
        if eta is None
        else "the checkpoint's peak lr / batch size (u's share of one training step)"
    )
    return summary, figs, tables


def _run_lm(args, out: Path, mesh) -> tuple:
    from ldjax.data.preferences import load_jsonl  # noqa: PLC0415
    from ldjax.experiments.analyze import pipeline  # noqa: PLC0415
    from ldjax.lm.checkpoint import load_lm  # noqa: PLC0415

    default_data = None
    if args.checkpoint is None or args.pairs is None:
        from ldjax.experiments.lm.pipeline import load_records, prepare_data  # noqa: PLC0415
        from ldjax.lm.config import QUICK  # noqa: PLC0415

        cfg = QUICK.replace(seed=args.seed)
        records, source = load_records(None, cfg)
        default_data = prepare_data(records, cfg, source)
    if args.checkpoint is None:
        from ldjax.experiments.lm.pipeline import pretrained_params  # noqa: PLC0415

        print(
            f"{PROG} lm: no --checkpoint: pretraining the tiny quick LM into {out / 'train'}",
            file=sys.stderr,
        )
        pretrained_params(
            cfg, default_data, out / "train", resume=True, progress=common.progress_enabled(args)
        )
        ckpt_path = out / "train" / "pretrain" / "ckpt"
    else:
        ckpt_path = Path(args.checkpoint)
    params, lm_config, info = load_lm(ckpt_path)
    pairs = load_jsonl(args.pairs) if args.pairs else default_data.train
    n_pairs = args.n_pairs or (12 if args.quick else (48 if args.pairs is None else len(pairs)))
    pairs = pairs[:n_pairs]
    if args.probes:
        probe_records = load_jsonl(args.probes, required=("prompt",), nonempty=("prompt",))
    else:
        probe_records = default_data.track_train if default_data else pairs
    n_rec = args.n_probe_records or (2 if args.quick else len(probe_records))
    probe_records = probe_records[:n_rec]
    mpl = (info.get("pipeline_seq") or {}).get("max_prompt_len") or lm_config.max_len // 2
    eta = args.eta if args.eta is not None else 1e-5
    summary, figs, tables = pipeline.run_lm(
        params,
        lm_config,
        pairs,
        probe_records,
        loss=args.loss,
        eta=eta,
        beta=args.beta,
        opts=_opts(args, out, mesh),
        max_prompt_len=int(mpl),
        top=min(args.top_k, 3),
        token_maps=args.token_maps,
    )
    summary["data"] = dict(
        checkpoint=str(ckpt_path),
        pairs=args.pairs or "synthetic (ldjax.data.synthetic, the quick preset's training split)",
        probes=args.probes or "synthetic tracked records",
        n_probe_records=len(probe_records),
    )
    return summary, figs, tables


def _opts(args, out: Path, mesh) -> dict:
    return dict(
        chunk_size=args.chunk_size,
        mesh=mesh,
        out=out,
        audit=args.audit,
        seed=args.seed,
        progress=common.progress_enabled(args),
        method=args.method,
    )


def run(args: argparse.Namespace, argv_text: str = PROG) -> dict:
    """Runs the job of parsed ``args`` and writes its files; returns the summary."""
    import ldjax  # noqa: PLC0415  (sets the XLA flag before JAX starts)

    out = common.check_writable(args.out)
    devs = _devices(args.devices)
    mesh = ldjax.default_mesh(devs)
    t0 = time.time()
    job = _run_mnist if args.family == "mnist" else _run_lm
    summary, figs, tables = job(args, out, mesh)
    machine = common.machine_info()
    summary.update(
        command=argv_text,
        machine=machine,
        devices=dict(count=len(devs), platform=devs[0].platform, mesh=dict(mesh.shape)),
        chunk_size=args.chunk_size,
        runtime_s=round(time.time() - t0, 1),
        figures=[_figure_path(name) for name in figs],
    )
    step = f"eta {summary['eta']:.3g}" if summary.get("eta") is not None else "the run's optimizer"
    footer = (
        f"{argv_text}  |  {machine['processor']}, {machine['cpus_available']} CPUs, jax "
        f"{machine['jax']} ({machine['backend']}), {len(devs)} devices  |  {step}"
        f", audit median rel. error {summary['audit'].get('median_rel_error', float('nan')):.2e}"
    )
    keep = {out / _figure_path(name) for name in figs} | {out / name for name in tables}
    for old in [*out.glob("figures/token_maps/*.png"), *out.glob("token_maps/*")]:
        if old not in keep:  # written by an earlier --token-maps K that this run does not redo
            old.unlink()
    for name, fig in figs.items():
        common.save_figure(fig, out / _figure_path(name), footer=footer)
    for name, table in tables.items():
        if isinstance(table, str):
            common.write_text(out / name, table)
        elif name.endswith(".npz"):
            import numpy as np  # noqa: PLC0415

            with common.atomic_path(out / name) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **table)
        else:
            common.write_json(out / name, table)
    common.write_json(out / "summary.json", summary)
    return summary


def _figure_path(name: str) -> str:
    """Where figure ``name`` goes under ``--out``: ``analyze_NAME.png``, or ``figures/NAME.png``
    for the grouped ones (``token_maps/...``)."""
    return f"figures/{name}.png" if "/" in name else f"analyze_{name}.png"


def _report(s: dict) -> str:
    a = s["audit"]
    audit = (
        f"audit on {a['n']} u: median relative error {a['median_rel_error']:.2e} "
        f"(max {a['max_rel_error']:.2e})"
        if a.get("n")
        else "no audit (--audit 0): these predictions carry no measured error"
    )
    return "\n".join(
        [
            f"{s['family']}: {s['n_u']} training examples x {s['n_o']} probes, method "
            f"{s['method']}, "
            + (f"eta {s['eta']:.3g}" if s.get("eta") is not None else s.get("step", ""))
            + f", {s['devices']['count']} "
            f"{s['devices']['platform']} devices: {s['seconds']} s, computed "
            f"{s['chunks']['computed']} of {s['chunks']['total']} chunks"
            + (
                f" ({s['pairs_per_second']:.0f} pairs/s)"
                if s["pairs_per_second"]
                else " (all were on disk: nothing computed)"
            ),
            audit,
            f"influence arrays: {s['influence_dir']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 done, 2 a usage or input error (bad checkpoint, data, a changed
    job in ``--out``), 1 a file system error, 130 interrupted (rerun to resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    text = " ".join([PROG] + [shlex.quote(a) for a in argv])
    try:
        summary = run(args, text)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; the finished chunks in {args.out}/influence are kept, rerun "
            "the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(_report(summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and {len(summary['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
