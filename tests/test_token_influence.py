"""Token maps: C[o, u, m, l] sums over u and l to decompose's per-token prediction (float64, 1e-10),
one map per DPO branch, causal, and a training response that repeats a probe's phrase puts each
phrase token's largest entry on the matching training position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import precision, rel, small_model

import ldjax
from ldjax import losses
from ldjax.data.preferences import encode_example
from ldjax.lm.model import LMConfig, init_params, make_apply_fn
from ldjax.lm.tokenizer import ByteTokenizer


def _at_targets(delta, y, m):
    return np.take_along_axis(np.asarray(delta), np.asarray(y)[..., None], -1)[..., 0] * np.asarray(
        m
    )


@pytest.mark.slow  # ~17 s of float64 compiles
def test_maps_sum_to_the_decomposition_per_branch():
    with precision("float64"):
        f, p, x_o, x_u = small_model("transformer", "float64")
        n, t = x_u.shape
        rng = np.random.default_rng(0)
        y_u, m_u = jnp.asarray(rng.integers(0, 13, (n, t))), jnp.asarray(rng.random((n, t)) > 0.3)
        y_o, m_o = jnp.asarray(rng.integers(0, 13, (2, t))), jnp.asarray(rng.random((2, t)) > 0.2)
        kw = dict(targets=y_u, mask=m_u)
        C = ldjax.token_influence(
            f,
            p,
            x_o,
            x_u,
            losses.sft,
            eta=1e-3,
            targets_o=y_o,
            mask_o=m_o,
            loss_kwargs=kw,
            chunk_size=1,
        )
        d = ldjax.decompose(f, p, x_o, x_u, losses.sft, eta=1e-3, loss_kwargs=kw)
        assert C.shape == (2, n, t, t)
        assert rel(C.sum(axis=(1, 3)), _at_targets(d.delta_logp_linear, y_o, m_o)) < 1e-10
        assert float(jnp.abs(C * ~m_u[None, :, None, :]).max()) == 0.0  # untrained positions: 0
        x_neg = jnp.asarray(rng.integers(0, 13, (n, t)))
        kw = dict(
            targets_pos=y_u,
            targets_neg=y_u[::-1],
            mask_pos=m_u,
            mask_neg=m_u[::-1],
            ref_logp_pos=jnp.zeros(n),
            ref_logp_neg=jnp.zeros(n),
            beta=0.1,
        )
        maps = ldjax.token_influence(
            f, p, x_o, (x_u, x_neg), losses.dpo, eta=1e-3, targets_o=y_o, mask_o=m_o, loss_kwargs=kw
        )
        d = ldjax.decompose(f, p, x_o, (x_u, x_neg), losses.dpo, eta=1e-3, loss_kwargs=kw)
        assert isinstance(maps, tuple) and len(maps) == 2
        for c, term in zip(maps, d.delta_logp_linear_terms):
            assert rel(c.sum(axis=(1, 3)), _at_targets(term, y_o, m_o)) < 1e-10


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_a_repeated_phrase_puts_its_largest_entries_on_the_matching_positions():
    tok = ByteTokenizer()
    cfg = LMConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=96)
    p = init_params(cfg, jax.random.PRNGKey(0))
    f = make_apply_fn(cfg)
    phrase = " the quick brown fox jumps over"
    enc = lambda prompt, resp: encode_example(tok, prompt, resp, max_len=96, max_prompt_len=40)
    o = enc("Human: tell me a story.\n\nAssistant:", phrase + " and more")
    u = enc("Human: what now?\n\nAssistant:", " well, I think" + phrase + " the lazy dog")
    ctrl = enc("Human: what now?\n\nAssistant:", " well, I think we could all go to the lake")
    arr = lambda e, k: jnp.asarray(e[k][None])

    def positions(e):
        ids, t = tok.encode(phrase), list(e["targets"])
        return next(np.arange(s, s + len(ids)) for s in range(len(t)) if t[s : s + len(ids)] == ids)

    def cmap(train):
        return np.asarray(
            ldjax.token_influence(
                f,
                p,
                arr(o, "tokens"),
                arr(train, "tokens"),
                losses.sft,
                eta=1e-3,
                targets_o=arr(o, "targets"),
                mask_o=arr(o, "mask"),
                loss_kwargs=dict(targets=arr(train, "targets"), mask=arr(train, "mask")),
            )
        )[0, 0]

    po, pu = positions(o), positions(u)
    c = cmap(u)
    best = np.argmax(c[po], axis=1)
    assert np.mean(best == pu) >= 0.8  # measured 0.94 at this init
    # the matching positions push more than the strongest position of a response without the
    # phrase (measured 2.91 against 1.90 at this init)
    own = c[po, pu].sum()
    assert own > 1.3 * np.abs(cmap(ctrl)[po]).max(axis=1).sum()


def test_errors_name_the_argument():
    f, p, x_o, x_u = small_model("mlp", "float32")
    with pytest.raises(ValueError, match="sequence logits"):
        ldjax.token_influence(
            f,
            p,
            x_o,
            x_u,
            losses.sft,
            eta=0.1,
            targets_o=jnp.zeros(3, int),
            loss_kwargs=dict(targets=jnp.zeros(2, int)),
        )
    tf, tp, to, tu = small_model("transformer", "float32")
    with pytest.raises(ValueError, match="targets_o"):
        ldjax.token_influence(
            tf,
            tp,
            to,
            tu,
            losses.sft,
            eta=0.1,
            targets_o=jnp.zeros((2, 3), int),
            loss_kwargs=dict(targets=tu),
        )
