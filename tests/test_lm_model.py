"""Tests of the small transformer LM (ldjax.lm.model) and KV-cache decoding (ldjax.lm.decode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldjax.lm.decode import generate, left_pad, naive_greedy_decode
from ldjax.lm.model import LMConfig, TransformerLM, count_params, init_params, make_apply_fn

# One tiny config and few distinct shapes: every compiled program is reused across tests
# (forward on (4, 32), (1, 32), (3, 32)+positions; generate greedy; generate sampling).
CFG = LMConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=32)
NEW = 8  # one max_new_tokens everywhere
apply_fn = make_apply_fn(CFG)


@pytest.fixture(scope="module")
def params2():
    return init_params(CFG, jax.random.PRNGKey(1))


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.int32)


def test_shapes_and_dense_structure(params2):
    x = _tokens((4, 32))
    assert apply_fn(params2, x).shape == (4, 32, CFG.vocab_size)
    assert apply_fn(params2, x[0]).shape == (32, CFG.vocab_size)
    np.testing.assert_allclose(apply_fn(params2, x[0]), apply_fn(params2, x)[0], atol=1e-5)
    for b in ("block_0", "block_1"):
        attn = params2[b]["attn"]
        for name in ("query", "key", "value", "out"):
            assert attn[name]["kernel"].shape == (16, 16)
    assert params2["lm_head"]["kernel"].shape == (16, 259)  # untied from tok_embed
    assert params2["tok_embed"]["embedding"].shape == (259, 16)
    assert params2["pos_embed"]["embedding"].shape == (32, 16)
    # same tree as flax's own init, declared distributions (one pooled draw, see init_params)
    ref = jax.eval_shape(
        lambda k: TransformerLM(CFG).init(k, jnp.zeros((1, 4), jnp.int32))["params"],
        jax.random.PRNGKey(0),
    )
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(params2)
    assert float(jnp.abs(params2["block_1"]["mlp"]["fc_in"]["bias"]).max()) == 0.0
    assert float(jnp.abs(params2["ln_f"]["scale"] - 1).max()) == 0.0
    emb = np.asarray(params2["tok_embed"]["embedding"])
    assert abs(emb.std() - CFG.init_std) < 0.1 * CFG.init_std  # 4144 draws: std error ~1%
    assert (
        np.asarray(params2["block_0"]["attn"]["out"]["kernel"]).std() < 0.7 * CFG.init_std
    )  # / sqrt(4)
    block = 4 * (16 * 16 + 16) + 2 * 2 * 16 + (16 * 32 + 32) + (32 * 16 + 16)
    assert count_params(params2) == 259 * 16 + 32 * 16 + 2 * block + 2 * 16 + 16 * 259 + 259


def test_bad_inputs(params2):
    with pytest.raises(ValueError, match="max_len"):
        apply_fn(params2, _tokens((1, 33)))
    with pytest.raises(ValueError, match="integer"):
        apply_fn(params2, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="positions shape"):
        apply_fn(params2, _tokens((1, 4)), jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=10, n_heads=3)


def test_causality_exact(params2):
    """Changing token t never changes the logits at positions < t, bit for bit (this also
    shows that right padding is harmless)."""
    x = _tokens((4, 32), seed=3)
    base = np.asarray(apply_fn(params2, x))
    for t in (1, 7, 20, 31):
        y = x.copy()
        y[:, t:] = (y[:, t:] + 17) % 256
        out = np.asarray(apply_fn(params2, y))
        assert np.array_equal(out[:, :t], base[:, :t]), f"position < {t} changed"
        assert not np.allclose(out[:, t], base[:, t])  # the changed position itself does change


def test_left_padding_with_positions_matches_unpadded(params2):
    prompts = [list(_tokens((n,), seed=n)) for n in (1, 11, 32)]
    tok, pos = left_pad(prompts, pad_id=258, width=32)
    left = np.asarray(apply_fn(params2, tok, pos))
    # reference: each prompt at the start of the row (right padding, harmless by causality)
    right = np.full((3, 32), 258, np.int32)
    for i, p in enumerate(prompts):
        right[i, : len(p)] = p
    ref = np.asarray(
        apply_fn(params2, right, np.broadcast_to(np.arange(32, dtype=np.int32), (3, 32)))
    )
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(left[i, 32 - len(p) :], ref[i, : len(p)], atol=1e-5, rtol=1e-5)
    # a padded key really is masked: changing a padding token changes nothing
    tok2 = tok.copy()
    tok2[0, :5] = 7
    assert np.array_equal(np.asarray(apply_fn(params2, tok2, pos))[0, -1], left[0, -1])


@pytest.fixture(scope="module")
def prompts():
    return [list(map(int, _tokens((n,), seed=10 + n))) for n in (1, 4, 9, 16)]


def test_kv_cache_greedy_equals_naive(params2, prompts):
    out = generate(params2, CFG, prompts, NEW, eos_id=None)
    for p, o in zip(prompts, out):
        assert len(o) == NEW
        assert o == naive_greedy_decode(params2, CFG, p, NEW, eos_id=None)


def test_eos_stops_each_row_at_its_first_eos(params2, prompts):
    full = generate(params2, CFG, prompts, NEW, eos_id=None)
    eos = full[0][3]  # a token greedy decoding does emit
    cut = generate(params2, CFG, prompts, NEW, eos_id=eos)
    with_eos = generate(params2, CFG, prompts, NEW, eos_id=eos, include_eos=True)
    for f, c, w in zip(full, cut, with_eos):
        expect = f[: f.index(eos)] if eos in f else f
        assert c == expect
        assert w == (expect + [eos] if eos in f else f)
    assert len(cut[0]) <= 3


def test_array_prompts_with_lengths(params2, prompts):
    ref = generate(params2, CFG, prompts, NEW, eos_id=None)
    width = max(map(len, prompts))
    right = np.full((len(prompts), width), 258, np.int32)
    left = np.full((len(prompts), width), 258, np.int32)
    for i, p in enumerate(prompts):
        right[i, : len(p)] = p
        left[i, width - len(p) :] = p
    lengths = [len(p) for p in prompts]
    assert generate(params2, CFG, right, NEW, lengths=lengths, eos_id=None) == ref
    assert (
        generate(params2, CFG, left, NEW, lengths=lengths, padding_side="left", eos_id=None) == ref
    )


def test_sampling(params2, prompts):
    greedy = generate(params2, CFG, prompts, NEW, eos_id=None)
    k1 = generate(
        params2, CFG, prompts, NEW, temperature=1.0, top_k=1, key=jax.random.PRNGKey(3), eos_id=None
    )
    assert k1 == greedy  # top-1 sampling is greedy
    a = generate(
        params2, CFG, prompts, NEW, temperature=5.0, key=jax.random.PRNGKey(4), eos_id=None
    )
    b = generate(
        params2, CFG, prompts, NEW, temperature=5.0, key=jax.random.PRNGKey(4), eos_id=None
    )
    c = generate(
        params2, CFG, prompts, NEW, temperature=5.0, key=jax.random.PRNGKey(5), eos_id=None
    )
    assert a == b and a != c
    with pytest.raises(ValueError, match="key"):
        generate(params2, CFG, prompts, NEW, temperature=1.0)


def test_generate_errors(params2, prompts):
    with pytest.raises(ValueError, match="max_len"):
        generate(params2, CFG, prompts, 20)  # 16 + 20 > 32
    with pytest.raises(ValueError, match="empty prompt"):
        generate(params2, CFG, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="outside"):
        generate(params2, CFG, [[1, 999]], 3)
