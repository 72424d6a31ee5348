"""The oscillation flow fitted by the adjoint: gradients through its extra state against backpropagation and
central finite differences, on a quartic whose eigenvectors are constant (exact) and on a small tanh net (the
frozen-eigenvector approximation), and the recovery of planted hidden-state coefficients."""

from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

import neuralflow as nf
from neuralflow.autodiff import dense_hessian, gradient, top_eigenpairs
from neuralflow.corrections import HiddenStateLibrary, Hybrid
from neuralflow.fit import fit, fit_loss
from neuralflow.flows import OscillationFlow

LR = 0.1
PLANTED = {"floquet": 0.1, "drift": -0.1}  # coefficients 2.2 and 0.45 against the physics' 2 and 1/2
OPTIONS = {"window": 20, "solver": "rk4", "step_size": 0.5, "val_fraction": 0.0}


def quartic(gamma: float = 0.5, alpha: float = 0.5) -> nf.Problem:
    """``L = 1/2 (2/lr + y + gamma y^2) x^2 - alpha y`` from ``x = 0``: the Hessian stays diagonal along the flow
    (``x`` stays 0), so the eigenvectors are constant, and ``D4L`` is not zero (``gamma``)."""

    def loss(theta: torch.Tensor) -> torch.Tensor:
        x, y = theta[0], theta[1]
        return 0.5 * (2 / LR + y + gamma * y**2) * x**2 - alpha * y

    return nf.problems.from_function(loss, torch.tensor([0.0, -0.2], dtype=torch.float64), name="quartic")


def tanh_net() -> nf.Problem:
    """A 2-3-1 tanh net on 6 random points (12 parameters): eigenvectors that turn as theta moves."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(6, generator=gen, dtype=torch.float64)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        W1, b1, w2 = theta[:6].reshape(3, 2), theta[6:9], theta[9:12]
        return 0.5 * ((torch.tanh(x @ W1.T + b1) @ w2 - y) ** 2).mean()

    return nf.problems.from_function(loss, torch.randn(12, generator=gen, dtype=torch.float64), name="tanh-net")


def library(problem: nf.Problem, lr: float, deltas: dict[str, float], **options) -> HiddenStateLibrary:
    lib = HiddenStateLibrary(problem, lr, terms=list(deltas), **options)
    with torch.no_grad():
        for name, value in deltas.items():
            lib.deltas[name].fill_(value)
    return lib


def flow_trajectory(
    problem: nf.Problem, lr: float, steps: int = 40, X0: float = 1e-3, planted: dict | None = None, **flow_options
) -> nf.Trajectory:
    """The oscillation flow with the ``planted`` revisions (default PLANTED) from ``theta0`` and ``X = X0 I``,
    recorded as GD would be (the measured oscillation amplitude along each tracked direction is ``sqrt(X_ii)``)."""
    flow = OscillationFlow(problem, lr, **flow_options)
    truth = Hybrid(flow, library(problem, lr, PLANTED if planted is None else planted))
    y0 = flow.join(problem.theta0, flow.extra_from_covariance(X0 * torch.eye(flow.n_track, dtype=torch.float64)))
    t = torch.arange(steps + 1, dtype=torch.float64)
    with torch.no_grad():
        y = odeint(truth, y0, t, method="rk4", options={"step_size": 0.5})
    theta, extra = flow.split(y)
    amp = flow.covariance(extra).diagonal(dim1=1, dim2=2).sqrt()
    loss = torch.stack([problem.loss(th) for th in theta]).detach()
    nan = torch.full_like(loss, math.nan)
    step = (theta[1:] - theta[:-1]).norm(dim=1)
    step = torch.cat([step, step[-1:]])
    history = {"step": t.long(), "oscillation": amp, "oscillation_total": amp.pow(2).sum(1), "smoothed_step": step}
    return nf.Trajectory(lr, t.long(), theta, loss, nan, nan[:, None], nan, problem.description, history)


def central_differences(model: Hybrid, trajectory: nf.Trajectory, h: float = 1e-6) -> torch.Tensor:
    out = []
    for p in model.parameters():
        with torch.no_grad():
            p += h
        up = fit_loss(model, trajectory, method="direct", **OPTIONS)[0]
        with torch.no_grad():
            p -= 2 * h
        down = fit_loss(model, trajectory, method="direct", **OPTIONS)[0]
        with torch.no_grad():
            p += h
        out.append((up - down) / (2 * h))
    return torch.tensor(out, dtype=torch.float64)


def model_at(problem: nf.Problem, lr: float, **flow_options) -> Hybrid:
    return Hybrid(
        OscillationFlow(problem, lr, **flow_options),
        library(problem, lr, {"floquet": 0.03, "drift": 0.05, "floor": 0.2}),
    )


def test_adjoint_gradient_through_the_covariance_is_exact_where_eigenvectors_are_constant():
    p = quartic()
    options = {"n_track": 1, "q": 1e-6, "eig_tol": 1e-10}
    traj = flow_trajectory(p, LR, **options)
    model = model_at(p, LR, **options)
    loss_a, grad_a = fit_loss(model, traj, method="adjoint", **OPTIONS)
    loss_d, grad_d = fit_loss(model, traj, method="direct", **OPTIONS)
    assert loss_a == pytest.approx(loss_d, rel=1e-12) and loss_a > 0
    assert bool((grad_d.abs() > 0).all())
    torch.testing.assert_close(grad_a, grad_d, rtol=1e-5, atol=0)
    # backpropagation through the solver is the derivative of the discrete solution: central differences agree
    # to their own truncation error; the floor's gradient is 1e4 times smaller than the others
    torch.testing.assert_close(grad_d, central_differences(model, traj), rtol=1e-5, atol=1e-10)


@pytest.mark.slow  # tight eigen-solves (tol 1e-10) at every evaluation: about 30 s
def test_frozen_eigenvector_gradient_on_a_tanh_net_is_within_its_approximation():
    p = tanh_net()
    lr = 2.05 / float(top_eigenpairs(p, p.theta0, k=1, tol=1e-10).values[0])  # just past the edge of stability
    options = {"n_track": 2, "q": 1e-6, "eig_tol": 1e-10}
    traj = flow_trajectory(p, lr, steps=20, **options)
    model = model_at(p, lr, **options)
    grad_d = fit_loss(model, traj, method="direct", **OPTIONS)[1]
    exact = central_differences(model, traj)
    # the gradient holds the eigenvectors fixed and leaves out their rotation dU/dtheta, whose effect on the
    # loss is of relative size |dtheta| |D3L| / (eigenvalue gap) over a window: measured 0.6 to 0.9 percent here
    rel = ((grad_d - exact).abs() / exact.abs()).max()
    assert rel < 0.02, (grad_d, exact)


def test_backward_error_term_is_the_modified_equations_off_the_tracked_directions():
    """``PHg``'s unit field is ``-lr^2 (I - U U^T) H g`` with ``U`` the tracked eigenvectors: dense algebra."""
    p = tanh_net()
    lr = 2.05 / float(top_eigenpairs(p, p.theta0, k=1, tol=1e-10).values[0])
    flow = OscillationFlow(p, lr, n_track=2, q=1e-6, eig_tol=1e-10)
    y = flow.join(p.theta0, flow.extra_from_covariance(1e-3 * torch.eye(2, dtype=torch.float64)))
    base, fields = flow.hidden_fields(torch.zeros((), dtype=torch.float64), y, ["PHg"])
    H = dense_hessian(p, p.theta0)
    U = torch.linalg.eigh(H).eigenvectors[:, -2:]
    expected = -(lr**2) * (torch.eye(p.dim, dtype=torch.float64) - U @ U.T) @ H @ gradient(p, p.theta0)
    field = fields["PHg"][0]
    torch.testing.assert_close(field[: p.dim], expected, rtol=1e-7, atol=1e-12)
    assert bool((field[p.dim :] == 0).all())  # a theta term: the covariance's equation is the physics'
    # along the tracked directions the series in lr lambda ~ 2 does not converge: the term leaves them alone
    assert float((U.T @ field[: p.dim]).abs().max()) < 1e-9 * float(expected.norm())
    assert float(expected.norm()) > 1e-3 * float(base[0, : p.dim].norm())
    # order=1 is that physics: the same right-hand side plus the term at GD's coefficient 1/2, in dm/dt only
    discrete = OscillationFlow(p, lr, n_track=2, q=1e-6, eig_tol=1e-10, order=1)
    assert discrete.hidden_coefficients()["PHg"] == 0.5 and flow.hidden_coefficients()["PHg"] == 0.0
    assert "modified-equation-off-tracked" in [a.name for a in discrete.approximations]
    base_1 = discrete.hidden_fields(torch.zeros((), dtype=torch.float64), y, [])[0]
    torch.testing.assert_close(base_1[0, : p.dim] - base[0, : p.dim], 0.5 * expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(base_1[0, p.dim :], base[0, p.dim :], rtol=1e-10, atol=0)
    with pytest.raises(nf.InputError, match="order must be 0"):
        OscillationFlow(p, lr, order=2)


def test_backward_error_field_is_differentiable_for_the_adjoint():
    """With the state requiring grad, the ``PHg`` field's Jacobian is that of ``-lr^2 P H(theta) g(theta)`` with
    ``P`` held fixed (the adiabatic eigenvectors), D3L and H^2 parts included."""
    p = tanh_net()
    lr = 2.05 / float(top_eigenpairs(p, p.theta0, k=1, tol=1e-10).values[0])
    flow = OscillationFlow(p, lr, n_track=2, q=1e-6, eig_tol=1e-10)
    X = flow.extra_from_covariance(1e-3 * torch.eye(2, dtype=torch.float64))
    t = torch.zeros((), dtype=torch.float64)

    def field(theta: torch.Tensor) -> torch.Tensor:
        return flow.hidden_fields(t, flow.join(theta, X), ["PHg"])[1]["PHg"][0, : p.dim]

    jac = torch.autograd.functional.jacobian(field, p.theta0.clone())
    assert flow.last is not None
    U = flow.last.vectors
    P = torch.eye(p.dim, dtype=torch.float64) - U.T @ U

    def reference(theta: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(p.loss(theta), theta, create_graph=True)
        (Hg,) = torch.autograd.grad(g, theta, g, create_graph=True)
        return -(lr**2) * P @ Hg

    expected = torch.autograd.functional.jacobian(reference, p.theta0.clone(), create_graph=False)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(jac, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.slow  # tight eigen-solves along 40 steps of a turning eigenbasis: about 30 s
def test_fit_recovers_a_planted_backward_error_coefficient_beside_the_oscillation_terms():
    """GD's discrete steps planted as ``PHg`` at 0.4 (theory 1/2) on the turning eigenvectors of a tanh net past the
    edge, with the growth and drift revised too: the adjoint fit from the continuous-time physics finds all three."""
    p = tanh_net()
    lr = 2.05 / float(top_eigenpairs(p, p.theta0, k=1, tol=1e-10).values[0])
    options = {"n_track": 2, "q": 1e-6, "eig_tol": 1e-10}
    planted = {**PLANTED, "PHg": 0.4}
    traj = flow_trajectory(p, lr, steps=40, X0=1e-2, planted=planted, **options)
    model = Hybrid(OscillationFlow(p, lr, **options), HiddenStateLibrary(p, lr, terms=list(planted)))
    res = fit(model, traj, method="adjoint", optimizer="gauss-newton", progress=False, **OPTIONS)
    assert res.coefficients == pytest.approx({"floquet": 2.2, "drift": 0.45, "PHg": 0.4}, rel=0.02), res.coefficients
    assert res.hybrid_error < 1e-4 * res.physics_error


@pytest.fixture(scope="module")
def cycling():
    """The planted quartic through a self-stabilisation cycle (sharpness above and below 2/lr, X from 0.3 to 1.8)."""
    return flow_trajectory(quartic(), LR, steps=80, X0=0.3, n_track=1, q=1e-6, eig_tol=1e-10)


def test_fit_started_away_from_the_physics_recovers_the_planted_coefficients(cycling):
    p = quartic()
    lib = HiddenStateLibrary(p, LR, terms=["floquet", "drift"], init={"floquet": 1.0, "drift": 1.0})
    model = Hybrid(OscillationFlow(p, LR, n_track=1, q=1e-6, eig_tol=1e-10), lib)
    start = {n: float(c.detach()) for n, c in lib.coefficients(model.flow).items()}
    assert start == pytest.approx({"floquet": 1.0, "drift": 1.0}, rel=1e-12)
    res = fit(model, cycling, method="adjoint", progress=False, **{**OPTIONS, "val_fraction": 0.25})
    assert res.coefficients == pytest.approx({"floquet": 2.2, "drift": 0.45}, rel=1e-6), res.coefficients
    assert res.hybrid_error < 1e-9 * res.physics_error


def test_measured_variance_enters_the_loss_in_log_scale_with_its_weight(cycling):
    p = quartic()
    options = {"n_track": 1, "q": 1e-6, "eig_tol": 1e-10}
    truth = Hybrid(OscillationFlow(p, LR, **options), library(p, LR, PLANTED))
    assert fit_loss(truth, cycling, variance_weight=1.0, **OPTIONS)[0] < 1e-20
    model = Hybrid(OscillationFlow(p, LR, **options), library(p, LR, {"floquet": -0.5, "drift": 1.0}))
    loss = [fit_loss(model, cycling, variance_weight=w, **OPTIONS)[0] for w in (0.0, 1.0, 2.0)]
    assert loss[1] - loss[0] > 0.01 * loss[0]
    assert loss[2] - loss[0] == pytest.approx(2 * (loss[1] - loss[0]), rel=1e-9)
    # the variance part is the mean over the outputs where the measurement counts: hide steps 25-34 and the mean
    # runs over the other outputs, compared here with the model's tr X solved window by window
    amplitude = cycling.history["oscillation"].clone()
    amplitude[25:35] = math.nan
    hidden = nf.Trajectory(**{**cycling.__dict__, "history": {**cycling.history, "oscillation": amplitude}})
    loss = [fit_loss(model, hidden, variance_weight=w, **OPTIONS)[0] for w in (0.0, 1.0)]
    window = OPTIONS["window"]
    gaps = []
    for start in range(0, len(cycling) - 1, window):  # every window trains (val_fraction 0)
        with torch.no_grad():
            x0 = cycling.iterates[start]
            y0 = model.flow.join(x0, model.flow.initial_extra(x0, cycling, start))
            sol = odeint(
                model, y0, torch.arange(window + 1, dtype=torch.float64), method="rk4", options={"step_size": 0.5}
            )
        s_model = model.flow.predicted_variance(model.flow.split(sol[1:])[1])
        gaps.append(torch.log(s_model) - torch.log(hidden.oscillation.variance[start + 1 : start + window + 1]))
    gap = torch.cat(gaps)
    assert int(torch.isnan(gap).sum()) == 10
    assert loss[1] - loss[0] == pytest.approx(float(gap[~torch.isnan(gap)].square().mean()), rel=1e-6)


def test_validation_loss_is_the_fit_loss_with_its_variance_part(cycling):
    """The validation loss that picks the returned parameters is the loss the fit minimises, on the validation
    windows: with a variance weight ``w`` it grows by ``w`` times their mean squared log-variance gap (scored on
    ``theta`` alone, a fit that trades ``theta`` against the variance would return its start)."""
    p = quartic()
    settings = {**OPTIONS, "window": 10, "val_fraction": 0.25}
    val = []
    for w in (0.0, 1.0, 2.0):
        model = Hybrid(
            OscillationFlow(p, LR, n_track=1, q=1e-6, eig_tol=1e-10), library(p, LR, {"floquet": -0.5, "drift": 1.0})
        )
        res = fit(
            model,
            cycling,
            method="adjoint",
            optimizer="gauss-newton",
            max_iters=1,
            min_norm=0.0,
            variance_weight=w,
            progress=False,
            **settings,
        )
        val.append(res.history[0]["val_loss"])  # at the start, the same parameters for every weight
    assert val[1] - val[0] > 1e-4 * val[0]
    assert val[2] - val[0] == pytest.approx(2 * (val[1] - val[0]), rel=1e-9)


def test_variance_weight_is_checked():
    p = quartic()
    traj = flow_trajectory(p, LR, steps=20, n_track=1, q=1e-6)
    model = Hybrid(OscillationFlow(p, LR, n_track=1, q=1e-6), library(p, LR, {"floquet": 0.0}))
    with pytest.raises(nf.InputError, match="variance_weight must be"):
        fit_loss(model, traj, variance_weight=-1.0, **OPTIONS)
    with pytest.raises(nf.InputError, match="predicts none"):
        fit(Hybrid(nf.flows.GradientFlow(p, LR), None), traj, window=20, variance_weight=1.0, progress=False)
    unmeasured = nf.Trajectory(
        **{**traj.__dict__, "history": {**traj.history, "oscillation": traj.history["oscillation"] * 0}}
    )
    with pytest.raises(nf.InputError, match="no measured oscillation variance above its floor"):
        fit_loss(model, unmeasured, variance_weight=1.0, **OPTIONS)
    with pytest.raises(nf.InputError, match="init must give finite coefficients"):
        HiddenStateLibrary(p, LR, terms=["floquet"], init={"drift": 1.0})
    with pytest.raises(nf.InputError, match="init must give finite coefficients"):
        HiddenStateLibrary(p, LR, terms=["floquet"], init={"floquet": math.nan})
