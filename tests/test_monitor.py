"""The live squeezing monitor (ldjax.training.monitor): its numbers against the engine's
decomposition, the flag on constructed DPO and SFT runs, and its place in the training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldjax
from ldjax.training import train_loop
from ldjax.training.monitor import STATS, SqueezeMonitor, StepSpec

V, D, T = 12, 5, 3


def _mlp(p, x):  # (N, T, D) -> (N, T, V), nonlinear: K is not the identity
    return jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]


def _params(key, peak=0.0):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (D, 8)) / np.sqrt(D),
        "w2": jax.random.normal(k2, (8, V)) / np.sqrt(8),
        "b": jnp.zeros(V).at[V - 1].set(peak),
    }


def _dpo_batch(key, n=4, same_context=False):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    pos = jax.random.normal(k1, (n, T, D))
    return {
        "pos": pos,
        "neg": pos if same_context else jax.random.normal(k2, (n, T, D)),
        "tpos": jax.random.randint(k3, (n, T), 0, V - 1),
        "tneg": jax.random.randint(k4, (n, T), 0, V - 1),  # never the peak token V-1
        "m": jnp.ones((n, T)).at[:, 0].set(0.0),
    }


def _dpo_kwargs(b, p=None):
    n = b["pos"].shape[0]
    return dict(
        targets_pos=b["tpos"],
        targets_neg=b["tneg"],
        mask_pos=b["m"],
        mask_neg=b["m"],
        ref_logp_pos=jnp.full(n, -5.0),
        ref_logp_neg=jnp.full(n, -5.0),
        beta=0.5,
    )


DPO = StepSpec(
    ldjax.losses.dpo,
    lambda b: (b["pos"], b["neg"]),
    _dpo_kwargs,
    negative=(1,),
    negative_tokens=lambda b: (b["tneg"], b["m"]),
)
SFT = StepSpec(
    ldjax.losses.sft, lambda b: b["pos"], lambda b, p: {"targets": b["tpos"], "mask": b["m"]}
)


def _probes(key, n=3):
    return {"tokens": jax.random.normal(key, (n, T, D)), "mask": jnp.ones((n, T))}


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_numbers_match_the_decomposition():
    key = jax.random.PRNGKey(0)
    params, batch, probes = _params(key, 2.0), _dpo_batch(key), _probes(jax.random.PRNGKey(1))
    eta = 0.05
    mon = SqueezeMonitor(_mlp, probes, DPO, eta=eta)
    r = mon.measure(params, batch, eta)
    d = ldjax.decompose(
        _mlp,
        params,
        probes["tokens"],
        (batch["pos"], batch["neg"]),
        ldjax.losses.dpo,
        eta=eta,
        loss_kwargs=_dpo_kwargs(batch),
    )
    z = np.asarray(d.logits, np.float64)
    pi = np.exp(z - z.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    star = z.argmax(-1)
    dneg = np.asarray(ldjax.apply_A(d.logits, d.delta_logits_terms[1]), np.float64)
    dall = np.asarray(d.delta_logp_linear, np.float64)
    at = lambda a: np.take_along_axis(a, star[..., None], -1)[..., 0]
    to_star = at(pi) * at(dneg)
    moved = 0.5 * np.abs(pi * dneg).sum(-1)
    np.testing.assert_allclose(r["mass_to_argmax"], to_star.mean(), rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(r["argmax_share"], to_star.sum() / moved.sum(), rtol=2e-4)
    np.testing.assert_allclose(r["d_argmax_path"], at(dall).sum(-1).mean(), rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(r["d_argmax_path_neg"], at(dneg).sum(-1).mean(), rtol=2e-4)
    np.testing.assert_allclose(r["A_norm"], np.asarray(ldjax.A_norm(d.logits)).mean(), rtol=1e-5)
    zn = np.asarray(_mlp(params, batch["neg"]))
    peak = ((zn.argmax(-1) == np.asarray(batch["tneg"])) * np.asarray(batch["m"])).sum()
    assert r["neg_is_peak"] == pytest.approx(peak / np.asarray(batch["m"]).sum())
    assert set(r) == set(STATS)


def test_closed_form_when_K_is_the_identity():
    # z = x W with x = 1: K = I, G⁻ = c (e_{y⁻} − π), so Δlog π_v ∝ π_v − ‖π‖² + π_{y⁻} − [v=y⁻]
    f = lambda p, x: (x @ p["w"])[:, None, :]
    x = jnp.ones((1, 1))
    w = jnp.array([[0.3, -0.2, 0.0, 0.1, 1.5, 0.4]])
    kw = dict(
        targets_pos=jnp.array([[1]]),
        targets_neg=jnp.array([[0]]),
        beta=1.0,
        ref_logp_pos=jnp.zeros(1),
        ref_logp_neg=jnp.zeros(1),
    )
    spec = StepSpec(ldjax.losses.dpo, lambda b: (x, x), lambda b, p: kw, negative=(1,))
    mon = SqueezeMonitor(f, {"tokens": x, "mask": jnp.ones((1, 1))}, spec, eta=0.01)
    r = mon.measure({"w": w}, None, 0.01)
    z = np.asarray(w[0], np.float64)
    pi = np.exp(z) / np.exp(z).sum()
    lp = np.log(pi)
    c = 1.0 / (1.0 + np.exp(lp[1] - lp[0]))  # β σ(−β (log π⁺ − log π⁻)), refs 0
    dlog = 0.01 * c * (pi - pi @ pi + pi[0] - (np.arange(6) == 0))
    dpi = pi * dlog
    assert r["mass_to_argmax"] == pytest.approx(dpi[4], rel=1e-4)
    assert r["argmax_share"] == pytest.approx(dpi[4] / (0.5 * np.abs(dpi).sum()), rel=1e-4)


_STEPS: dict = {}


def _loop(spec, params, steps, every=2, lr=0.05):
    """A DPO or SFT run on the one training loop with the monitor as a callback: the pairs share
    their context (y⁺ and y⁻ after the same prompt: x⁺ = x⁻), the probes are the y⁺ inputs."""
    batch = _dpo_batch(jax.random.PRNGKey(3), same_context=True)
    loss_fn, tx = spec.loss_fn, optax.sgd(lr)

    def step(p, o, b, s):
        def obj(p):
            xs = spec.inputs(b)
            xs = xs if isinstance(xs, tuple) else (xs,)
            return jnp.sum(loss_fn(*(_mlp(p, x) for x in xs), **spec.kwargs(b, p)))

        loss, g = jax.value_and_grad(obj)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, {"loss": loss, "lr": jnp.float32(lr)}

    step = _STEPS.setdefault((id(spec), lr), jax.jit(step))  # one compile per spec

    probes = {"tokens": batch["pos"], "mask": batch["m"]}
    mon = SqueezeMonitor(_mlp, probes, spec, every=every)
    r = train_loop(
        step,
        params,
        tx.init(params),
        lambda s, p: batch,
        total_steps=steps,
        callbacks=[mon],
        progress=False,
    )
    return mon, r


@pytest.mark.slow  # > 4 s on 2 quiet cores: the fast tier stays under 3 min
def test_fires_on_off_policy_dpo_and_stays_quiet_on_sft():
    peaky = _params(jax.random.PRNGKey(0), peak=4.0)  # π peaks on token V-1; y⁻ never is it
    flat = jax.tree_util.tree_map(lambda a: 0.05 * a, _params(jax.random.PRNGKey(0)))
    mon, r = _loop(DPO, peaky, 6)
    peaky_records = mon.records
    shares = [x["argmax_share"] for x in mon.records]
    assert mon.fired() == [1, 2, 4, 6] and min(shares) > 0.9, shares
    assert all(x["neg_is_peak"] == 0.0 for x in mon.records)
    assert all(x["mass_to_argmax"] > 0 and x["d_argmax_path_neg"] > 0 for x in mon.records)
    # as a hook the whole step's Δ y* comes from the loop's actual update; for SGD at the same
    # rate it is the SGD prediction of the decomposition
    batch = _dpo_batch(jax.random.PRNGKey(3), same_context=True)
    sgd = mon.measure(peaky, batch, 0.05)
    assert mon.records[0]["d_argmax_path"] == pytest.approx(sgd["d_argmax_path"], rel=1e-3)
    assert mon.records[0]["argmax_share"] == pytest.approx(sgd["argmax_share"], rel=1e-5)
    # the run's history: one entry per update, NaN where the monitor did not measure
    h = r.history["squeeze/argmax_share"]
    assert len(h) == len(r.history["step"]) == 6
    assert np.isnan(h[2]) and h[1] == pytest.approx(shares[1])
    got = SqueezeMonitor.from_history(r.history)
    assert got["step"].tolist() == [1, 2, 4, 6] and got["squeezing"].tolist() == [1.0] * 4
    # the same DPO from a flat π: the mass spreads over the vocabulary, no flag
    mon, _ = _loop(DPO, flat, 4)
    assert mon.fired() == [] and max(x["argmax_share"] for x in mon.records) < 0.5
    assert max(x["A_norm"] for x in mon.records) < 3.4 < min(x["A_norm"] for x in peaky_records)
    # SFT from the peaky model: no negative term, nothing moves onto the argmax by it
    mon, r = _loop(SFT, peaky, 4)
    assert mon.fired() == [] and len(mon.records) == 3
    for x in mon.records:
        assert x["mass_to_argmax"] == 0.0 and x["argmax_share"] == 0.0
        assert x["d_argmax_path"] != 0.0  # the step itself does move the probes
        assert np.isnan(x["neg_is_peak"])


def test_bad_arguments_are_named():
    p = _probes(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="threshold"):
        SqueezeMonitor(_mlp, p, DPO, threshold=1.5)
    with pytest.raises(ValueError, match="every"):
        SqueezeMonitor(_mlp, p, DPO, every=0)
    with pytest.raises(ValueError, match="mask"):
        SqueezeMonitor(_mlp, {"tokens": p["tokens"]}, DPO)
    with pytest.raises(ValueError, match="StepSpec"):
        SqueezeMonitor(_mlp, p, "dpo")
    mon = SqueezeMonitor(_mlp, p, DPO)
    with pytest.raises(ValueError, match="no 'lr'"):
        mon(0, _params(jax.random.PRNGKey(0)), _dpo_batch(jax.random.PRNGKey(0)), None, {})
    with pytest.raises(ValueError, match="no monitor|no 'squeeze"):
        SqueezeMonitor.from_history({"step": [1]})


def test_config_fields_of_the_monitor_and_the_tokenizer_are_checked():
    from ldjax.lm.config import BPE, DEFAULT, TrackConfig

    assert DEFAULT.track.monitor_every == 0 and DEFAULT.lm_config().vocab_size == 259
    assert BPE.data.tokenizer == "bpe" and BPE.lm_config().vocab_size == 1024
    with pytest.raises(ValueError, match="monitor_every"):
        TrackConfig(monitor_every=-1)
    with pytest.raises(ValueError, match="monitor_threshold"):
        TrackConfig(monitor_threshold=1.0)
    with pytest.raises(ValueError, match="monitor_on"):
        TrackConfig(monitor_on="all")
    with pytest.raises(ValueError, match="data.tokenizer"):
        DEFAULT.replace(data={"tokenizer": "wordpiece"})
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        DEFAULT.replace(data={"bpe_vocab_size": 100})


@pytest.mark.slow
def test_ldjax_lm_dpo_with_the_monitor_logs_and_plots(tmp_path):
    import json

    from ldjax.experiments.lm.cli import main

    tiny = {
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
        "data": {"max_len": 64, "max_prompt_len": 32, "n_records": 24, "n_heldout": 4},
        "pretrain": {"steps": 4, "batch_size": 4, "warmup": 1},
        "sft": {"steps": 6, "epochs": 0.0, "batch_size": 4, "warmup": 1, "eval_every": 3},
        "preference": {"steps": 6, "epochs": 0.0, "batch_size": 4, "warmup": 1, "eval_every": 3},
        "track": {"eval_batch": 32, "decode_max_new_tokens": 8},
    }
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny))
    out = tmp_path / "out"
    args = ["dpo", "--quick", "--config", str(cfg), "--squeeze-monitor", "2", "--out", str(out)]
    assert main([*args, "--no-cache", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for phase in ("sft", "preference"):
        m = s[phase]["squeeze_monitor"]
        # warm-up step 1 has lr 0: the first measurement moves to step 2; then every 2 steps
        assert m["steps_measured"] == [2, 4, 6], m
        assert all(np.isfinite(m["A_norm"])) and len(m["argmax_share"]) == 3
    assert s["sft"]["squeeze_monitor"]["argmax_share"] == [0.0, 0.0, 0.0]  # no negative term
    assert (out / "figures" / "lm_dpo_squeeze.png").exists()
    assert (out / "figures" / "lm_sft_squeeze.png").exists()
    h = json.loads((out / "dpo" / "history.json").read_text())
    assert len(h["squeeze/argmax_share"]) == len(h["step"]) == 6
