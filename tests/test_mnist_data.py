"""MNIST IDX loader, embedded default subset, download verification (offline, file:// mirror)."""

import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from ldjax.data import mnist
from ldjax.data.make_mnist_default import build_default, select_first_per_class
from ldjax.data.mnist import (
    default_info,
    download_mnist,
    load_default,
    load_mnist,
    read_idx,
    to_float,
)

# /work/shared/data/README.md: train+test combined class counts.
README_COUNTS = {
    0: 1001,
    1: 1127,
    2: 991,
    3: 1032,
    4: 980,
    5: 863,
    6: 1014,
    7: 1070,
    8: 944,
    9: 978,
}
FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture(scope="module")
def shared_dir():
    root = os.environ.get("LDJAX_DATA")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("LDJAX_DATA (folder holding mnist/) is not set")
    return Path(root) / "mnist"


@pytest.fixture(scope="module")
def shared(shared_dir):
    return {s: load_mnist(shared_dir, s) for s in ("train", "test")}


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Serialise a uint8 array as IDX (header magic 0x0000 08 ndim, big-endian dims)."""
    arr = np.asarray(arr, np.uint8)
    magic = (0x08 << 8 | arr.ndim) if magic is None else magic
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def write_split(folder: Path, images, labels, split="train", gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = mnist.MNIST_FILES[split]
    for stem, arr in ((img, images), (lab, labels)):
        data = idx_bytes(arr)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


# ---------------------------------------------------------------------------------- real files


def test_shared_files_shapes_and_class_counts(shared):
    (xtr, ytr), (xte, yte) = shared["train"], shared["test"]
    assert xtr.shape == (8000, 28, 28) and xtr.dtype == np.uint8
    assert ytr.shape == (8000,) and ytr.dtype == np.int32
    assert xte.shape == (2000, 28, 28) and yte.shape == (2000,)
    counts = np.bincount(np.concatenate([ytr, yte]), minlength=10)
    assert dict(enumerate(counts.tolist())) == README_COUNTS
    assert counts.sum() == 10000
    assert xtr.max() == 255 and xtr.min() == 0
    # a digit is mostly background: mean pixel of MNIST is ~33/255
    assert 25 < xtr.mean() < 40


def test_raw_files_load_the_same(shared_dir, shared, tmp_path):
    for name in FILES:
        (tmp_path / name[:-3]).write_bytes(gzip.decompress((shared_dir / name).read_bytes()))
    for split in ("train", "test"):
        x, y = load_mnist(tmp_path, split)
        np.testing.assert_array_equal(x, shared[split][0])
        np.testing.assert_array_equal(y, shared[split][1])


def _corrupt_copy(shared_dir, tmp_path, name, data: bytes) -> Path:
    for f in FILES:
        (tmp_path / f).write_bytes((shared_dir / f).read_bytes())
    (tmp_path / name).write_bytes(data)
    return tmp_path


def test_truncated_gzip_names_file(shared_dir, tmp_path):
    gz = (shared_dir / FILES[0]).read_bytes()
    d = _corrupt_copy(shared_dir, tmp_path, FILES[0], gz[: len(gz) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        load_mnist(d, "train")


def test_truncated_payload_message(shared_dir, tmp_path):
    raw = gzip.decompress((shared_dir / FILES[0]).read_bytes())
    d = _corrupt_copy(shared_dir, tmp_path, FILES[0], gzip.compress(raw[: 16 + 1000]))
    msg = (
        "train-images-idx3-ubyte.gz: expected 6272000 bytes of pixels for shape (8000, 28, 28), "
        "found 1000"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_mnist(d, "train")


def test_wrong_magic_names_file(shared_dir, tmp_path):
    raw = bytearray(gzip.decompress((shared_dir / FILES[2]).read_bytes()))
    raw[3] = 1  # 2051 -> 2049: a labels header on the images file
    d = _corrupt_copy(shared_dir, tmp_path, FILES[2], gzip.compress(bytes(raw)))
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte\.gz: magic number 2049, expected 2051"
    ):
        load_mnist(d, "test")
    raw[:4] = b"\x12\x34\x56\x78"
    (d / FILES[2]).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte\.gz: bad IDX magic number 305419896"
    ):
        load_mnist(d, "test")


def test_bad_header_size_names_file(shared_dir, tmp_path):
    raw = bytearray(gzip.decompress((shared_dir / FILES[1]).read_bytes()))
    raw[4:8] = (8001).to_bytes(4, "big")  # header claims one more label than stored
    d = _corrupt_copy(shared_dir, tmp_path, FILES[1], gzip.compress(bytes(raw)))
    msg = "train-labels-idx1-ubyte.gz: expected 8001 bytes of labels for shape (8001,), found 8000"
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_mnist(d, "train")


def test_count_mismatch_and_not_gzip(tmp_path):
    x = np.zeros((3, 28, 28), np.uint8)
    write_split(tmp_path, x, np.zeros(2, np.uint8))
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte\.gz has 3 images but "
        r".*train-labels-idx1-ubyte\.gz has 2 labels",
    ):
        load_mnist(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(
        ValueError, match=r"train-labels-idx1-ubyte\.gz: name ends in \.gz but the file is not gzip"
    ):
        load_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


def test_arbitrary_image_size_and_read_idx(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 7, 9), dtype=np.uint8)
    y = rng.integers(0, 10, 5, dtype=np.uint8)
    write_split(tmp_path, x, y, split="test", gz=False)
    xl, yl = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(xl, x)
    np.testing.assert_array_equal(yl, y.astype(np.int32))
    assert yl.dtype == np.int32
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte"), x)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "val")


def test_resolution_order(tmp_path, monkeypatch):
    a = np.full((2, 4, 4), 1, np.uint8)
    b = np.full((3, 4, 4), 2, np.uint8)
    write_split(tmp_path / "env" / "mnist", a, np.zeros(2, np.uint8))
    write_split(tmp_path / "cache" / "ldjax" / "mnist", b, np.zeros(3, np.uint8))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LDJAX_DATA", str(tmp_path / "env"))
    assert load_mnist()[0].shape[0] == 2  # $LDJAX_DATA/mnist first
    assert load_mnist(tmp_path / "cache" / "ldjax" / "mnist")[0].shape[0] == 3  # explicit wins
    monkeypatch.delenv("LDJAX_DATA")
    assert load_mnist()[0].shape[0] == 3  # then the user cache
    monkeypatch.setenv("LDJAX_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nocache"))
    with pytest.raises(FileNotFoundError) as e:
        load_mnist()
    msg = str(e.value)
    for needle in (
        str(tmp_path / "empty" / "mnist"),
        str(tmp_path / "nocache"),
        "download_mnist",
        "load_default",
    ):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="data_dir argument"):
        load_mnist(tmp_path / "empty")


def test_download_verifies_md5_offline(shared_dir, tmp_path, monkeypatch):
    """download_mnist against a file:// mirror (no network): wrong md5 is refused and leaves
    nothing behind; with the md5 table pointed at the shared files it fetches and loads them."""
    mirror = shared_dir.absolute().as_uri() + "/"
    with pytest.raises(ValueError, match="md5"):
        download_mnist(tmp_path / "bad", mirror=mirror)
    assert list((tmp_path / "bad").iterdir()) == []
    md5 = {f: hashlib.md5((shared_dir / f).read_bytes()).hexdigest() for f in FILES}
    monkeypatch.setattr(mnist, "MNIST_MD5", md5)
    dest = download_mnist(tmp_path / "good", mirror=mirror)
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    assert load_mnist(dest, "test")[0].shape == (2000, 28, 28)


# ---------------------------------------------------------------------------------- default


def test_default_is_real_subset(shared):
    info = default_info()
    total = 0
    for split, per_class in (("train", 80), ("test", 20)):
        x, y = load_default(split)
        total += len(y)
        assert x.dtype == np.uint8 and x.shape[1:] == (28, 28) and y.dtype == np.int32
        assert np.bincount(y, minlength=10).tolist() == [per_class] * 10
        idx = info[f"{split}_index"]
        xs, ys = shared[split]
        np.testing.assert_array_equal(x, xs[idx])
        np.testing.assert_array_equal(y, ys[idx])
        # the rule: the first per_class of each class in file order
        np.testing.assert_array_equal(idx, select_first_per_class(ys, per_class))
    assert total <= 1000
    assert "sha256" in info["provenance"] and "CC BY-SA 3.0" in info["provenance"]


def test_default_rebuild_matches_package(shared_dir):
    built = build_default(shared_dir)
    info = default_info()
    for split in ("train", "test"):
        x, y = load_default(split)
        np.testing.assert_array_equal(built[f"{split}_images"], x)
        np.testing.assert_array_equal(built[f"{split}_labels"], y)
    assert str(built["provenance"]) == info["provenance"]
    for f in FILES:  # provenance records the sources' sha256
        assert hashlib.sha256((shared_dir / f).read_bytes()).hexdigest() in info["provenance"]


def test_to_float():
    x, _ = load_default("test")
    f = to_float(x)
    assert f.shape == (200, 28, 28, 1) and f.dtype == np.float32
    assert f.min() == 0.0 and f.max() == 1.0
    np.testing.assert_array_equal(f[..., 0] * 255, x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_float(f[..., 0])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        to_float(x[0])
