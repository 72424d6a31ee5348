"""One Solver description for simulate, the fit and the report: validated once, a flow's preference kept."""

from __future__ import annotations

import math

import pytest
import torch

import neuralflow as nf
from neuralflow.errors import InputError
from neuralflow.fit.options import resolved_solver
from neuralflow.flows import CentralFlow, GradientFlow
from neuralflow.solvers import Solver


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "rk5"},
        {"method": "rk4", "step_size": 0.0},
        {"method": "dopri5", "rtol": -1e-7},
        {"method": "dopri5", "atol": math.nan},
        {"method": "euler", "step_size": True},
    ],
)
def test_a_bad_solver_is_refused_when_it_is_made(bad):
    with pytest.raises(InputError, match="solver"):
        Solver(**bad)


def test_override_keeps_the_flows_choice_unless_the_method_changes():
    euler = Solver.from_options({"method": "euler", "options": {"step_size": 0.5}})
    assert euler == Solver("euler", 0.5)
    assert euler.override(step_size=0.25) == Solver("euler", 0.25)
    assert euler.override(method="euler") == euler
    # another method starts from the defaults: a step chosen for euler says nothing about dopri5
    assert euler.override(method="dopri5", rtol=1e-9) == Solver("dopri5", None, 1e-9, 1e-9)
    assert euler.odeint_options() == {"method": "euler", "options": {"step_size": 0.5}, "rtol": 1e-7, "atol": 1e-9}
    assert Solver("dopri5", 0.5).odeint_options()["options"] == {}  # an adaptive method takes no step


def test_simulate_integrates_with_the_flows_preferred_solver():
    """The central flow prefers Euler at step 1/2: simulate's states are two Euler substeps per GD step."""
    p = nf.problems.quadratic(torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    flow = CentralFlow(p, 0.1)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = nf.simulate(flow, p.theta0, t)[-1]
    flow.reset()
    with torch.no_grad():
        half = p.theta0 + 0.5 * flow(t[0], p.theta0[None])[0]
        want = half + 0.5 * flow(t[0] + 0.5, half[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # and the default for a flow without a preference is dopri5, far closer to the exact solution than Euler
    lr, grad = 0.1, GradientFlow(p, 0.1)
    exact = torch.exp(-lr * torch.tensor([1.0, 3.0], dtype=torch.float64) * 5) * p.theta0
    err = (nf.simulate(grad, p.theta0, torch.tensor([0.0, 5.0], dtype=torch.float64))[-1] - exact).norm()
    euler = (
        nf.simulate(grad, p.theta0, torch.tensor([0.0, 5.0], dtype=torch.float64), solver="euler", step_size=0.5)[-1]
        - exact
    ).norm()
    assert err < 1e-6 * euler


def test_the_solver_of_a_fit_is_read_back_from_its_settings():
    assert resolved_solver({"solver": "rk4", "step_size": None, "step_size_used": 0.25}) == Solver("rk4", 0.25)
    assert resolved_solver({"solver": "dopri5", "rtol": 1e-8, "atol": 1e-10}) == Solver("dopri5", None, 1e-8, 1e-10)
    assert resolved_solver({}) == Solver("rk4", 0.5)  # a checkpoint that recorded nothing: rk4 at step 1/2
