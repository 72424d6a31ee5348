"""Gated coefficients fitted by the derivative regression: recovery of a planted switch at the edge of stability."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torchdiffeq import odeint

import neuralflow as nf
from neuralflow.corrections import Hybrid, TermLibrary
from neuralflow.fit import fit
from neuralflow.flows import GradientFlow

LR = 0.1  # 2/lr = 20


def valley(theta: torch.Tensor) -> torch.Tensor:
    """``1/2 y x^2 + 1/10 (y - 30)^2 + 1/2 z^2``: the sharpness is ``y`` (for small ``x``), ``grad S = (0, 1, 0)``.

    The flow drives ``y`` (so ``lr S``) from 1.2 up through 2 towards 2.8: a planted gated ``gradS``
    term switches on part-way.
    """
    x, y, z = theta
    return 0.5 * y * x**2 + 0.1 * (y - 30) ** 2 + 0.5 * z**2


def planted(problem: nf.Problem) -> Hybrid:
    """``-lr g + 0.2 lr g + c(theta) lr grad S`` with ``c = -0.3 sigmoid(20 (lr S - 2))``."""
    lib = TermLibrary(problem, LR, ["g", "gradS"], gated=["gradS"])
    with torch.no_grad():
        lib.constants["g"].fill_(0.2)
        gate = lib.gates["gradS"]
        gate.scale.fill_(-0.3)
        gate.margin.zero_()
    return Hybrid(GradientFlow(problem, LR), lib)


def simulated(truth: Hybrid, steps: int = 100) -> nf.Trajectory:
    """The planted flow from the problem's start, recorded at every step (the sharpness is ``y``)."""
    p = truth.problem
    t = torch.arange(0, steps + 1, dtype=torch.float64)
    with torch.no_grad():
        x = odeint(truth, p.theta0, t, method="rk4", options={"step_size": 0.5})
    nan = torch.full((len(t),), math.nan, dtype=torch.float64)
    return nf.Trajectory(
        lr=LR,
        steps=t.long(),
        iterates=x,
        loss=nan,
        grad_norm=nan,
        sharpness=x[:, 1:2],
        update_u=nan,
        problem=p.description,
    )


@pytest.fixture(scope="module")
def data():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p = nf.problems.from_function(valley, torch.tensor([1.0, 12.0, 0.5], dtype=torch.float64))
    truth = planted(p)
    yield p, truth, simulated(truth)
    torch.set_num_threads(n)


def test_gated_regression_recovers_a_planted_switch(data):
    p, truth, traj = data
    s = LR * traj.iterates[:, 1] - 2
    assert float(s[0]) < -0.5 and float(s[-1]) > 0.5  # the data cross the edge of stability
    model = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, ["g", "gradS"], gated=["gradS"]))
    res = fit(model, traj, window=10, method="regression", solver="euler", step_size=0.5, progress=False)
    lib = model.correction
    states = traj.iterates[2:-2]
    fitted = lib.coefficient_values(states)["gradS"]
    true = truth.correction.coefficient_values(states)["gradS"]
    s = s[2:-2]
    below, above = s < -0.25, s > 0.25
    assert below.sum() > 20 and above.sum() > 20
    assert float(fitted[below].abs().max()) < 0.005  # off below the edge of stability (measured 0.0011)
    assert float((fitted[above] - true[above]).abs().max()) < 0.003  # -0.3 to 1 percent above it (0.0006)
    assert float((fitted - true).abs().max()) < 0.006  # and the switch in between (0.0013)
    assert res.coefficients["g"] == pytest.approx(0.2, rel=0.01)
    assert res.settings["regression_loss"]["final"] < 1e-4
    assert res.hybrid_error < 1e-3 * res.physics_error
    assert set(res.coefficients) == {"g", "gradS"} and math.isnan(res.uncertainty["gradS"])


def test_gated_regression_is_reproducible(data):
    p, _, traj = data
    coeffs = []
    for _ in range(2):
        model = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, ["g", "gradS"], gated=["gradS"]))
        res = fit(
            model,
            traj.slice(stop=40),
            window=10,
            method="regression",
            solver="euler",
            step_size=0.5,
            max_iters=30,
            progress=False,
        )
        coeffs.append(torch.nn.utils.parameters_to_vector(model.parameters()))
    assert torch.equal(coeffs[0], coeffs[1])
    curve = res.settings["regression_loss"]
    assert curve["final"] <= curve["start"] < curve["physics"]
    # below the edge the switch never opens beyond 1 percent: the term is off, exactly 0, and not the
    # planted sigmoid's exponential tail times a huge scale
    assert float(model.correction.coefficient_values(traj.slice(stop=40).iterates)["gradS"].abs().max()) == 0.0


def test_gated_regression_recovers_a_planted_oscillation_law(data):
    """A gradS coefficient that follows the self-stabilisation variance, ``c = -0.3 switch(lr S - 2) sigma2``.

    ``sigma2 = 2 alpha / beta = -2 <g, grad S> / ||grad S||^2`` is the variance that would stop the
    sharpness from rising (Damian et al. 2023); the amplitude weight ``w = -0.3`` (theory at the
    edge of stability: -1/2) is a linear parameter of the regression and must come back to 1 percent.
    """
    p = data[0]
    truth = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, ["g", "gradS"], gated=["gradS"], amplitude=["sigma2"]))
    with torch.no_grad():
        truth.correction.constants["g"].fill_(0.2)
        gate = truth.correction.gates["gradS"]
        gate.weights.fill_(-0.3)
        gate.margin.zero_()
    traj = simulated(truth)
    x = traj.iterates
    s = LR * x[:, 1] - 2
    assert float(s[0]) < -0.5 and float(s[-1]) > 0.25
    model = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, ["g", "gradS"], gated=["gradS"], amplitude=["sigma2"]))
    res = fit(model, traj, window=10, method="regression", solver="euler", step_size=0.5, progress=False)
    fitted = model.correction.gates["gradS"]
    assert float(fitted.weights[0].detach()) == pytest.approx(-0.3, rel=0.01)
    states = x[2:-2]
    c_fit = model.correction.coefficient_values(states)["gradS"]
    c_true = truth.correction.coefficient_values(states)["gradS"]
    assert float((c_fit - c_true).abs().max()) < 0.01 * float(c_true.abs().max())
    assert res.coefficients["g"] == pytest.approx(0.2, rel=0.01)
    (row,) = [t for t in res.report().terms if t.name == "gradS"]
    assert "sigma2" in row.gate.features  # the report shows the coefficient against its amplitude feature too


def test_balanced_regression_still_recovers_the_planted_switch(data):
    """Local balancing reweights the points; on noise-free data it must not move the answer."""
    p, truth, traj = data
    model = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, ["g", "gradS"], gated=["gradS"]))
    res = fit(model, traj, window=10, method="regression", solver="euler", step_size=0.5, progress=False, balance=True)
    states = traj.iterates[2:-2]
    fitted = model.correction.coefficient_values(states)["gradS"]
    true = truth.correction.coefficient_values(states)["gradS"]
    assert float((fitted - true).abs().max()) < 0.006
    assert res.coefficients["g"] == pytest.approx(0.2, rel=0.01)
    assert res.settings["balance"] is True


def test_baseline_gated_term_recovers_its_value_below_the_edge_and_its_change(data):
    """``Hg`` at ``-1/2`` below the edge and ``-1/2 + 0.8`` above it: the baseline and the change come back.

    The report splits the term: ``Hg`` with its baseline (continuous-time limit, theory -1/2) and
    ``Hg (change at lr S = 2)``, attributed to gradient flow's "no oscillation".
    """
    p = data[0]

    def library() -> TermLibrary:
        return TermLibrary(p, LR, ["Hg"], gated=["Hg"], baseline=["Hg"])

    truth = Hybrid(GradientFlow(p, LR), library())
    with torch.no_grad():
        gate = truth.correction.gates["Hg"]
        gate.base.fill_(-0.5)
        gate.scale.fill_(0.8)
        gate.margin.zero_()
    traj = simulated(truth)
    lib = library()
    # from step 10: the first steps' fast transient (lr H_xx = 1.2) is beyond a finite-difference derivative
    res = fit(
        Hybrid(GradientFlow(p, LR), lib),
        traj.slice(start=10),
        window=10,
        method="regression",
        solver="euler",
        step_size=0.5,
        progress=False,
    )
    assert float(lib.gates["Hg"].base.detach()) == pytest.approx(-0.5, rel=0.01)
    assert float(lib.gates["Hg"].scale.detach()) == pytest.approx(0.8, rel=0.02)
    report = res.report(sharpness=False)
    rows = {t.label: t for t in report.terms}
    assert set(rows) == {"Hg", "Hg (change at lr S = 2)"}
    assert rows["Hg"].coefficient == pytest.approx(-0.5, rel=0.01) and rows["Hg"].theory == -0.5
    assert rows["Hg"].approximation.name == "continuous-time-order-1" and rows["Hg"].gate is None
    change = rows["Hg (change at lr S = 2)"]
    assert change.regime == "edge" and change.approximation.name == "no-oscillation"
    assert max(change.gate.values) == pytest.approx(0.8, rel=0.02) and min(change.gate.values) > -1e-3
    assert sum(t.share for t in report.terms) == pytest.approx(report.closed, abs=1e-9)
    # past the edge the term's whole contribution is the oscillation's: no share beyond what was closed
    (revision,) = [r for r in report.revisions() if r[0].name == "no-oscillation"]
    assert 0 < revision[1] <= report.closed + 1e-12
    (oscillation,) = [s for s in report.suggestions() if "[no-oscillation]" in s]
    assert re.search(r"changing the coefficient of Hg at lr S = 2 by 0\.[78]\d* step\(lr S - 2\)", oscillation)
    assert report.equation().count("H g") == 1  # one term: (c_0 + change) lr^2 H g
    assert nf.Report.from_dict(report.to_dict()).to_markdown() == report.to_markdown()
    with pytest.raises(nf.InputError, match="not gated"):
        TermLibrary(p, LR, ["Hg", "gradS"], gated=["gradS"], baseline=["Hg"])
