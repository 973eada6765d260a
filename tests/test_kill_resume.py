"""Kill tests (slow tier): a training process SIGKILLed after a checkpoint resumes to the
bit-identical result of an uninterrupted run, for MNIST and every LM phase; Ctrl-C on ``ldjax lm``
leaves a resumable state; a corrupted SFT checkpoint stops ``ldjax lm dpo --resume`` by name.

Each kill test runs ``tests/kill_driver.py`` twice: once to be killed (it sleeps after every
update, which changes no number, so the kill lands between two checkpoints), once to resume and
to train the same phase uninterrupted in the same process for the comparison.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "kill_driver.py"
#: the last checkpoint of each phase: MNIST is checkpointed by epoch (4), the LM phases by step
LAST = {"mnist": 4, "pretrain": 12, "sft": 12, "sft_extend": 12, "dpo": 12, "dpo_onpolicy": 8}


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", MPLBACKEND="Agg")


def _steps(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _wait_for_checkpoint(proc, d: Path, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if d.is_dir() and _steps(d):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before a checkpoint: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("phase", list(LAST))
def test_sigkill_then_resume_is_bitwise_equal(phase, tmp_path):
    d = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), phase, str(d), "--sleep", "0.15"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_checkpoint(proc, d)
        time.sleep(0.15)  # land anywhere: between updates, or while a checkpoint is written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _steps(d)
    assert done and done[-1] < LAST[phase], f"the kill came too late: steps {done}"
    out = tmp_path / "final.npz"
    r = subprocess.run(
        [sys.executable, str(DRIVER), phase, str(d), "--resume", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(d)[-1] == LAST[phase]
    z = np.load(out)
    resumed = sorted(k for k in z.files if k.startswith("resumed"))
    assert resumed and len(resumed) * 2 == len(z.files)
    for k in resumed:
        a, b = z[k], z["full" + k[len("resumed") :]]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"{phase}: {k} differs after resume"


# ----------------------------------------------------------------------------------------------
# ldjax lm: Ctrl-C, a corrupted SFT checkpoint
# ----------------------------------------------------------------------------------------------

TINY = {
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
    "pretrain": {"steps": 4, "batch_size": 4, "eval_every": 2, "ckpt_every": 2},
    "sft": {"steps": 6, "epochs": 0.0, "batch_size": 4, "eval_every": 2, "ckpt_every": 2},
    "preference": {"steps": 4, "epochs": 0.0, "batch_size": 4, "eval_every": 2, "ckpt_every": 2},
    "data": {
        "n_records": 24,
        "n_heldout": 4,
        "n_track": 2,
        "synthetic_n": 24,
        "max_len": 48,
        "max_prompt_len": 16,
    },
    "track": {"decode_max_new_tokens": 6, "eval_batch": 16},
}


@pytest.fixture
def tiny_config(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_corrupted_sft_checkpoint_stops_dpo_resume_by_name(tiny_config, tmp_path, capsys):
    """The issue's case: 64 bytes overwritten in the middle of the largest data file of the SFT
    checkpoint, then ``ldjax lm dpo --quick --no-cache --resume``: a named error, not a NaN run;
    the older checkpoint only with ``--resume-older-checkpoint``, and said so."""
    from ldjax.experiments.lm import cli

    out = tmp_path / "run"
    args = ["--quick", "--config", tiny_config, "--no-cache", "--out", str(out), "--no-progress"]
    assert cli.main(["sft"] + args) == 0
    ckpt = out / "sft" / "ckpt"
    last = ckpt / str(_steps(ckpt)[-1])
    p = _largest_data_file(last)
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        f.write(b"\xa5" * 64)
    capsys.readouterr()
    assert cli.main(["dpo", "--resume"] + args) == 1
    err = capsys.readouterr().err
    assert f"ldjax lm: error: checkpoint {last}: " in err
    assert "fails its checksum" in err or "its state cannot be read" in err  # data or zstd framing
    assert not (out / "dpo").exists()  # stopped before the DPO phase
    assert cli.main(["dpo", "--resume", "--resume-older-checkpoint"] + args) == 0
    err = capsys.readouterr().err
    assert "loaded the OLDER checkpoint" in err and f"{last}.rejected" in err
    s = json.loads((out / "summary.json").read_text())
    assert np.isfinite(s["preference"]["final_loss"])


def test_ctrl_c_on_ldjax_lm_leaves_a_resumable_state(tiny_config, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldjax", "lm", "sft", "--quick", "--config", tiny_config]
    cmd += ["--no-cache", "--out", str(out), "--no-progress"]
    # 0.3 s of sleep per update (no number changes), so that the SIGINT lands mid-phase. The
    # child restores Python's SIGINT handler: a shell without job control starts background jobs
    # with SIGINT ignored, and Python then never raises KeyboardInterrupt (CI run with `&` saw the
    # run finish: exit 0)
    slow = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import time, ldjax.training.loop as L; h = L._host; "
        "L._host = lambda m: (time.sleep(0.3), h(m))[1]"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{slow}; import sys; from ldjax.experiments.cli import main; "
         f"sys.argv = {cmd[2:]!r}; sys.exit(main(sys.argv[1:]))"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        _wait_for_checkpoint(proc, out / "sft" / "ckpt", timeout=180)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("ldjax lm: interrupted") and "Traceback" not in err
    assert not (out / "summary.json").exists()
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["sft"]["steps"] == 6 and s["sft"]["resumed_from"] in (2, 4, 6)


def test_damaged_pretraining_cache_entry_is_named_and_retrained(tiny_config, tmp_path, capsys):
    from ldjax.experiments.lm import cli

    cache = tmp_path / "cache"
    args = ["pretrain", "--quick", "--config", tiny_config, "--cache-dir", str(cache)]
    args += ["--no-progress", "--out"]
    assert cli.main(args + [str(tmp_path / "a")]) == 0
    (entry,) = (cache / "lm_pretrain").iterdir()
    first = json.loads((tmp_path / "a" / "summary.json").read_text())["pretrain"]["final_loss"]
    p = _largest_data_file(entry / "0")
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        f.write(b"\x5a" * 64)
    capsys.readouterr()
    assert cli.main(args + [str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert f"pretraining cache entry {entry} is unusable, training again: checkpoint" in err
    # the bytes hit array data (a checksum) or zstd framing (orbax cannot decompress): both named
    assert "fails its checksum" in err or "its state cannot be read" in err
    s = json.loads((tmp_path / "b" / "summary.json").read_text())["pretrain"]
    assert s["from_cache"] is None and s["final_loss"] == first  # retrained, same numbers
    assert cli.main(args + [str(tmp_path / "c")]) == 0  # the entry was replaced: used again
    s = json.loads((tmp_path / "c" / "summary.json").read_text())["pretrain"]
    assert s["from_cache"] == str(entry)
