"""Every data-file error names the file (and the line, where a file has lines): JSON-lines
preference files, IDX files, JSON configs, the probe tracking of an interrupted run."""

from __future__ import annotations

import json

import pytest

from ldjax.data.mnist import read_idx
from ldjax.data.preferences import load_jsonl
from ldjax.experiments.lm.tracking import ProbeTracker
from ldjax.mnist.train import TrainConfig

GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


def _write(tmp_path, data: bytes, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "data, what",
    [
        (b"", r"{p}: no records \(the file is empty"),
        (b"\n  \n", r"{p}: no records"),
        (
            (GOOD + "\n" + json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})).encode(),
            r"{p}:2: field 'chosen' is an empty string",
        ),
        (
            (
                GOOD + "\n" + '{"prompt": "p", "chosen": "a", "chosen": "b", "rejected": "r"}'
            ).encode(),
            r"{p}:2: duplicate key 'chosen' in one JSON object",
        ),
        (
            b'{"prompt": "p", "chosen": "c", "rejected": "r", "x": {"k": 1, "k": 2}}',
            r"{p}:1: duplicate key 'k'",
        ),
        (
            (GOOD + "\n").encode() + '{"prompt": "caf\u00e9"}'.encode("latin-1"),
            r"{p}:2: not UTF-8 text \(byte 0xe9 at byte 16 of the line\)",
        ),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", r"{p}:1: not UTF-8 text"),
        (b'{"prompt": "p\x00", "chosen": "c", "rejected": "r"}', r"{p}:1: malformed JSON"),
    ],
    ids=[
        "empty",
        "blank",
        "empty_string",
        "duplicate_key",
        "nested_duplicate",
        "latin1",
        "binary",
        "nul",
    ],
)
def test_load_jsonl_bad_files_name_file_and_line(tmp_path, data, what):
    p = _write(tmp_path, data)
    with pytest.raises(ValueError, match=what.format(p=p)):
        load_jsonl(p)


def test_load_jsonl_accepts_whitespace_and_optional_empty_fields(tmp_path):
    """``" "`` is a response (one token: the paper's probe file has one) and fields outside
    ``nonempty`` may be empty (its ``chosen_initial`` is empty in 21 records)."""
    rec = {"prompt": "p", "chosen": " ", "rejected": "r", "chosen_initial": ""}
    p = _write(tmp_path, (json.dumps(rec) + "\n").encode())
    assert load_jsonl(p, required=("prompt", "chosen", "rejected", "chosen_initial")) == [rec]


def test_load_jsonl_folder_names_it(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: is a folder, not a JSON-lines file"):
        load_jsonl(tmp_path)


def test_read_idx_folder_names_it(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: is a folder, not an IDX file"):
        read_idx(tmp_path)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: is a folder"):
        TrainConfig.load(tmp_path)
    p = _write(tmp_path, b"\xff\xfe{", "c.json")
    with pytest.raises(ValueError, match=f"{p}: not valid JSON"):
        TrainConfig.load(p)
    p = _write(tmp_path, b'{"epochs": 2,\n "lr": }', "c2.json")
    with pytest.raises(ValueError, match=rf"{p}: not valid JSON: .*line 2 column 8"):
        TrainConfig.load(p)


def test_damaged_probe_tracking_names_the_file(tmp_path):
    """The tracking file that ``--resume`` reads back (written atomically, but a disk can still
    damage it)."""
    p = _write(tmp_path, b"PK\x03\x04 truncated", "probes.npz")
    tracker = ProbeTracker.__new__(ProbeTracker)  # load() reads only the file
    with pytest.raises(ValueError, match=f"{p}: the probe tracking of an interrupted run"):
        tracker.load(p)
