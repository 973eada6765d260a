"""Tests of tokenizers, preference-data encoding, JSONL loading, probes and the synthetic set."""

import json
import os

import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ldjax.data.preferences import (
    DEFAULT_SEQ,
    PAPER_SEQ,
    encode_batch,
    encode_example,
    encode_field,
    encode_prompt,
    load_jsonl,
)
from ldjax.data.probes import PROBE_TYPES, build_probes, probe_types, split_held_out
from ldjax.data.synthetic import (
    MAX_CHARS,
    MIN_CHARS,
    TOPICS,
    generate_preferences,
    generate_probe_set,
)
from ldjax.lm.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer

BYTE = ByteTokenizer()

# ------------------------------------------------------------------------------ tokenizers


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("héllo wörld 你好，世界 🙂👍🏽 \u0000\n\t")
@example("")
def test_byte_tokenizer_roundtrip(text):
    ids = BYTE.encode(text)
    assert all(0 <= i < 256 for i in ids)  # no specials from encode
    assert len(ids) == len(text.encode("utf-8"))
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text


def test_byte_tokenizer_specials_and_invalid_utf8():
    assert (BYTE.bos_id, BYTE.eos_id, BYTE.pad_id, BYTE.vocab_size) == (256, 257, 258, 259)
    assert BYTE.decode([0xFF, 65]) == "\ufffdA"  # invalid UTF-8 -> replacement, no error
    assert BYTE.decode(BYTE.encode("€")[:2]) == "\ufffd"  # truncated multi-byte char
    with pytest.raises(ValueError, match="outside"):
        BYTE.decode([259])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [r["chosen"] + r["prompt"] for r in generate_preferences(60)] + ["你好世界 🙂🙂"] * 5
    tok = BPETokenizer.train(texts, vocab_size=600)
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    tok.save(path)
    return tok, path


@settings(max_examples=100, deadline=None)
@given(st.text())
@example("héllo wörld 你好，世界 🙂👍🏽  double  spaces\n\n")
def test_bpe_roundtrip(bpe, text):
    tok, _ = bpe
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


def test_bpe_merges_save_load(bpe):
    tok, path = bpe
    text = " To make pancakes, you will need flour"
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))  # merges learned
    loaded = get_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.vocab_size,
    )
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError):
        get_tokenizer("/no/such/tokenizer.json")


# ------------------------------------------------------------------------------ encoding


def test_encode_example_layout_and_mask():
    prompt, response = "\n\nHuman: Hi?\n\nAssistant:", " Hello there."
    p, r = BYTE.encode(prompt), BYTE.encode(response)
    ex = encode_example(BYTE, prompt, response, max_prompt_len=48, max_len=64)
    n = 1 + len(p) + len(r) + 1
    assert ex["tokens"].shape == ex["targets"].shape == ex["mask"].shape == (64,)
    assert ex["tokens"].dtype == np.int32 and ex["mask"].dtype == bool
    assert ex["tokens"][:n].tolist() == [256] + p + r + [257]
    assert (ex["tokens"][n:] == 258).all()
    assert ex["targets"][:-1].tolist() == ex["tokens"][1:].tolist() and ex["targets"][-1] == 258
    assert ex["mask"].sum() == len(r) + 1
    # the mask marks logit positions whose NEXT token is a response token (EOS included)
    assert ex["targets"][ex["mask"]].tolist() == r + [257]
    assert np.flatnonzero(ex["mask"]).tolist() == list(range(len(p), len(p) + len(r) + 1))


def test_prompt_truncation_keeps_end():
    prompt, response = "ABCDEFGHIJ", "xyz"
    ex = encode_example(BYTE, prompt, response, max_prompt_len=4, max_len=16)
    assert bytes(ex["tokens"][1:5].tolist()) == b"GHIJ"
    assert ex["mask"].sum() == 4
    assert encode_prompt(BYTE, prompt, max_prompt_len=4) == [256] + list(b"GHIJ")


def test_response_truncation_keeps_start_and_eos():
    prompt, response = "PQ", "abcdefghijklmnop"
    ex = encode_example(BYTE, prompt, response, max_prompt_len=4, max_len=10)
    # [BOS] P Q a b c d e f [EOS]: 10 tokens, no padding, 6 response bytes kept + EOS
    assert ex["tokens"].tolist() == [256] + list(b"PQabcdef") + [257]
    assert ex["mask"].sum() == 7
    assert ex["targets"][ex["mask"]].tolist() == list(b"abcdef") + [257]


def test_encode_batch_and_configs():
    assert (DEFAULT_SEQ.max_len, DEFAULT_SEQ.max_prompt_len) == (256, 128)
    assert (PAPER_SEQ.max_len, PAPER_SEQ.max_prompt_len) == (512, 256)
    b = encode_batch(BYTE, ["a", "bb"], ["x", "yyyy"], max_prompt_len=8, max_len=12)
    assert b["tokens"].shape == (2, 12) and b["mask"].sum(1).tolist() == [2, 5]
    recs = [{"prompt": "a", "rejected": "x"}, {"prompt": "bb", "rejected": "yyyy"}]
    f = encode_field(BYTE, recs, "rejected", max_prompt_len=8, max_len=12)
    assert all((f[k] == b[k]).all() for k in b)
    with pytest.raises(ValueError, match="max_prompt_len"):
        encode_example(BYTE, "a", "b", max_prompt_len=10, max_len=11)
    with pytest.raises(ValueError, match="responses"):
        encode_batch(BYTE, ["a"], ["x", "y"])
    with pytest.raises(ValueError, match="'chosen'"):
        encode_field(BYTE, recs, "chosen")


def test_mask_gives_sequence_logprob():
    """sum_t mask[t] log softmax(z_t)[targets[t]] == sum_m log pi(y_m | x, y_<m), the latter
    computed one response token at a time from prefixes."""
    from ldjax.lm.model import LMConfig, init_params, make_apply_fn

    cfg = LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16)
    params = init_params(cfg, jax.random.PRNGKey(0))
    apply_fn = make_apply_fn(cfg)
    ex = encode_example(BYTE, "Hi", "abc", max_prompt_len=4, max_len=16)
    logp = jax.nn.log_softmax(apply_fn(params, ex["tokens"][None])[0])
    masked = float((np.asarray(logp)[np.arange(16), ex["targets"]] * ex["mask"]).sum())
    seq = [256] + list(b"Hi")
    naive = 0.0
    for y in list(b"abc") + [257]:
        padded = np.full((1, 16), 258, np.int32)
        padded[0, : len(seq)] = seq
        lp = jax.nn.log_softmax(apply_fn(params, padded)[0, len(seq) - 1])
        naive += float(lp[y])
        seq.append(y)
    assert masked == pytest.approx(naive, rel=1e-5)


# ------------------------------------------------------------------------------ JSONL


def _write(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


def test_load_jsonl_ok_and_blank_lines(tmp_path):
    path = _write(tmp_path, [GOOD, "", GOOD])
    assert load_jsonl(path) == [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2


def test_load_jsonl_malformed_names_file_and_line(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, '{"prompt": "p", "chosen": '])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:3:" in str(e.value) and "malformed JSON" in str(e.value)


def test_load_jsonl_missing_or_bad_field(tmp_path):
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:2:" in str(e.value) and "'rejected'" in str(e.value)
    path = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"})])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:1:" in str(e.value) and "'chosen'" in str(e.value) and "int" in str(e.value)
    path = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(ValueError, match=":1: expected a JSON object"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError):
        load_jsonl(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def shared_probes():
    root = os.environ.get("LDJAX_DATA")
    if not root:
        pytest.skip("LDJAX_DATA is not set (point it at the shared data folder)")
    path = os.path.join(root, "hh_probe", "formal_prob_train.jsonl")
    assert os.path.exists(path), f"LDJAX_DATA is set but {path} is missing"
    return load_jsonl(path, required=("prompt",) + PROBE_TYPES)


def test_shared_probe_file(shared_probes):
    assert len(shared_probes) == 500
    assert len(PROBE_TYPES) == 13
    assert all(probe_types(r) == list(PROBE_TYPES) for r in shared_probes)
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in shared_probes)
    # build_probes keeps the paper's own probe fields untouched
    built = build_probes(shared_probes, test_records=shared_probes[:5])
    assert all(b == r for b, r in zip(built, shared_probes))


# ------------------------------------------------------------------------------ probes


def _recs(n):
    return [
        {
            "prompt": f"\n\nHuman: q{i}?\n\nAssistant:",
            "chosen": f" answer number {i} is here ok",
            "rejected": f" bad {i}",
            "extra": i,
        }
        for i in range(n)
    ]


def test_build_probes_deterministic_and_well_formed():
    recs = _recs(30)
    a, b = build_probes(recs, seed=1), build_probes(recs, seed=1)
    assert a == b
    assert a != build_probes(recs, seed=2)
    train, test = split_held_out(recs, 3, seed=1)
    assert len(a) == 27 and [r["prompt"] for r in a] == [r["prompt"] for r in train]
    test_chosen = {r["chosen"] for r in test}
    train_chosen = {r["chosen"] for r in train}
    for r in a:
        assert r["extra"] == int(r["prompt"].split("q")[1].split("?")[0])  # extra fields kept
        assert sorted(r["random_permute"].split()) == sorted(r["chosen"].split())
        assert r["irr_train"] in train_chosen and r["irr_train"] != r["chosen"]
        assert r["irr_test"] in test_chosen
        assert sorted(r["random_nonhum"].split()) == sorted(r["irr_test"].split())
        assert probe_types(r) == [
            "chosen",
            "rejected",
            "irr_train",
            "irr_test",
            "random_permute",
            "random_nonhum",
        ]
    # the shuffles really shuffle (7 words: P(identity) = 1/5040 per record)
    assert sum(r["random_permute"] != r["chosen"].strip() for r in a) >= 25


def test_build_probes_with_test_records_and_errors():
    recs, held = _recs(5), _recs(2)
    out = build_probes(recs, test_records=held)
    assert len(out) == 5 and all(r["irr_test"] in {h["chosen"] for h in held} for r in out)
    with pytest.raises(ValueError, match="not both"):
        build_probes(recs, test_records=held, n_test=1)
    with pytest.raises(ValueError, match="'chosen'"):
        build_probes([{"prompt": "x"}, {"prompt": "y"}], test_records=held)
    with pytest.raises(ValueError, match=">= 2"):
        build_probes(_recs(2), n_test=1)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_generator():
    recs = generate_preferences(120, seed=0)
    assert recs == generate_preferences(120, seed=0)  # deterministic
    assert generate_preferences(10, seed=0) == recs[:10]  # record i depends on (seed, i) only
    assert generate_preferences(10, seed=1) != recs[:10]
    assert {r["topic"] for r in recs} == set(TOPICS)
    assert len({r["chosen"] for r in recs}) > 100
    for r in recs:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["chosen"] != r["rejected"]
        for f in ("chosen", "rejected", "chosen_gptsemantic", "reject_gptsemantic", "irr_hum"):
            assert MIN_CHARS <= len(r[f]) <= MAX_CHARS, (f, r[f])
        assert r["chosen_gptsemantic"] != r["chosen"] and r["chosen_gptformat"] != r["chosen"]
        assert probe_types(r) == [
            "chosen",
            "chosen_initial",
            "chosen_gptsemantic",
            "chosen_gptformat",
            "rejected",
            "reject_gptsemantic",
            "reject_gptformat",
            "irr_hum",
        ]
    # arithmetic: chosen states the right result, rejected (style 'wrong') another number
    for r in recs:
        if r["topic"] == "arithmetic" and r["reject_style"] == "wrong":
            expr = r["chosen"].split(" = ")[0].split()[-3:]
            a, op, b = int(expr[0]), expr[1], int(expr[2])
            ans = {"+": a + b, "-": a - b, "×": a * b, "÷": a // b}[op]
            assert f"= {ans}." in r["chosen"] and f"= {ans}." not in r["rejected"]


def test_synthetic_probe_set():
    probes = generate_probe_set(40, seed=0, n_test=4)
    assert len(probes) == 36
    assert all(probe_types(r) == [t for t in PROBE_TYPES if t != "chosen_selfr"] for r in probes)
