"""Stability of a report's conclusions under delete-half block resampling of the trajectory."""

from __future__ import annotations

import pytest

import neuralflow as nf
from neuralflow.errors import InputError


@pytest.fixture(scope="module")
def recovery():
    """The modified equation recovered from exact GD data: a conclusion that must survive resampling."""
    p = nf.problems.scalar_factorization(3)
    traj = nf.run_gd(p, 0.02, 100, progress=False)
    model = nf.Hybrid(nf.flows.GradientFlow(p, 0.02), nf.corrections.TermLibrary(p, 0.02, terms=["Hg", "H2g", "D3gg"]))
    return nf.fit(model, traj, window=10, method="regression", progress=False), traj


def test_a_clear_conclusion_comes_out_on_top_in_every_refit_with_a_real_spread(recovery):
    result, traj = recovery
    st = nf.stability(result, traj, replicates=8, blocks=6)
    assert st.failed == 0 and st.top == {st.original: 1.0} and st.original == "continuous-time-order-1"
    hg = st.coefficients["Hg"]
    assert hg["low"] <= hg["median"] <= hg["high"] and abs(hg["median"] + 0.5) < 0.005
    assert hg["high"] - hg["low"] > 1e-5  # the re-fits saw different data
    assert hg["low"] - 0.01 < result.coefficients["Hg"] < hg["high"] + 0.01
    text = str(st)
    assert "continuous-time-order-1 (the report's)" in text and "100.0 percent" in text and "Hg" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"replicates": 0}, "replicates must be a positive int"),
        ({"blocks": 1}, "blocks must be at least 2"),
        ({"blocks": 2.5}, "blocks must be a positive int"),
    ],
)
def test_bad_arguments(recovery, kwargs, match):
    result, traj = recovery
    with pytest.raises(InputError, match=match):
        nf.stability(result, traj, **kwargs)
    with pytest.raises(InputError, match="the Trajectory that was fitted"):
        nf.stability(result, traj.iterates)
