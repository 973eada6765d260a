"""The runnable ``Examples:`` of the public docstrings, executed as doctests (they stay true)."""

import doctest
import importlib

import pytest

MODULES = [
    "ldjax._src.entk",
    "ldjax._src.entk_vp",
    "ldjax._src.decompose",
    "ldjax._src.actual_step",
    "ldjax._src.compare",
    "ldjax._src.log_softmax_jacobian",
    "ldjax._src.logit_gradient",
    "ldjax._src.losses",
    "ldjax._src.projected",
    pytest.param("ldjax._src.token_influence", marks=pytest.mark.slow),  # ~19 s of compiles
    "ldjax.training.config",
    "ldjax.experiments.stats",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
