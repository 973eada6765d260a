"""MNIST in the standard IDX format: read, validate, locate, download, and the embedded subset.

The paper's warm-up (Ren & Sutherland, ICLR 2025, Figure 1) trains LeNet on 2,000 MNIST digits.
This module only deals with the bytes; the model and training loop live in :mod:`ldjax.mnist`.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header::

    0x00 0x00 <dtype code> <ndim>   (the "magic number": 2051 = uint8 images (N, H, W),
                                     2049 = uint8 labels (N,))
    ndim x uint32 dimension sizes
    prod(dims) * itemsize bytes of data

optionally gzip-compressed. Any folder with MNIST's layout (Fashion-MNIST, KMNIST, other image
sizes) loads with :func:`load_mnist`.

Where :func:`load_mnist` looks, in order:

1. the ``data_dir`` argument;
2. ``$LDJAX_DATA/mnist`` when the environment variable ``LDJAX_DATA`` is set;
3. the user cache ``$XDG_CACHE_HOME/ldjax/mnist`` (default ``~/.cache/ldjax/mnist``), where
   :func:`download_mnist` puts the files.

Nothing here downloads implicitly. :func:`load_default` needs no files at all: it reads a small
subset of real digits shipped inside the package (``ldjax/data/mnist_default.npz``, built by
``python -m ldjax.data.make_mnist_default``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_FILES",
    "MNIST_MD5",
    "DEFAULT_MIRROR",
    "read_idx",
    "load_mnist",
    "find_mnist_dir",
    "find_file",
    "cache_dir",
    "download_mnist",
    "load_default",
    "default_info",
    "to_float",
]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims (N, H, W)
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim (N,)

#: split -> (images file stem, labels file stem); each is looked up as ``stem + ".gz"`` then
#: ``stem``.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: md5 of the official gzip files (the same values torchvision checks).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# IDX dtype code -> (big-endian numpy dtype, name used in messages)
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_DEFAULT_RESOURCE = "mnist_default.npz"


# --------------------------------------------------------------------------------------------
# IDX reading


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the name)."""
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        if path.name.endswith(".gz"):
            raise ValueError(
                f"{path}: name ends in .gz but the file is not gzip data "
                f"(first bytes {raw[:4].hex()}); the download may be corrupt"
            )
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path}: corrupt or truncated gzip file ({len(raw)} bytes on disk): {e}"
        ) from e


def read_idx(path, *, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a numpy array.

    Args:
      path: the file. Gzip is detected from the content (bytes ``1f 8b``), not the name.
      expect_magic: if given (e.g. 2051 for images, 2049 for labels), the header's magic number
        must equal it.

    Returns:
      array of shape ``dims`` from the header, in native byte order (``uint8`` for MNIST).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a folder, an unreadable file, a bad gzip stream, a bad magic number, or a
        payload whose length does not match the header; the message names the file and what is
        wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an IDX file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = _read_bytes(path)
    except OSError as e:  # permissions, I/O errors (gzip errors are ValueErrors already)
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (needs >= 4)")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected 0x0000TTDD with a "
            f"known type TT (e.g. 2051 for images, 2049 for labels)"
        )
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: magic number {magic}, expected {expect_magic}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: header needs {header} bytes for {ndim} dimensions, file has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = {3: "pixels", 1: "labels"}.get(ndim, "data")
        raise ValueError(
            f"{path}: expected {expected} bytes of {what} for shape {dims}, found {found}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------
# locating and loading a folder


def cache_dir() -> Path:
    """The user cache folder for MNIST: ``$XDG_CACHE_HOME/ldjax/mnist``
    (``~/.cache/ldjax/mnist``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldjax" / "mnist"


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.gz`` or ``folder/<stem>``, whichever exists (gzip first), else None."""
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _has_split(folder: Path, split: str) -> bool:
    return all(find_file(folder, stem) is not None for stem in MNIST_FILES[split])


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")


def find_mnist_dir(data_dir=None, split: str = "train") -> Path:
    """The folder :func:`load_mnist` reads (see the module docstring for the order).

    Raises:
      FileNotFoundError: listing every place looked at and how to get the data.
    """
    _check_split(split)
    looked = []
    if data_dir is not None:
        candidates = [("data_dir argument", Path(data_dir))]
    else:
        candidates = []
        env = os.environ.get("LDJAX_DATA")
        if env:
            candidates.append(("$LDJAX_DATA/mnist", Path(env) / "mnist"))
        else:
            looked.append("$LDJAX_DATA/mnist (LDJAX_DATA is not set)")
        candidates.append(("user cache", cache_dir()))
    for label, folder in candidates:
        if _has_split(folder, split):
            return folder
        looked.append(f"{label}: {folder}")
    names = " and ".join(f"{s}[.gz]" for s in MNIST_FILES[split])
    raise FileNotFoundError(
        f"MNIST {split!r} files ({names}) not found. Looked in: "
        + "; ".join(looked)
        + ". To get them: set LDJAX_DATA to a folder holding mnist/, pass data_dir=, or run "
        "ldjax.data.mnist.download_mnist() (fills the user cache; needs internet). "
        "For a small real subset that needs no files use ldjax.data.mnist.load_default()."
    )


def load_mnist(data_dir=None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an MNIST-layout IDX folder.

    Args:
      data_dir: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; None resolves
        ``$LDJAX_DATA/mnist`` then the user cache (module docstring).
      split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).

    Returns:
      ``(images, labels)``: images ``uint8 (N, H, W)`` (28x28 for MNIST, raw 0..255 pixels),
      labels ``int32 (N,)``.
    """
    _check_split(split)
    folder = find_mnist_dir(data_dir, split)
    img_stem, lab_stem = MNIST_FILES[split]
    img_path, lab_path = find_file(folder, img_stem), find_file(folder, lab_stem)
    images = read_idx(img_path, expect_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, expect_magic=IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    return images, labels.astype(np.int32)


# --------------------------------------------------------------------------------------------
# download (never called by tests)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_mnist(dest=None, mirror: str = DEFAULT_MIRROR, *, timeout: float = 60.0) -> Path:
    """Download the four official MNIST gzip files and verify their md5.

    Args:
      dest: target folder; default the user cache (:func:`cache_dir`), which :func:`load_mnist`
        finds without arguments.
      mirror: base URL holding the four ``*.gz`` files.
      timeout: seconds per connection.

    Returns:
      the folder. Files already present with the right md5 are not fetched again.

    Raises:
      ValueError: a downloaded file has the wrong md5 (it is deleted).
    """
    dest = Path(dest) if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if not mirror.endswith("/"):
        mirror += "/"
    for name, md5 in MNIST_MD5.items():
        target = dest / name
        if target.is_file() and _md5(target) == md5:
            continue
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=dest)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(mirror + name, timeout=timeout) as resp,
            ):
                shutil.copyfileobj(resp, out)
            got = _md5(Path(tmp))
            if got != md5:
                raise ValueError(f"{mirror + name}: md5 {got}, expected {md5}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return dest


# --------------------------------------------------------------------------------------------
# embedded default subset


def _default_npz():
    ref = importlib.resources.files("ldjax.data").joinpath(_DEFAULT_RESOURCE)
    if not ref.is_file():
        raise FileNotFoundError(
            f"ldjax/data/{_DEFAULT_RESOURCE} is missing from the installed package; rebuild it "
            "with `python -m ldjax.data.make_mnist_default`"
        )
    with ref.open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def load_default(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The small real MNIST subset shipped inside the package (no files, no network).

    800 train digits (the first 80 of each class in file order) and 200 test digits (20 per
    class); see :func:`default_info` for provenance.

    Returns:
      ``(images uint8 (N, 28, 28), labels int32 (N,))``.
    """
    _check_split(split)
    z = _default_npz()
    return z[f"{split}_images"], z[f"{split}_labels"].astype(np.int32)


def default_info() -> dict:
    """Provenance of :func:`load_default`: ``{"provenance": str, "train_index": int64 (800,),
    "test_index": int64 (200,)}``, where the indices point into the source IDX files."""
    z = _default_npz()
    return {
        "provenance": str(z["provenance"]),
        "train_index": z["train_index"],
        "test_index": z["test_index"],
    }


# --------------------------------------------------------------------------------------------
# preprocessing


def to_float(images) -> np.ndarray:
    """Pixels to model inputs: ``x = images / 255`` as ``float32 (N, H, W, 1)`` in [0, 1].

    No mean/std standardisation is applied (the paper's reference code feeds ToTensor() pixels).

    Args:
      images: ``uint8 (N, H, W)`` as returned by :func:`load_mnist` / :func:`load_default`.

    Raises:
      ValueError: not uint8 (guards against normalising twice) or not 3-D.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (raw pixels), got dtype {images.dtype}")
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
    return (images.astype(np.float32) / np.float32(255.0))[..., None]
