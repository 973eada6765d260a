"""The PASS / FAIL / INCONCLUSIVE rule of the claims tables (ldjax.experiments.stats)."""

import numpy as np
import pytest
from scipy import stats as st

from ldjax.experiments.stats import combine_decisions, decide, paired_interval


def _t_interval(x, level=0.95):
    x = np.asarray(x, float)
    h = st.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return x.mean() - h, x.mean() + h


def test_pass_fail_inconclusive_on_constructed_cases():
    rng = np.random.default_rng(0)
    seeds, prompts = 3, 16
    # clear positive effect: every seed and prompt moves up by ~1, noise 0.3
    up = 1.0 + 0.3 * rng.standard_normal((seeds, prompts))
    r = decide(up, +1)
    assert r["status"] == "PASS" and r["lo"] > 0
    assert decide(up, -1)["status"] == "FAIL"
    # the same data claimed the other way round
    assert decide(-up, -1)["status"] == "PASS"
    # seed means of the sign the claim wants, but one seed of the other sign -> the 3-seed
    # interval contains 0 even though the mean is positive (the '1 seed of 3' PASS)
    mixed = np.array([[0.6] * 8, [0.5] * 8, [-0.4] * 8]) + 0.05 * rng.standard_normal((3, 8))
    r = decide(mixed, +1)
    assert r["effect"] > 0 and r["lo"] < 0 < r["hi"]
    assert r["status"] == "INCONCLUSIVE"
    # a 0.1-nat difference of means with a seed spread of ~2.5 (issue 13's example)
    tiny = np.array([-25.6, -23.0, -28.2]) - np.array([-25.7, -24.0, -27.4])
    assert decide(tiny, +1)["status"] == "INCONCLUSIVE"


def test_reduces_to_paired_t_over_seeds_and_over_prompts():
    x = np.array([0.3, 1.1, 0.7, 0.2])
    r = paired_interval(x)  # one number per seed
    lo, hi = _t_interval(x)
    assert r["method"] == "seeds" and r["df"] == 3
    np.testing.assert_allclose([r["lo"], r["hi"]], [lo, hi], rtol=1e-12)
    r = paired_interval(x[None, :])  # one seed, four prompts
    assert r["method"] == "prompts" and r["df"] == 3
    np.testing.assert_allclose([r["lo"], r["hi"]], [lo, hi], rtol=1e-12)
    # a pure seed effect (prompts identical within a seed, tiny residual): the interval is the
    # t-interval of the seed means (df S-1)
    rng = np.random.default_rng(1)
    a = np.array([1.0, 2.5, 0.4])[:, None] + 1e-6 * rng.standard_normal((3, 10))
    r = paired_interval(a)
    lo, hi = _t_interval(a.mean(1))
    assert r["df"] == pytest.approx(2.0, abs=1e-3)
    np.testing.assert_allclose([r["lo"], r["hi"]], [lo, hi], rtol=1e-5)
    # a pure prompt effect: the t-interval of the prompt means (df P-1)
    b = rng.standard_normal(10)[None, :] + 1e-6 * rng.standard_normal((3, 10))
    r = paired_interval(b)
    lo, hi = _t_interval(b.mean(0))
    assert r["df"] == pytest.approx(9.0, abs=1e-3)
    np.testing.assert_allclose([r["lo"], r["hi"]], [lo, hi], rtol=1e-5)


def test_crossed_interval_covers_at_its_level():
    # model d = mu + a_s + b_p + e_sp with all three variance components; the 95 % interval
    # should cover mu in ~95 % of draws (the seed-only or prompt-only t would not)
    rng = np.random.default_rng(2)
    S, P, n = 3, 12, 1500
    hits = 0
    for _ in range(n):
        d = (
            0.5
            + 0.4 * rng.standard_normal((S, 1))
            + 0.6 * rng.standard_normal((1, P))
            + 0.5 * rng.standard_normal((S, P))
        )
        r = paired_interval(d)
        hits += r["lo"] <= 0.5 <= r["hi"]
    cover = hits / n
    assert 0.925 <= cover <= 0.975, cover


def test_edge_cases_and_errors():
    r = decide(2.0, +1)  # one number: no interval
    assert r["status"] == "INCONCLUSIVE" and r["method"] == "none"
    assert decide([1.0, 1.0, 1.0], +1)["status"] == "PASS"  # no spread: the point decides
    assert decide([0.0, 0.0], +1)["status"] == "INCONCLUSIVE"
    # a prompt not measured in every seed is dropped
    d = np.array([[1.0, np.nan, 1.2], [0.9, 2.0, 1.1]])
    assert paired_interval(d)["n_prompts"] == 2
    with pytest.raises(ValueError, match="direction"):
        decide([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="no finite"):
        paired_interval([[np.nan]])
    with pytest.raises(ValueError, match="shape"):
        paired_interval(np.zeros((2, 2, 2)))
    assert combine_decisions(["PASS", "PASS"]) == "PASS"
    assert combine_decisions(["PASS", "INCONCLUSIVE"]) == "INCONCLUSIVE"
    assert combine_decisions(["INCONCLUSIVE", "FAIL"]) == "FAIL"
    with pytest.raises(ValueError, match="unknown"):
        combine_decisions(["MAYBE"])
