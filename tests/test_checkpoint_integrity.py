"""Checkpoints that cannot be trusted are refused by name: overwritten, truncated or deleted data
files, an edited or unparsable meta, a step folder renamed; half-written steps are never the
latest; an older checkpoint is loaded only when asked for, and then said so."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ldjax.training import train_loop
from ldjax.training.checkpoint import CheckpointError, Checkpoints, load_params, save_params

STATE = {
    "w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 7.0,
    "b": jnp.linspace(-1.0, 1.0, 7),
}


def _meta(step):
    return {
        "step": step,
        "fingerprint": {"lr": 0.1},
        "history": {
            "step": list(range(1, step + 1)),
            "loss": [1.0 / s for s in range(1, step + 1)],
        },
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Steps 1 and 2 of STATE (step 2's ``w`` doubled), written once for the module."""
    d = tmp_path_factory.mktemp("ckpt") / "c"
    with Checkpoints(d) as ck:
        ck.save(1, STATE, _meta(1))
        ck.save(2, dict(STATE, w=STATE["w"] * 2), _meta(2))
    return d


@pytest.fixture
def ckpt(pristine, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(pristine, d)
    return d


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _restore(d, **kw):
    with Checkpoints(d) as ck:
        return ck.restore(like=STATE, **kw)


def test_round_trip_hides_the_checksums(ckpt):
    state, meta = _restore(ckpt)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(STATE["w"] * 2))
    assert meta == _meta(2)  # checksums and meta_sha256 are the format's, not the caller's


def _overwrite_64_bytes(step_dir):
    p = _largest_data_file(step_dir)
    n = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(n // 2)
        old = f.read(64)
        f.seek(n // 2)
        f.write(bytes(255 - b for b in old))  # surely different bytes


def _other_values(step_dir):
    """Step 1's state (same tree, other values of ``w``) under step 2's meta: every byte reads
    back cleanly, so only the checksum can tell."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


def _truncate(step_dir):
    p = _largest_data_file(step_dir)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _delete_data_file(step_dir):
    _largest_data_file(step_dir).unlink()


def _edit_meta(**fields):
    def edit(step_dir):
        p = step_dir / "meta" / "metadata"
        m = json.loads(p.read_text())
        m.update(fields)
        p.write_text(json.dumps(m))

    return edit


def _edit_history(step_dir):
    p = step_dir / "meta" / "metadata"
    m = json.loads(p.read_text())
    m["history"]["loss"][0] = 123.0
    p.write_text(json.dumps(m))


def _bad_json(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"step": 2, "history": ')


def _delete_meta(step_dir):
    (step_dir / "meta" / "metadata").unlink()


def _delete_state(step_dir):
    shutil.rmtree(step_dir / "state")


CASES = {
    # where the 64 bytes land decides who notices: zstd (bad framing) or the SHA-256 (values)
    "overwrite_64_bytes": (
        _overwrite_64_bytes,
        r"array w fails its checksum: sha256|state cannot be read.*Error reading \"w/",
    ),
    "other_values": (_other_values, r"array w fails its checksum: sha256 is '[0-9a-f]{64}'"),
    "truncate": (_truncate, r"state cannot be read.*truncated.*Error reading \"w/"),
    "delete_data_file": (_delete_data_file, r"state cannot be read.*missing"),
    "edit_step": (_edit_meta(step=3), r"meta file .*metadata was edited or damaged"),
    "edit_fingerprint": (
        _edit_meta(fingerprint={"lr": 0.2}),
        r"meta file .*metadata was edited or damaged",
    ),
    "edit_history": (_edit_history, r"meta file .*metadata was edited or damaged"),
    "drop_meta_sha256": (_edit_meta(meta_sha256=None), r"has no meta_sha256"),
    "bad_json": (_bad_json, r"meta file .*metadata is not valid JSON"),
    "delete_meta": (_delete_meta, r"incomplete, its meta file .*metadata is missing"),
    "delete_state": (_delete_state, r"incomplete, its state folder is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_corruption_is_a_named_error(ckpt, case, capsys):
    damage, what = CASES[case]
    damage(ckpt / "2")
    with Checkpoints(ckpt) as ck:
        # never a silent fallback to step 1 ...
        with pytest.raises(CheckpointError, match=what) as e:
            ck.restore(like=STATE)
        assert str(e.value).startswith(f"checkpoint {ckpt / '2'}: ")  # names the checkpoint
        assert "Traceback" not in capsys.readouterr().err  # orbax's async echoes are dropped
        # ... only when asked for, and said so on stderr
        state, meta = ck.restore(like=STATE, fallback=True)
        assert ck.restored_step == 1 and [s for s, _ in ck.rejected] == [2]
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(STATE["w"]))
    err = capsys.readouterr().err
    assert f"loaded the OLDER checkpoint {ckpt / '1'}" in err and f"{ckpt / '2'}: " in err


def test_every_checkpoint_rejected_is_an_error(ckpt):
    _overwrite_64_bytes(ckpt / "2")
    _bad_json(ckpt / "1")
    with pytest.raises(CheckpointError, match="every checkpoint was rejected"):
        _restore(ckpt, fallback=True)


def test_half_written_step_is_never_the_latest(ckpt):
    """orbax writes a step as ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when complete
    (on local disks; ``commit_success.txt`` is the marker only where renames are not atomic): a
    step killed half-way stays a temporary folder, which is not a step."""
    half = ckpt / "3.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpt / "2", half)
    _truncate(half)
    with Checkpoints(ckpt) as ck:
        assert ck.steps() == [1, 2] and ck.latest() == 2
        _, meta = ck.restore(like=STATE)
    assert meta["step"] == 2


def test_renamed_step_folder_is_refused_by_the_loop(tmp_path):
    """A checkpoint whose folder name disagrees with the step in its meta is refused."""
    d = tmp_path / "run"
    kw = dict(total_steps=4, checkpoint_dir=d, checkpoint_every=2, progress=False)
    train_loop(_step, {"x": jnp.zeros(3)}, {}, _batch, **kw)
    os.rename(d / "4", d / "6")
    with pytest.raises(CheckpointError, match=r"saved as step 6 \(expected 4\)"):
        train_loop(_step, {"x": jnp.zeros(3)}, {}, _batch, resume=True, **kw)


def _step(params, opt_state, batch, s):
    x = params["x"] * 0.9 + batch["v"]
    return {"x": x}, opt_state, {"loss": jnp.sum(x * x)}


def _batch(s, params):
    return {"v": np.full(3, 0.1 * (s + 1), np.float32)}


def test_loop_falls_back_only_when_asked_and_ends_bitwise_equal(tmp_path, capsys):
    p0 = {"x": jnp.zeros(3)}
    full = train_loop(_step, p0, {}, _batch, total_steps=6, progress=False)
    d = tmp_path / "run"
    kw = dict(total_steps=6, checkpoint_dir=d, checkpoint_every=2, progress=False)
    train_loop(_step, p0, {}, _batch, stop_at=4, **kw)
    _edit_history(d / "4")
    with pytest.raises(CheckpointError, match=f"checkpoint {d / '4'}: its meta file"):
        train_loop(_step, p0, {}, _batch, resume=True, **kw)
    r = train_loop(_step, p0, {}, _batch, resume=True, resume_older=True, **kw)
    err = capsys.readouterr().err
    assert r.resumed_from == 2 and r.completed
    assert f"loaded the OLDER checkpoint {d / '2'}" in err
    assert f"set aside the rejected checkpoint as {d / '4.rejected'}" in err
    assert (d / "4.rejected").is_dir() and (d / "4").is_dir()  # step 4 written again
    np.testing.assert_array_equal(np.asarray(r.params["x"]), np.asarray(full.params["x"]))
    assert r.history == full.history


def test_save_params_replaces_atomically(tmp_path):
    p = tmp_path / "weights"
    save_params(p, {"a": jnp.ones(3)}, {"v": 1})
    save_params(p, {"a": jnp.zeros(3)}, {"v": 2})  # over an existing folder
    params, meta = load_params(p)
    assert meta["v"] == 2 and np.asarray(params["a"]).tolist() == [0.0, 0.0, 0.0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["weights"]  # no temporary left


def test_asking_for_another_structure_is_named_before_reading(ckpt):
    """Another model size is the caller's error (a ValueError, not damage), found from the meta
    before orbax reads an array; a fingerprint check runs even before that."""
    with Checkpoints(ckpt) as ck:
        with pytest.raises(ValueError, match=r"holds other arrays than asked for \(1 differ; "):
            ck.restore(like=dict(STATE, w=jnp.zeros((32, 64), jnp.float32)))
        with pytest.raises(ValueError, match=r"b: saved \(\[7\], 'float32'\), asked for nothing"):
            ck.restore(like={"w": STATE["w"]})

        def refuse(step, meta):
            assert step == 2 and meta == _meta(2)
            raise ValueError("another configuration")

        with pytest.raises(ValueError, match="another configuration"):
            ck.restore(like={"w": STATE["w"]}, check_meta=refuse)
