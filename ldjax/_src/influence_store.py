"""On-disk results of an influence job that survive kills: zarr arrays written chunk by chunk, and a
manifest that says what they are.

A folder holds:

* ``manifest.json``: the format, the fingerprints of the model and the data (SHA-256 of the
  parameters, the training examples, the probes, the loss's arguments), the job's config, the
  versions of ldjax and jax, and the arrays' shapes;
* one zarr array per result (``delta.zarr``, ``delta_pos.zarr``, ...), written through TensorStore
  (which orbax already installs), chunked so that each device's shard of a chunk of U is one zarr
  chunk: no two processes ever write the same zarr chunk;
* ``done/chunk-<i>.p<k>``: process k finished writing chunk i (written after its writes returned);
  a chunk is done when every process has marked it;
* ``audit.npz``: the audit of the prediction, once computed.

Rerunning the same job skips the done chunks, so after a SIGKILL it resumes at the first unfinished
chunk and ends bitwise equal to an uninterrupted run (each chunk is the same jitted program on the
same inputs). Rerunning a finished job computes nothing. A job whose fingerprints, config or
versions differ refuses the folder with an error naming what differs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from ldjax._src.version import __version__

FORMAT = "ldjax-influence/1"


def _versions() -> dict:
    return {"ldjax": __version__, "jax": jax.__version__}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class StoredArray:
    """A read-only view of one result array on disk: ``shape``, ``dtype``, slicing reads only the
    rows asked for, ``np.asarray(a)`` reads it all."""

    def __init__(self, store: ts.TensorStore):
        self._ts = store
        self.shape = tuple(int(d) for d in store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, idx):
        return np.asarray(self._ts[idx].read().result())

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


class InfluenceStore:
    """The folder of one influence job (module docstring).

    Args:
      path: the folder.
      shapes: ``{name: shape}`` of the result arrays (first axis N_u, second N_o).
      identity: ``{"fingerprints": {...}, "config": {...}}`` of the job.
      chunk_rows: zarr chunk length along N_u (one device's rows of one chunk of U).
      probe_cols: zarr chunk length along N_o (one device's probes).
      dtype: the arrays' dtype.
    """

    def __init__(
        self,
        path,
        shapes: dict,
        identity: dict,
        *,
        chunk_rows: int,
        probe_cols: int,
        dtype="float32",
    ):
        self.path = Path(path)
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.n_proc = jax.process_count()
        self.proc = jax.process_index()
        manifest = dict(
            format=FORMAT,
            **identity,
            versions=_versions(),
            arrays={
                k: dict(shape=list(v), dtype=str(np.dtype(dtype))) for k, v in self.shapes.items()
            },
            chunk_rows=int(chunk_rows),
            probe_cols=int(probe_cols),
            process_count=self.n_proc,
        )
        mpath = self.path / "manifest.json"
        if self.proc == 0:
            if self.path.exists() and not self.path.is_dir():
                raise ValueError(f"{self.path}: exists and is not a folder")
            if mpath.exists():
                self._check(json.loads(mpath.read_text(encoding="utf-8")), manifest)
            else:
                if self.path.exists() and any(self.path.iterdir()):
                    raise ValueError(
                        f"{self.path}: the folder is not empty and holds no influence "
                        "manifest; refusing to write into it (choose a new folder)"
                    )
                (self.path / "done").mkdir(parents=True, exist_ok=True)
                for name, shape in self.shapes.items():
                    self._open(name, shape, dtype, chunk_rows, probe_cols, create=True)
                _atomic_write(mpath, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        self.barrier("open")
        if self.proc != 0:
            self._check(json.loads(mpath.read_text(encoding="utf-8")), manifest)
        self.arrays = {
            name: self._open(name, shape, dtype, chunk_rows, probe_cols, create=False)
            for name, shape in self.shapes.items()
        }
        self.manifest = manifest

    def _open(self, name, shape, dtype, rows, cols, create):
        chunks = [min(rows, shape[0]), min(cols, shape[1])] + list(shape[2:])
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(self.path / f"{name}.zarr")},
        }
        if create:
            spec["metadata"] = {
                "shape": list(shape),
                "chunks": chunks,
                "dtype": np.dtype(dtype).str,
                "compressor": None,
                "fill_value": None,
            }
            return ts.open(spec, create=True, delete_existing=False).result()
        return ts.open(spec, open=True).result()

    def _check(self, saved: dict, now: dict) -> None:
        if saved.get("format") != FORMAT:
            raise ValueError(
                f"{self.path}: not an ldjax influence folder (format {saved.get('format')!r})"
            )
        diff = {}
        for section in (
            "fingerprints",
            "config",
            "versions",
            "arrays",
            "chunk_rows",
            "probe_cols",
            "process_count",
        ):
            a, b = saved.get(section), now.get(section)
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):
                    diff[section] = {
                        k: (a.get(k), b.get(k))
                        for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)
                    }
                else:
                    diff[section] = (a, b)
        if diff:
            raise ValueError(
                f"{self.path} holds another influence job (what differs, (saved, now): "
                f"{diff}); it is not overwritten: use a new folder, or delete this one"
            )

    def barrier(self, name: str) -> None:
        """All processes reach this point before any goes on (a no-op with one process)."""
        if self.n_proc > 1:
            multihost_utils.sync_global_devices(f"ldjax-influence-{name}")

    def _marker(self, ci: int, k: int) -> Path:
        return self.path / "done" / f"chunk-{ci:06d}.p{k}"

    def is_done(self, ci: int) -> bool:
        """Every process has written chunk ``ci``."""
        return all(self._marker(ci, k).exists() for k in range(self.n_proc))

    def write_shards(self, ci: int, writes: list) -> None:
        """Writes ``[(name, index, data)]`` (this process's shards of chunk ``ci``), waits for them,
        then marks the chunk done for this process."""
        futures = [
            self.arrays[name][idx].write(np.ascontiguousarray(data)) for name, idx, data in writes
        ]
        for fut in futures:
            fut.result()
        _atomic_write(self._marker(ci, self.proc), f"{time.time()}\n")

    def finish(self) -> None:
        self.barrier("finish")

    def read(self, name: str) -> StoredArray:
        return StoredArray(self.arrays[name])

    def write_audit(self, result: dict) -> None:
        tmp = self.path / f".audit.{os.getpid()}.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in result.items()})
        os.replace(tmp, self.path / "audit.npz")

    def read_audit(self) -> dict | None:
        p = self.path / "audit.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            out = {k: z[k] for k in z.files}
        out["median_rel_error"] = float(out["median_rel_error"])
        return out


def load_influence(path) -> dict:
    """The arrays of a finished (or partly done) influence folder, read lazily, and its manifest:
    ``{"manifest": dict, "done": bool, "<name>": StoredArray, ...}`` (``delta``,
    ``delta_loss_o``, ...; :class:`StoredArray` slices read only the rows asked for).

    Raises:
      FileNotFoundError: no folder or no ``manifest.json`` in it.
      ValueError: not an ldjax influence folder.

    Example:
      >>> res = ldjax.load_influence("out/analyze_mnist/influence")  # doctest: +SKIP
      >>> res["delta"][:10]                                           # doctest: +SKIP
    """
    p = Path(path)
    mpath = p / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{p}: no influence manifest (manifest.json) there")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{p}: not an ldjax influence folder (format {manifest.get('format')!r})")
    out = {"manifest": manifest}
    for name in manifest.get("arrays", {}):
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(p / f"{name}.zarr")}}
        out[name] = StoredArray(ts.open(spec, open=True).result())
    n_u = next(iter(manifest["arrays"].values()))["shape"][0] if manifest.get("arrays") else 0
    chunk = int(manifest.get("config", {}).get("chunk_size", 1))  # examples of U per chunk
    n_chunks = -(-n_u // max(chunk, 1))
    n_proc = int(manifest.get("process_count", 1))
    out["done"] = all(
        (p / "done" / f"chunk-{ci:06d}.p{k}").exists()
        for ci in range(n_chunks)
        for k in range(n_proc)
    )
    return out
