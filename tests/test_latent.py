"""The latent neural correction (an augmented neural ODE): a planted history-dependent system that no correction of
theta alone reproduces, adjoint against direct gradients through the latent states, the hybrid's extra-state
abstraction with and without a flow's own extra state, checkpoints, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

import neuralflow as nf
from neuralflow import checkpoint
from neuralflow.corrections import CORRECTIONS, Hybrid, LatentCorrection, NeuralCorrection
from neuralflow.fit import fit, fit_loss

LR = 0.1
OMEGA, GAMMA = 1.0, 0.2  # the hidden oscillator's frequency and damping, in units of lr per step
SOLVER = {"solver": "rk4", "step_size": 1.0}


def oscillator_problem() -> nf.Problem:
    return nf.problems.quadratic([[1.0]], theta0=[1.0])


def oscillator_trajectory(steps: int = 200) -> nf.Trajectory:
    """``dtheta/dt = lr u``, ``du/dt = -lr (omega^2 theta + gamma u)``: a damped oscillator whose velocity ``u`` is
    hidden. ``theta`` (one dimension) passes each value with two velocities of opposite sign, so no vector field of
    ``theta`` alone reproduces it (Dupont et al. 2019's argument for augmenting)."""
    p = oscillator_problem()

    def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theta, u = y[..., :1], y[..., 1:]
        return torch.cat([LR * u, -LR * (OMEGA**2 * theta + GAMMA * u)], -1)

    t = torch.arange(steps + 1, dtype=torch.float64)
    y = odeint(rhs, torch.tensor([1.0, 0.0], dtype=torch.float64), t, method="rk4", options={"step_size": 0.25})
    theta = y[:, :1]
    loss = torch.stack([p.loss(th) for th in theta]).detach()
    nan = torch.full_like(loss, math.nan)
    return nf.Trajectory(LR, t.long(), theta, loss, nan, nan[:, None], nan, p.description, {})


@pytest.fixture(scope="module")
def oscillator():
    return oscillator_trajectory()


def latent_model(p: nf.Problem, **kw) -> Hybrid:
    return Hybrid(nf.flows.GradientFlow(p, LR), LatentCorrection(p, LR, **{"m": 2, "fields": (), "hidden": 16, **kw}))


def test_latent_states_reproduce_a_history_dependent_system_that_a_state_only_network_cannot(oscillator):
    p = oscillator_problem()
    adam = {
        "method": "direct",
        "optimizer": "adam",
        "learning_rate": 3e-2,
        "patience": 50,
        "val_fraction": 0,
        "progress": False,
        **SOLVER,
    }
    latent = fit(latent_model(p), oscillator, window=20, extra_start="fitted", max_iters=100, **adam)
    state_only = Hybrid(nf.flows.GradientFlow(p, LR), NeuralCorrection(p, LR, hidden=8))  # 97 parameters vs 100
    assert sum(q.numel() for q in state_only.parameters()) <= sum(q.numel() for q in latent.model.parameters())
    neural = fit(state_only, oscillator, window=20, max_iters=100, **adam)
    # measured: latent 2e-5 of the physics' error after 300 iterations; the network of theta 0.85 (0.84 at width 64)
    assert neural.hybrid_error > 0.5 * neural.physics_error
    assert latent.hybrid_error < 1e-2 * neural.hybrid_error, (latent.hybrid_error, neural.hybrid_error)


def test_windows_start_the_latent_states_at_zero_and_the_hybrid_starts_as_the_physics(oscillator):
    p = oscillator_problem()
    model = latent_model(p)
    physics = Hybrid(nf.flows.GradientFlow(p, LR), NeuralCorrection(p, LR))  # its output layer starts at 0
    assert model.extra_state.name == "latent" and model.extra_state.shape == (2,) and model.state_dim == 3
    z0 = model.initial_extra(p.theta0, oscillator, 0)
    assert torch.equal(z0, torch.zeros(2, dtype=torch.float64))
    assert fit_loss(model, oscillator, window=20, **SOLVER)[0] == fit_loss(physics, oscillator, window=20, **SOLVER)[0]
    y = model.join(p.theta0, torch.tensor([0.5, -1.0], dtype=torch.float64))
    theta, z = model.split(y)
    assert torch.equal(theta, p.theta0) and z.tolist() == [0.5, -1.0]
    t0 = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        out = model(t0, y)
    force = model.correction.force
    expected = -LR * p.theta0 + LR * force @ z  # z's own equation starts at 0 (the last layer of f_phi)
    torch.testing.assert_close(out[:1], expected, rtol=1e-14, atol=0)
    assert out[1:].abs().max() == 0
    record = nf.compare(oscillator, model, progress=False).records[0]  # compare goes through the same abstraction
    assert record.extra.shape == (len(oscillator), 2) and record.extra.abs().max() == 0


def test_adjoint_and_direct_gradients_agree_through_the_latent_states(oscillator):
    p = oscillator_problem()
    model = latent_model(p, fields=("g",), hidden=6)
    with torch.no_grad():  # a latent equation that moves z, and a start away from 0
        model.correction.net[2].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model.correction.net[2].bias.fill_(0.3)
    tol = {"rtol": 1e-9, "atol": 1e-11, "solver": "dopri5"}
    loss_a, grad_a = fit_loss(model, oscillator, window=20, method="adjoint", **tol)
    loss_d, grad_d = fit_loss(model, oscillator, window=20, method="direct", **tol)
    assert loss_a == pytest.approx(loss_d, rel=1e-10) and loss_a > 0
    assert bool((grad_d.abs() > 0).all())  # every parameter (f_phi, W, P) reaches the loss
    torch.testing.assert_close(grad_a, grad_d, rtol=1e-5, atol=1e-10)


def test_a_latent_correction_rides_on_a_flow_with_its_own_extra_state():
    def loss(theta: torch.Tensor) -> torch.Tensor:  # not quadratic: the oscillation flow's drift needs D3L
        return 0.5 * theta[0] ** 2 + 1.5 * theta[1] ** 2 + 0.25 * theta[0] ** 2 * theta[1] ** 2

    p = nf.problems.from_function(loss, torch.tensor([1.0, 0.5], dtype=torch.float64), name="bumpy")
    flow = nf.flows.OscillationFlow(p, LR, q=1e-6, n_track=1)
    model = Hybrid(flow, LatentCorrection(p, LR, m=3, hidden=4))
    own = flow.extra_state.size
    assert model.extra_state.name == f"{flow.extra_state.name}+latent"
    assert model.state_dim == flow.state_dim + 3 and model.extra_state.shape == (own + 3,)
    extra = model.initial_extra(p.theta0)
    torch.testing.assert_close(extra[:own], flow.initial_extra(p.theta0).reshape(-1))
    assert extra[own:].abs().max() == 0
    y = model.join(p.theta0, extra)
    head, z = model.flow_part(y)
    assert head.shape == (flow.state_dim,) and z.shape == (3,)
    t0 = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(t0, y)[: flow.state_dim], flow(t0, head), rtol=1e-12, atol=0)
        z = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
        moved = model(t0, torch.cat([head, z]))
    lat = model.correction
    g = torch.func.grad(loss)(p.theta0)
    kick = LR * lat.force @ z + (lat.readout @ z) * LR * g
    torch.testing.assert_close(moved[: p.dim] - flow(t0, head)[: p.dim], kick, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(moved[p.dim : flow.state_dim], flow(t0, head)[p.dim :], rtol=1e-12, atol=0)
    states, extras = nf.simulate(
        model, p.theta0, torch.arange(4.0, dtype=torch.float64), solver="rk4", step_size=0.5, return_extra=True
    )
    assert states.shape == (4, 2) and extras.shape == (4, own + 3)
    assert extras[:, own:].abs().max() == 0  # z stays at 0 (its equation starts at 0)


def test_checkpoint_with_a_latent_correction_round_trips_bit_for_bit(oscillator, tmp_path):
    p = oscillator_problem()
    model = latent_model(p, fields=("g",), hidden=4, seed=3)
    res = fit(
        model,
        oscillator,
        window=20,
        method="direct",
        optimizer="adam",
        max_iters=3,
        extra_start="fitted",
        val_fraction=0,
        progress=False,
        **SOLVER,
    )
    assert CORRECTIONS["latent"] is LatentCorrection
    back = checkpoint.load(checkpoint.save(res, tmp_path / "latent.nff", report=False))
    assert isinstance(back.model.correction, LatentCorrection)
    assert back.model.correction.config() == model.correction.config()
    assert back.model.extra_state == model.extra_state
    state, state_back = model.state_dict(), back.model.state_dict()
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    y0 = model.join(p.theta0, torch.tensor([0.2, -0.1], dtype=torch.float64))
    t = torch.arange(5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(odeint(back.model, y0, t, method="rk4"), odeint(model, y0, t, method="rk4"))


def test_bad_input_gets_clear_errors(oscillator):
    p = oscillator_problem()
    for m in (0, -1, 1.5, True):
        with pytest.raises(nf.InputError, match="m .the number of latent states. must be a positive int"):
            LatentCorrection(p, LR, m=m)
    with pytest.raises(nf.InputError, match="hidden must be a positive int"):
        LatentCorrection(p, LR, hidden=0)
    with pytest.raises(nf.InputError, match="unknown term"):
        LatentCorrection(p, LR, fields=["velocity"])
    with pytest.raises(nf.InputError, match="must reach dtheta/dt"):
        LatentCorrection(p, LR, fields=(), direct=False)
    with pytest.raises(nf.InputError, match="features must be 'state' or 'features'"):
        LatentCorrection(p, LR, features="theta")
    model = latent_model(p)
    t0 = torch.zeros((), dtype=torch.float64)
    with pytest.raises(nf.InputError, match=r"ODE state \[theta, latent\] has length 3, got 1"):
        model(t0, p.theta0)
    with pytest.raises(nf.InputError, match="must have shape"):
        model.join(p.theta0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(nf.InputError, match="inside nf.Hybrid"):
        model.correction(t0, p.theta0)
    with pytest.raises(nf.InputError, match="method='adjoint' or 'direct'"):
        fit(model, oscillator, window=20, method="regression", progress=False)
