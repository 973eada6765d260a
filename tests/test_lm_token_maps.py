"""LM token maps (``ldjax lm one-step --token-maps K``) against the one-step prediction."""

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from ldjax.data.probes import build_probes
from ldjax.data.synthetic import generate_preferences
from ldjax.experiments.lm.one_step import run_one_step
from ldjax.experiments.lm.token_maps import run_token_maps, token_map_figures
from ldjax.lm.config import DataConfig, ModelConfig, PipelineConfig
from ldjax.lm.model import init_params

pytestmark = pytest.mark.slow  # ~20 s of float64 compiles; the engine is tested in the fast tier

CFG = PipelineConfig(
    model=ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, dtype="float64"),
    data=DataConfig(max_len=48, max_prompt_len=16),
)


@pytest.fixture(scope="module")
def setup():
    rec = build_probes(generate_preferences(6, seed=1), seed=0, n_test=2)[0]
    with jax.enable_x64(True):
        params = init_params(CFG.lm_config(), jax.random.PRNGKey(1))
        maps = run_token_maps(params, CFG, rec, 3, eta=1e-6)
        one = run_one_step(params, CFG, rec, [1e-6])
    return rec, maps, one


def test_maps_sum_to_the_one_step_prediction(setup):
    """Σ_{m,l} C[o, m, l] is the one-step check's linear prediction of Δ log π(y_o) per probe."""
    _, maps, one = setup
    assert maps["types"] == one["types"]
    pred = np.asarray(one["pred"][0])
    np.testing.assert_allclose(maps["total"], pred, rtol=1e-10, atol=1e-14 * np.abs(pred).max())
    kept_sums = maps["sft"].sum(axis=(1, 2))
    np.testing.assert_allclose(kept_sums, pred[maps["kept"]], rtol=1e-10)
    # the K kept are the K largest |Σ C|, largest first
    order = np.argsort(-np.abs(pred))
    assert list(maps["kept"]) == list(order[:3])


def test_maps_vanish_off_the_masks_and_dpo_branches_oppose(setup):
    _, maps, _ = setup
    for j in range(3):
        off_o = ~maps["probe_mask"][j]
        assert np.abs(maps["sft"][j][off_o]).max() == 0.0
        assert np.abs(maps["dpo_pos"][j][off_o]).max() == 0.0
    assert np.abs(maps["sft"][:, :, ~maps["u_mask"]]).max() == 0.0
    assert np.abs(maps["dpo_neg"][:, :, ~maps["neg_mask"]]).max() == 0.0
    # at the first DPO step the y⁺ branch raises y⁺'s own tokens; the y⁻ branch lowers them
    i = maps["types"].index("chosen")
    if i in list(maps["kept"]):
        j = list(maps["kept"]).index(i)
        assert maps["dpo_pos"][j].sum() > 0 > maps["dpo_neg"][j].sum()


def test_token_map_figures(setup):
    _, maps, _ = setup
    figs = token_map_figures(maps)
    assert len(figs) == 9 and all(isinstance(f, Figure) for f in figs.values())


def test_k_is_checked(setup):
    rec, _, _ = setup
    with pytest.raises(ValueError, match="token-maps"):
        run_token_maps({}, CFG, rec, 0)
