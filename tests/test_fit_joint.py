"""Fit across several runs: shared coefficients at different lr, and which terms are universal."""

from __future__ import annotations

import pytest
from test_fit import THEORY, library_model, planted, relative_errors, simulated, tanh_net

import neuralflow as nf
from neuralflow.errors import InputError
from neuralflow.fit import fit_runs

LRS = (0.01, 0.02, 0.04)


@pytest.fixture(scope="module")
def small():
    return tanh_net(inputs=3, hidden=4, n=20)


def test_planted_universal_coefficients_are_fitted_once_with_each_runs_power_of_lr(small):
    # the same pure numbers at every lr: each run's data carry c * lr_run^p in front of each term
    runs = [simulated(planted(small, lr, Hg=-0.8, D3gg=0.6), 24, store_every=2) for lr in LRS]
    model = library_model(small, 0.1, ["Hg", "D3gg"])
    res = nf.fit(model, runs, window=8, min_norm=0.0, step_size=0.5, progress=False)
    assert isinstance(res, nf.JointFitResult) and len(res.runs) == len(res.per_run) == 3
    assert relative_errors(res.coefficients, {"Hg": -0.8, "D3gg": 0.6}) == pytest.approx({"Hg": 0, "D3gg": 0}, abs=1e-3)
    # the model passed in holds the joint fit
    assert float(model.correction.constants["Hg"].detach()) == pytest.approx(res.coefficients["Hg"])
    assert res.universal == {"Hg": True, "D3gg": True}
    assert [r.model.lr for r in res.runs] == list(LRS)
    # each run records the solver its windows were solved with (gradient flow names none: rk4)
    assert [r.settings["solver"] for r in res.runs] == ["rk4"] * 3 and res.settings["solver"] == "rk4"


def test_planted_lr_dependent_coefficient_is_not_universal(small):
    # Hg's coefficient grows with lr (an lr^3 effect filed under the lr^2 term); D3gg's does not
    runs = [simulated(planted(small, lr, Hg=-0.5 - 25 * lr, D3gg=0.6), 40) for lr in LRS]
    res = nf.fit(library_model(small, 0.1, ["Hg", "D3gg"]), runs, window=10, method="regression", progress=False)
    per_run = res.universality["Hg"]["values"]
    assert per_run == pytest.approx([-0.5 - 25 * lr for lr in LRS], rel=1e-2)  # each run alone finds its own value
    assert res.universal["Hg"] is False and res.universality["Hg"]["z"] > 3
    notes = res.report().notes
    assert any(n.startswith("Hg ") and "NOT universal" in n for n in notes)


@pytest.mark.slow
def test_joint_fit_recovers_the_modified_equation_across_learning_rates():
    p = tanh_net()
    runs = [nf.run_gd(p, lr, 500, eig_every=100, progress=False) for lr in (0.01, 0.02, 0.04)]
    res = nf.fit(library_model(p, 0.02, list(THEORY)), runs, window=50, progress=False)
    err = relative_errors(res.coefficients, THEORY)
    assert max(err.values()) < 0.05, res.coefficients
    assert res.universal == {name: True for name in THEORY}, res.universality_notes()
    # the run at lr = 0.04 alone is further from theory (the truncated series' bias grows with lr)
    single = res.per_run[2].coefficients
    assert abs(single["H2g"] - THEORY["H2g"]) > abs(res.coefficients["H2g"] - THEORY["H2g"])


def test_bad_input_to_a_joint_fit(small):
    runs = [simulated(planted(small, lr, Hg=-0.8), 12, store_every=2) for lr in LRS[:2]]
    gated = nf.Hybrid(nf.flows.GradientFlow(small, 0.1), nf.corrections.TermLibrary(small, 0.1, ["Hg"], gated=True))
    with pytest.raises(InputError, match="without gated terms"):
        nf.fit(gated, runs, progress=False)
    with pytest.raises(InputError, match="run 1 is a str"):
        nf.fit(library_model(small, 0.1, ["Hg"]), [runs[0], "run.nft"], progress=False)
    with pytest.raises(InputError, match="non-empty list"):
        nf.fit(library_model(small, 0.1, ["Hg"]), [], progress=False)
    res = fit_runs(library_model(small, 0.1, ["Hg"]), runs, window=4, step_size=0.5, per_run=False, progress=False)
    assert res.universal == {"Hg": None}  # no per-run fits, no verdict
    with pytest.raises(InputError, match="run by run"):
        res.save("joint.nff")


def test_no_verdict_at_the_edge_of_stability():
    # zhu_quartic at lr 0.1 and 0.15 sits at lr S ~ 2, where the series in lr does not converge
    p = nf.problems.zhu_quartic()
    runs = [nf.run_gd(p, lr, 60, progress=False) for lr in (0.1, 0.15)]
    res = nf.fit(library_model(p, 0.1, ["Hg"]), runs, window=10, method="regression", progress=False)
    assert max(res.universality["Hg"]["allowance"]) >= 1
    assert res.universal == {"Hg": None}
    assert "no verdict" in res.universality_notes()[0]
