"""What every ``ldjax`` command does with bad flags, an unusable output folder, a failure and
Ctrl-C: usage errors (exit 2, no traceback) before any work, results only through a staging
folder, one line and exit 130 on Ctrl-C."""

from __future__ import annotations

import json

import pytest

from ldjax.experiments import cli, common
from ldjax.experiments.lm import cli as lm_cli
from ldjax.experiments.mnist import cli as mnist_cli
from ldjax.experiments.reproduce import cli as reproduce_cli
from ldjax.experiments.squeeze import cli as squeeze_cli

BAD_NUMBERS = [
    ("mnist", "--epochs", "0"),
    ("mnist", "--n-train", "0"),
    ("mnist", "--lr", "0"),
    ("mnist", "--lr", "nan"),
    ("mnist", "--seed", "-1"),
    ("mnist", "--probes-per-class", "0"),
    ("mnist", "--kernel-per-class", "0"),
    ("mnist", "--checkpoints", "-1"),
    ("mnist", "--compare-every", "0"),
    ("lm sft", "--index", "-1"),
    ("lm sft", "--seed", "-1"),
    ("lm sft", "--seed", "1.5"),
    ("squeeze", "--draws", "2"),
    ("squeeze", "--seed", "-1"),
    ("squeeze", "--ref-seed", "-1"),
    ("squeeze", "--sweeps", "0"),
    ("squeeze", "--index", "-1"),
    ("squeeze", "--lm-heads", "0"),
    ("squeeze", "--lm-pretrain-steps", "0"),
    ("squeeze", "--lm-eta", "-1"),
    ("squeeze", "--lm-eta-target", "0"),
    ("squeeze", "--lm-eta-sweep", "1,-2"),
    ("squeeze", "--lm-beta", "inf"),
    ("squeeze", "--lm-max-len", "0"),
    ("squeeze", "--lm-max-prompt-len", "0"),
    ("reproduce lm", "--seeds", "0"),
    ("reproduce lm", "--long-sft", "1"),
]


@pytest.mark.parametrize("command, flag, value", BAD_NUMBERS)
def test_numeric_flags_are_range_checked_by_the_parser(command, flag, value, capsys):
    rc = cli.main(command.split() + [flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: argument {flag}" in err and repr(value) in err
    assert "Traceback" not in err


def test_resume_older_needs_resume(tmp_path, capsys):
    rc = lm_cli.main(["sft", "--quick", "--resume-older-checkpoint", "--out", str(tmp_path)])
    assert rc == 2 and "--resume-older-checkpoint needs --resume" in capsys.readouterr().err


def _boom(*a, **k):
    raise AssertionError("work started before the output folder was checked")


@pytest.fixture
def blocked(tmp_path):
    """A path that cannot be made a folder: its parent is a file (root can write anywhere, so a
    read-only folder would not stop the tests' root user)."""
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file" / "out")


@pytest.mark.parametrize(
    "argv, module, work, flag",
    [
        (["mnist", "--out", "{b}"], mnist_cli, "train", "--out"),
        (["mnist", "--out", "{t}", "--figures-dir", "{b}"], mnist_cli, "train", "--figures-dir"),
        (["lm", "sft", "--quick", "--out", "{b}"], lm_cli, "load_records", "--out"),
        (
            ["lm", "sft", "--quick", "--out", "{t}", "--cache-dir", "{b}"],
            lm_cli,
            "load_records",
            "--cache-dir",
        ),
        (["squeeze", "--quick", "--out", "{b}"], squeeze_cli, "run_toy", "--out"),
        (
            ["squeeze", "--quick", "--out", "{t}", "--figures-dir", "{b}"],
            squeeze_cli,
            "run_toy",
            "--figures-dir",
        ),
        (["reproduce", "lm", "--quick", "--out", "{b}"], reproduce_cli, "load_records", "--out"),
        (
            ["reproduce", "lm", "--quick", "--out", "{t}", "--cache-dir", "{b}"],
            reproduce_cli,
            "load_records",
            "--cache-dir",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("--") else None,
)
def test_unusable_output_folders_fail_before_any_work(
    argv, module, work, flag, blocked, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(module, work, _boom)
    argv = [a.format(b=blocked, t=tmp_path / "ok") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} {blocked}: cannot write there" in err and "Traceback" not in err


def _interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "argv, module, work",
    [
        (["mnist", "--quick"], mnist_cli, "load_default"),
        (["lm", "sft", "--quick", "--no-cache"], lm_cli, "run_pipeline"),
        (["squeeze", "--quick"], squeeze_cli, "run_toy"),
        (["reproduce", "lm", "--quick", "--synthetic", "--no-cache"], reproduce_cli, "run_seed"),
    ],
    ids=["mnist", "lm", "squeeze", "reproduce"],
)
def test_ctrl_c_is_one_line_exit_130_and_keeps_previous_results(
    argv, module, work, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"previous": true}')
    monkeypatch.setattr(module, work, _interrupt)
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"ldjax {argv[0]}: interrupted") and str(out) in err[0]
    )
    assert json.loads((out / "summary.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no staging folder left


@pytest.mark.parametrize("exc", [ValueError("failed"), KeyboardInterrupt()], ids=repr)
def test_staged_output_failure_keeps_previous_results(tmp_path, exc):
    out = tmp_path / "out"
    common.write_json(out / "summary.json", {"run": 1})
    common.write_text(out / "figures" / "a.txt", "old")
    with pytest.raises(type(exc)), common.staged_output(out) as stage:
        common.write_json(stage / "summary.json", {"run": 2})
        common.write_text(stage / "figures" / "a.txt", "new")
        raise exc
    assert json.loads((out / "summary.json").read_text()) == {"run": 1}
    assert (out / "figures" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "summary.json"]
    with common.staged_output(out) as stage:
        common.write_json(stage / "summary.json", {"run": 3})
    assert json.loads((out / "summary.json").read_text()) == {"run": 3}
    assert (out / "figures" / "a.txt").read_text() == "old"  # files not rewritten are kept
    assert sorted(p.name for p in out.iterdir()) == ["figures", "summary.json"]


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    p = tmp_path / "x.txt"
    common.write_text(p, "old")
    with pytest.raises(RuntimeError), common.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["x.txt"]


def test_check_writable_leaves_nothing_behind(tmp_path, blocked):
    assert common.check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # no folder made, no probe left
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file'}: exists and is not a folder"):
        common.check_writable(tmp_path / "file")
    with pytest.raises(ValueError, match=r"--cache-dir .*: cannot write there \(.*file is not a"):
        common.check_writable(blocked, "--cache-dir")
