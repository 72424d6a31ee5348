"""Hidden-state corrections: a planted hidden-state system recovered by the adjoint fit, adjoint against direct
gradients through the extra state, the oscillation flow's hidden-state terms, checkpoints, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchdiffeq import odeint

import neuralflow as nf
from neuralflow import checkpoint
from neuralflow.corrections import HIDDEN_TERMS, HiddenStateLibrary, Hybrid, TermLibrary
from neuralflow.fit import fit, fit_loss
from neuralflow.flows import FLOWS, OscillationFlow
from neuralflow.flows.base import ExtraState, Flow

LR = 0.1
SOLVER = {"solver": "rk4", "step_size": 0.5}
TRUTH = {"floquet": 2.2, "drift": 0.45}  # the physics has 2 and 1/2


class PlantedHidden(Flow):
    """Damian et al.'s self-stabilisation in continuous time, with the oscillation variance ``s`` as the extra state.

    ``theta = (x, y)`` with ``y = S - 2/lr``: ``dx/dt = -lr x`` (a drift that sets the fit's scale),
    ``dy/dt = lr alpha + c_d (-lr beta s)``, ``ds/dt = c_f s log|1 + lr y| + q``; physics ``c_f = 2``, ``c_d = 1/2``.
    """

    name = "planted-hidden"

    def __init__(self, problem: nf.Problem, lr: float, alpha: float = 0.5, beta: float = 2.0, q: float = 0.0) -> None:
        super().__init__(problem, lr)
        self.alpha, self.beta, self.q = alpha, beta, q
        self.extra_state = ExtraState("variance", "s", (1,), "the oscillation variance")

    def hidden_coefficients(self) -> dict[str, float]:
        return {"floquet": 2.0, "drift": 0.5, "floor": self.q}

    def hidden_fields(self, t: Tensor, y: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        x, sharp, s = y[:, 0], y[:, 1], y[:, 2]
        zero = torch.zeros_like(x)
        unit = {
            "floquet": torch.stack([zero, zero, s * torch.log(torch.abs(1 + self.lr * sharp))], 1),
            "drift": torch.stack([zero, -self.lr * self.beta * s, zero], 1),
            "floor": torch.stack([zero, zero, torch.ones_like(x)], 1),
        }
        rhs = torch.stack([-self.lr * x, self.lr * self.alpha + zero, zero], 1)
        rhs = rhs + sum(c * unit[n] for n, c in self.hidden_coefficients().items())
        return rhs, {n: unit[n] for n in names}

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        batch = y if y.dim() == 2 else y.unsqueeze(0)
        out = self.hidden_fields(t, batch, [])[0]
        return out if y.dim() == 2 else out[0]

    def initial_extra(self, theta0: Tensor, trajectory: object = None, step: int | None = None) -> Tensor:
        if trajectory is None or "oscillation" not in trajectory.history:  # nothing measured: the cycle's centre
            return theta0.new_full((1,), self.alpha)
        osc = trajectory.oscillation
        row = torch.nonzero(osc.steps == (int(trajectory.steps[0]) if step is None else step)).flatten()
        return osc.amplitude[row[0]].pow(2).to(theta0)

    def config(self) -> dict[str, object]:
        return {**super().config(), "alpha": self.alpha, "beta": self.beta, "q": self.q}


def planted_problem() -> nf.Problem:
    return nf.problems.quadratic([[1.0, 0.0], [0.0, 1.0]], theta0=[1.0, 0.3])


def library(problem: nf.Problem, terms=("floquet", "drift"), deltas: dict[str, float] | None = None):
    lib = HiddenStateLibrary(problem, LR, terms=terms)
    with torch.no_grad():
        for n, v in (deltas or {}).items():
            lib.deltas[n].fill_(v)
    return lib


def planted_trajectory(steps: int = 160) -> nf.Trajectory:
    """The planted system run with the TRUTH coefficients; the measured oscillation is ``sqrt(s)``."""
    p = planted_problem()
    flow = PlantedHidden(p, LR)
    truth = Hybrid(flow, library(p, deltas={"floquet": 0.1, "drift": -0.1}))
    t = torch.arange(steps + 1, dtype=torch.float64)
    with torch.no_grad():
        y = odeint(
            truth,
            flow.join(p.theta0, torch.tensor([0.2], dtype=torch.float64)),
            t,
            method="rk4",
            options={"step_size": 0.5},
        )
    theta, s = flow.split(y)
    loss = torch.stack([p.loss(th) for th in theta]).detach()
    nan = torch.full_like(loss, math.nan)
    history = {"step": t.long(), "oscillation": s.sqrt(), "oscillation_total": s[:, 0], "smoothed_step": nan}
    return nf.Trajectory(LR, t.long(), theta, loss, nan, (2 / LR + theta[:, 1:]), nan, p.description, history)


@pytest.fixture(scope="module")
def planted():
    return planted_trajectory()


def test_library_terms_carry_theory_and_approximation():
    assert HIDDEN_TERMS["floquet"].theory == 2 and HIDDEN_TERMS["drift"].theory == 0.5
    assert HIDDEN_TERMS["floor"].theory is None  # q, from the run
    assert HIDDEN_TERMS["amplitude"].approximation.name == "linear-floquet-growth"
    assert HIDDEN_TERMS["floor"].approximation.name == "isotropic-constant-injection"
    p = planted_problem()
    lib = library(p, terms=("floquet", "drift", "floor"), deltas={"floquet": 0.1, "floor": 0.3})
    c = lib.coefficients(PlantedHidden(p, LR, q=0.0))
    c = {n: float(v.detach()) for n, v in c.items()}
    assert c["floquet"] == pytest.approx(2.2) and c["drift"] == 0.5
    assert c["floor"] == pytest.approx(0.3)  # the physics has no floor here: the coefficient itself
    c = {n: v.detach() for n, v in lib.coefficients(PlantedHidden(p, LR, q=1e-20)).items()}
    # q revised by a factor (log scale)
    assert float(c["floor"]) == pytest.approx(1e-20 * math.exp(0.3), rel=1e-9, abs=0)
    assert float(c["floquet"]) == pytest.approx(2.2)  # the others by a relative change


def test_the_floor_is_revised_in_log_scale():
    """The floor's parameter is ``log(c / q)``: a start 10 q is ``delta = log 10``, a Gauss-Newton step in ``delta``
    multiplies the floor, and no step makes it negative."""
    p = planted_problem()
    model = Hybrid(
        PlantedHidden(p, LR, q=1e-20),
        HiddenStateLibrary(p, LR, ("floquet", "floor"), init={"floquet": 1.0, "floor": 1e-19}),
    )
    lib = model.correction
    deltas = {n: float(v.detach()) for n, v in lib.deltas.items()}
    assert deltas["floor"] == pytest.approx(math.log(10)) and deltas["floquet"] == -0.5
    with torch.no_grad():
        lib.deltas["floor"].fill_(-30.0)  # a long step down
    floor = float(lib.coefficients(model.flow)["floor"].detach())
    assert 0 < floor == pytest.approx(1e-20 * math.exp(-30), rel=1e-9, abs=0)
    with pytest.raises(nf.errors.InputError, match="positive factor"):
        Hybrid(PlantedHidden(p, LR, q=1e-20), HiddenStateLibrary(p, LR, ("floor",), init={"floor": -1e-19}))


def test_adjoint_fit_recovers_the_planted_hidden_state_rates(planted):
    p = planted_problem()
    model = Hybrid(PlantedHidden(p, LR), library(p))
    res = fit(
        model,
        planted,
        window=20,
        method="adjoint",
        optimizer="lbfgs",
        max_iters=30,
        progress=False,
        val_fraction=0.25,
        **SOLVER,
    )
    for name, value in TRUTH.items():
        assert res.coefficients[name] == pytest.approx(value, rel=0.02), res.coefficients
    assert res.hybrid_error < 1e-3 * res.physics_error


def test_adjoint_and_direct_gradients_agree_through_the_extra_state(planted):
    p = planted_problem()
    model = Hybrid(PlantedHidden(p, LR), library(p, deltas={"floquet": 0.03, "drift": 0.05}))
    loss_a, grad_a = fit_loss(model, planted, window=20, method="adjoint", **SOLVER)
    loss_d, grad_d = fit_loss(model, planted, window=20, method="direct", **SOLVER)
    assert loss_a == pytest.approx(loss_d, rel=1e-12) and loss_a > 0
    assert bool((grad_d.abs() > 0).all())
    torch.testing.assert_close(grad_a, grad_d, rtol=1e-5, atol=0)


def test_windows_start_from_the_measured_extra_state(planted):
    p = planted_problem()
    flow = PlantedHidden(p, LR)
    # the truth (deltas as planted) reproduces every window from its measured start
    truth = Hybrid(flow, library(p, deltas={"floquet": 0.1, "drift": -0.1}))
    loss, _ = fit_loss(truth, planted, window=20, **SOLVER)
    assert loss < 1e-20
    # started from a wrong variance the same model misses
    wrong = nf.Trajectory(
        **{**planted.__dict__, "history": {**planted.history, "oscillation": planted.history["oscillation"] * 1.5}}
    )
    assert fit_loss(truth, wrong, window=20, **SOLVER)[0] > 1e-6


def test_fitted_window_starts_recover_the_rates_without_a_measurement(planted):
    p = planted_problem()
    unmeasured = nf.Trajectory(**{**planted.__dict__, "history": {}})
    model = Hybrid(PlantedHidden(p, LR), library(p))
    measured = fit(model, unmeasured, window=20, progress=False, **SOLVER)  # every window starts at s = alpha
    assert measured.coefficients["floquet"] != pytest.approx(TRUTH["floquet"], rel=0.02)
    model = Hybrid(PlantedHidden(p, LR), library(p))
    res = fit(model, unmeasured, window=20, extra_start="fitted", val_fraction=0, progress=False, **SOLVER)
    assert res.coefficients["floquet"] == pytest.approx(TRUTH["floquet"], rel=0.02), res.coefficients
    assert res.hybrid_error < 1e-9 * res.physics_error
    # without a floor, s -> k s with c_d -> c_d / k leaves theta unchanged: theta alone fixes the rate, not the
    # drift coupling; only a measured variance (or a floor) sets the scale that separates c_d from s
    assert res.settings["extra_start"] == "fitted"


def test_checkpoint_with_a_hidden_state_correction_round_trips(planted, tmp_path, monkeypatch):
    monkeypatch.setitem(FLOWS, PlantedHidden.name, PlantedHidden)
    p = planted_problem()
    model = Hybrid(PlantedHidden(p, LR), library(p, terms=("floquet", "drift", "floor")))
    res = fit(model, planted, window=20, max_iters=2, progress=False, **SOLVER)
    back = checkpoint.load(checkpoint.save(res, tmp_path / "hidden.nff", report=False))
    assert isinstance(back.model.correction, HiddenStateLibrary)
    assert back.model.correction.config() == model.correction.config()
    state, state_back = model.state_dict(), back.model.state_dict()
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    assert back.coefficients == res.coefficients
    y0 = model.flow.join(p.theta0, torch.tensor([0.2], dtype=torch.float64))
    t = torch.arange(5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(odeint(back.model, y0, t, method="rk4"), odeint(model, y0, t, method="rk4"))


def damian(alpha: float = 0.5) -> nf.Problem:
    def loss(theta: Tensor) -> Tensor:
        return 0.5 * (2 / LR + theta[1]) * theta[0] ** 2 - alpha * theta[1]

    return nf.problems.from_function(loss, torch.tensor([0.0, 0.3], dtype=torch.float64), name="damian")


def test_oscillation_flow_takes_hidden_state_and_theta_corrections():
    p = damian()
    flow = OscillationFlow(p, LR, q=0.0, n_track=1)
    y = flow.join(p.theta0, flow.extra_from_covariance(torch.tensor([[0.4]], dtype=torch.float64)))
    t0 = torch.zeros((), dtype=torch.float64)

    def dX(out: Tensor) -> float:  # dX = dZ + 2 drho X at rho = 0
        return float(out[2] + 2 * out[3] * 0.4)

    with torch.no_grad():
        physics = flow(t0, y)
        same = Hybrid(flow, library(p, terms=("floquet", "drift", "amplitude")))(t0, y)
        doubled = Hybrid(flow, library(p, terms=("floquet",), deltas={"floquet": 1.0}))(t0, y)
        amp = Hybrid(flow, library(p, terms=("amplitude",), deltas={"amplitude": 3.0}))(t0, y)
        no_drift = Hybrid(flow, library(p, terms=("drift",), deltas={"drift": -1.0}))(t0, y)
        theta_lib = Hybrid(flow, TermLibrary(p, LR, terms=["g"]))
        theta_lib.correction.constants["g"].fill_(0.5)
        with_g = theta_lib(t0, y)
    torch.testing.assert_close(same, physics, rtol=1e-12, atol=0)
    r = math.log(abs(1 - LR * (2 / LR + 0.3)))
    assert dX(physics) == pytest.approx(2 * r * 0.4, rel=1e-6)
    assert dX(doubled) == pytest.approx(4 * r * 0.4, rel=1e-6)  # coefficient 2 (1 + 1)
    assert dX(amp) - dX(physics) == pytest.approx(3.0 * 0.4**2, rel=1e-6)
    # drift coefficient 0: dy/dt = -lr g_y = lr alpha (at x = 0); the physics has -lr (g_y + s / 2)
    assert float(no_drift[1]) == pytest.approx(LR * 0.5, rel=1e-6)
    assert float(physics[1]) == pytest.approx(LR * (0.5 - 0.4 / 2), rel=1e-6)
    # a theta-only library moves theta and leaves the extra state's equation to the physics
    torch.testing.assert_close(with_g[2:], physics[2:], rtol=1e-10, atol=1e-12)
    assert float(with_g[1] - physics[1]) == pytest.approx(0.5 * LR * -0.5, rel=1e-9)


def test_bad_input_gets_clear_errors(planted):
    p = planted_problem()
    with pytest.raises(nf.InputError, match="unknown hidden-state term"):
        HiddenStateLibrary(p, LR, terms=["gradS"])
    with pytest.raises(nf.InputError, match="cannot evaluate the hidden-state terms"):
        Hybrid(nf.flows.GradientFlow(p, LR), HiddenStateLibrary(p, LR))
    with pytest.raises(nf.InputError, match=r"supports \['drift', 'floor', 'floquet'\]"):
        Hybrid(PlantedHidden(p, LR), HiddenStateLibrary(p, LR, terms=["amplitude"]))
    model = Hybrid(PlantedHidden(p, LR), library(p))
    with pytest.raises(nf.InputError, match="ODE state"):
        model(torch.zeros(()), p.theta0)
    with pytest.raises(nf.InputError, match="extra_start must be"):
        fit(model, planted, window=20, extra_start="guess", progress=False, **SOLVER)
    with pytest.raises(nf.InputError, match="val_fraction=0"):
        fit(model, planted, window=20, extra_start="fitted", progress=False, **SOLVER)
    with pytest.raises(nf.InputError, match="carries none"):
        fit(Hybrid(nf.flows.GradientFlow(p, LR), None), planted, window=20, extra_start="fitted", progress=False)
    with pytest.raises(nf.InputError, match="regression"):
        fit(model, planted, window=20, method="regression", progress=False, **SOLVER)
