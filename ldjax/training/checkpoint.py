"""The one checkpoint format of ldjax: orbax, with a checksum of every array and of the meta.

A checkpoint folder holds numbered steps (``<dir>/<step>/``), each with two orbax items:

* ``state``: a pytree of arrays (parameters, optimizer state, RNG keys), ``StandardSave``;
* ``meta``: a JSON document (the step, the config fingerprint, the history, ...), ``JsonSave``,
  to which :meth:`Checkpoints.save` adds ``"checksums"`` (the SHA-256 of every state array's
  bytes, with its shape and dtype, keyed by its path in the tree) and ``"meta_sha256"`` (the
  SHA-256 of the canonical JSON of everything else in the document, checksums included).

What :meth:`Checkpoints.restore` checks, in this order, each failure a :class:`CheckpointError`
that names the checkpoint (``<dir>/<step>``) and what is wrong:

* the step folder, its ``meta/metadata`` file and its ``state`` folder exist;
* the meta file (read as the plain JSON it is, before any array) is valid UTF-8 JSON, a JSON
  object, and its ``meta_sha256`` matches its content, so an edited step, epoch, history or
  fingerprint is refused (a document without ``meta_sha256``, e.g. from an older ldjax, is
  refused too); a caller's ``check_meta`` (the training loop: the configuration fingerprint, and
  step, history and folder name agreeing) runs next;
* the structure asked for (``like``) has the recorded array paths, sizes and dtypes, else a plain
  ``ValueError`` (another model size is the caller's error, not damage);
* orbax can read every array: a truncated or deleted data file is reported with the array and
  the file orbax failed on, instead of tensorstore's traceback;
* every array matches its recorded shape, dtype and SHA-256, and the tree has exactly the
  recorded arrays: overwritten bytes are caught even where orbax reads them without complaint.

What orbax offers itself (orbax-checkpoint 0.12.8, its source and documentation checked): no
checksum of array data. Its zarr3 layout adds a crc32c to the *shard index* only; the default
OCDBT/zarr2 layout with zstd notices overwritten bytes only when they break the compressed
framing, and otherwise reads them as wrong values without complaint (the issue's 64 overwritten
bytes changed 270 values of an MNIST kernel). So the SHA-256 above is ours.

Atomic writes are orbax's: each step is written to ``<step>.orbax-checkpoint-tmp-<time>`` and
renamed to ``<step>`` when complete (``AtomicRenameTemporaryPath``; ``commit_success.txt`` is
only the marker on filesystems without atomic rename), and only folders named by a step number
count as steps, so a step half-written when the process was killed is never taken as the latest.

No silent fallback: :meth:`Checkpoints.restore` loads the newest step or fails. Only with
``fallback=True`` does it try older steps, newest first, printing to stderr which one it loaded
and why each newer one was rejected.

:func:`save_params` / :func:`load_params` are the one-step form used for model weights (the LM's
weights, the pretraining cache); :func:`save_params` replaces an existing folder atomically.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointError", "Checkpoints", "array_checksums", "save_params", "load_params"]

_META_FILE = ("meta", "metadata")  # where orbax's JsonSave puts the meta document of a step


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: missing, truncated, edited, or not what its checksums
    say. The message names the checkpoint folder and what is wrong."""


def _key(path) -> str:
    """``a/b/0/c`` for a leaf's path, the same whether a node is a dict, a namedtuple or a list
    (a restore without a target turns namedtuples into dicts)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def array_checksums(tree: Any) -> dict:
    """``{path: {"sha256", "shape", "dtype"}}`` of every array leaf of ``tree`` (host bytes)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        out[_key(path)] = {
            "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
            "shape": list(a.shape),
            "dtype": str(a.dtype),
        }
    return out


def _meta_sha256(doc: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of ``doc`` without its own hash."""
    body = {k: v for k, v in doc.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _verify(tree: Any, expected: dict | None, where: str) -> None:
    if not isinstance(expected, dict):
        raise CheckpointError(
            f"{where}: the checkpoint has no array checksums (written by an older "
            "ldjax, or its meta was edited); refusing to trust it"
        )
    got = array_checksums(tree)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where}: the arrays do not match the checksummed tree "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, want in expected.items():
        have = got[k]
        for field in ("shape", "dtype", "sha256"):
            if have[field] != want.get(field):
                raise CheckpointError(
                    f"{where}: array {k} fails its checksum: {field} is {have[field]!r}, "
                    f"the checkpoint recorded {want.get(field)!r} (a data file under "
                    f"{where.split(' ', 1)[-1]}/state was changed or truncated)"
                )


def _check_structure(like: Any, expected: dict, where: str) -> None:
    """``like`` (arrays or ``jax.ShapeDtypeStruct``) against the recorded paths, sizes and dtypes:
    asking for another structure (another model size, say) is the caller's error, not damage.
    Sizes, not shapes: a leaf saved as ``(1,)`` restores into ``()`` (an optimizer's count does)."""
    got = {
        _key(path): (list(np.shape(leaf)), str(np.dtype(leaf.dtype)))
        for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    want = {k: (list(v.get("shape", [])), v.get("dtype")) for k, v in expected.items()}

    def same(k):
        a, b = got.get(k), want.get(k)
        return a is not None and b is not None and a[1] == b[1] and np.prod(a[0]) == np.prod(b[0])

    diff = [
        f"{k}: saved {want.get(k, 'nothing')}, asked for {got.get(k, 'nothing')}"
        for k in sorted(set(got) | set(want))
        if not same(k)
    ]
    if diff:
        raise ValueError(
            f"{where}: holds other arrays than asked for ({len(diff)} differ; "
            + "; ".join(diff[:4])
            + ")"
        )


def _check_meta(meta: Any, where: str, meta_file: Path) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its meta file {meta_file} is not a JSON object")
    recorded = meta.get("meta_sha256")
    if recorded is None:
        raise CheckpointError(
            f"{where}: its meta file {meta_file} has no meta_sha256 (written by an older "
            "ldjax, or edited); refusing to trust it"
        )
    if recorded != _meta_sha256(meta):
        raise CheckpointError(
            f"{where}: its meta file {meta_file} was edited or damaged: the SHA-256 of its "
            f"content does not match the recorded meta_sha256 (fields: {sorted(meta)})"
        )
    return meta


def _reason(e: BaseException) -> str:
    """The innermost message of an orbax/tensorstore failure, one line, without the spec dump."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for cut in (" [tensorstore_spec", " See full TensorStore"):
        text = text.split(cut)[0]
    return text[:400]


@contextlib.contextmanager
def _quiet_async_failures():
    """orbax reads arrays in asyncio tasks: when one fails, the others' exceptions are printed at
    garbage collection ("Task exception was never retrieved"). The first failure is what the
    :class:`CheckpointError` reports; the echoes are dropped."""
    logger = logging.getLogger("asyncio")
    level, hook = logger.level, sys.unraisablehook
    logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda _unraisable: None
    try:
        yield
    finally:
        gc.collect()
        logger.setLevel(level)
        sys.unraisablehook = hook


def _plain(tree: Any) -> Any:
    """Restored arrays are committed to a device and fresh ones are not: plain uncommitted
    arrays keep jitted functions from compiling a second time."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), tree)


class Checkpoints:
    """A folder of numbered orbax checkpoints with ``state`` and ``meta`` items (module docstring).

    Args:
      directory: the folder (created on the first save).
      max_to_keep: keep only the newest this many steps (None keeps all).

    Attributes:
      restored_step: the step the last :meth:`restore` loaded (None before any).
      rejected: ``[(step, reason)]`` of the newer steps a ``fallback=True`` restore skipped.
    """

    def __init__(self, directory, *, max_to_keep: int | None = None):
        # local: orbax is optional (the ``experiments`` extra), takes ~2 s to import and only a
        # Checkpoints object needs it
        import orbax.checkpoint as ocp  # noqa: PLC0415

        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: exists and is not a folder")
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self.restored_step: int | None = None
        self.rejected: list[tuple[int, str]] = []

    def steps(self) -> list[int]:
        """The complete steps, oldest first (orbax's temporary folders are not steps)."""
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        """The newest complete step, or None."""
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` and ``meta`` (plus the state's checksums and the meta's own SHA-256)
        as ``step``; ``meta`` must be JSON-able."""
        doc = json.loads(json.dumps(dict(meta, checksums=array_checksums(state))))
        doc["meta_sha256"] = _meta_sha256(doc)
        ocp = self._ocp
        self._mngr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(doc)
            ),
            force=True,
        )

    def restore(
        self,
        step: int | None = None,
        like: Any = None,
        *,
        fallback: bool = False,
        check_meta: Callable[[int, dict], None] | None = None,
    ) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the newest), checked (module docstring).

        Args:
          step: the step to load; None: the newest.
          like: a pytree of the state's structure (arrays or ``jax.ShapeDtypeStruct``); without
            it the saved structure is used.
          fallback: with ``step=None``, when the newest step is rejected try the older ones,
            newest first, and print to stderr which one was loaded and why the newer ones were
            rejected (:attr:`rejected`). Never the default: a damaged newest checkpoint is an
            error unless the caller asked for an older one.

        Returns:
          ``(state, meta)``: plain (uncommitted) jax arrays, and the meta without the checksums.

        Raises:
          CheckpointError: no checkpoint, or the one asked for (every one, with ``fallback``)
            fails a check; the message names the checkpoint and the problem.
          ValueError: ``like`` asks for other arrays (paths, shapes, dtypes) than the checkpoint
            recorded, e.g. another model size.
        """
        self._mngr.wait_until_finished()
        self.rejected = []
        if step is not None:
            return self._restore_step(int(step), like, check_meta)
        steps = self.steps()[::-1]
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint")
        if not fallback:
            return self._restore_step(steps[0], like, check_meta)
        for s in steps:
            try:
                out = self._restore_step(s, like, check_meta)
            except CheckpointError as e:
                self.rejected.append((s, str(e)))
                continue
            if self.rejected:
                lines = "\n".join(f"  rejected {r}" for _, r in self.rejected)
                print(
                    f"ldjax: loaded the OLDER checkpoint {self.directory / str(s)} "
                    f"(fallback requested); newer ones were rejected:\n{lines}",
                    file=sys.stderr,
                )
            return out
        raise CheckpointError(
            f"{self.directory}: every checkpoint was rejected: "
            + "; ".join(r for _, r in self.rejected)
        )

    def _restore_step(self, step: int, like: Any, check_meta) -> tuple[Any, dict]:
        folder = self.directory / str(step)
        where = f"checkpoint {folder}"
        meta_file = folder.joinpath(*_META_FILE)
        if not folder.is_dir():
            raise CheckpointError(f"{where}: no such step folder")
        if not meta_file.is_file():
            raise CheckpointError(f"{where}: incomplete, its meta file {meta_file} is missing")
        if not (folder / "state").is_dir():
            raise CheckpointError(f"{where}: incomplete, its state folder is missing")
        # the meta first (orbax's JsonSave file is plain JSON): verified before any array is read
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{where}: its meta file {meta_file} is not valid JSON ({e})"
            ) from e
        except OSError as e:
            raise CheckpointError(f"{where}: its meta file {meta_file} cannot be read ({e})") from e
        meta = _check_meta(meta, where, meta_file)
        expected = meta.get("checksums")
        clean = {k: v for k, v in meta.items() if k not in ("checksums", "meta_sha256")}
        if check_meta is not None:
            check_meta(step, clean)
        if like is not None and isinstance(expected, dict):
            _check_structure(like, expected, where)
        ocp = self._ocp
        state_args = (
            ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        )
        try:
            with _quiet_async_failures():
                r = self._mngr.restore(step, args=ocp.args.Composite(state=state_args))
        except Exception as e:  # orbax/tensorstore raise bare Exception for unreadable arrays
            raise CheckpointError(
                f"{where}: its state cannot be read, a file is missing, truncated or damaged "
                f"({_reason(e)})"
            ) from e
        state = r["state"]
        _verify(state, expected, where)
        self.restored_step = step
        return _plain(state), clean

    def set_aside(self, step: int) -> Path:
        """Renames step ``step`` to ``<step>.rejected[-k]`` (kept for inspection, no longer a
        step), so that a run resumed from an older step can write that step again."""
        self._mngr.wait_until_finished()
        src = self.directory / str(int(step))
        dst = self.directory / f"{int(step)}.rejected"
        k = 1
        while dst.exists():
            dst, k = self.directory / f"{int(step)}.rejected-{k}", k + 1
        os.replace(src, dst)
        self._mngr.reload()
        return dst

    def wait(self) -> None:
        """Blocks until every save has reached the disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_params(path, params: Any, meta: dict | None = None) -> None:
    """Writes ``params`` (and a JSON ``meta``) as a one-step checkpoint folder at ``path``.

    The folder is written next to ``path`` under a temporary name and renamed into place, an
    existing ``path`` being replaced only then: a kill leaves the old folder or the new one,
    never a half-written one under ``path``.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing-{uuid.uuid4().hex[:8]}")
    old = None
    try:
        with Checkpoints(tmp, max_to_keep=1) as ck:
            ck.save(0, {"params": params}, meta or {})
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_params(path, like: Any = None) -> tuple[Any, dict]:
    """``(params, meta)`` of what :func:`save_params` wrote; ``like`` gives the structure."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint at {p}")
    with Checkpoints(p) as ck:
        if ck.latest() is None:
            raise FileNotFoundError(f"no parameter checkpoint at {p}")
        state, meta = ck.restore(like=None if like is None else {"params": like})
    return state["params"], meta
