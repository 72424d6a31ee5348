"""Fitting corrections to GD: recovery of the modified equation, sparse data, planted terms, gradients, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torchdiffeq import odeint

import neuralflow as nf
from neuralflow.corrections import Hybrid, TermLibrary
from neuralflow.fit import fit, fit_loss
from neuralflow.flows import GradientFlow

THEORY = {"Hg": -1 / 2, "H2g": -1 / 3, "D3gg": -1 / 12}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny double-backward graphs are dominated by thread start-up; one thread is much faster here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tanh_net(inputs: int = 5, hidden: int = 8, n: int = 50, seed: int = 0) -> nf.Problem:
    """Two-layer tanh net on a sin target (the recovery problem of bench_fit.py; 57 parameters by default)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).double()
    x = torch.randn(n, inputs, dtype=torch.float64)
    return nf.problems.from_module(net, x, torch.sin(x.sum(1, keepdim=True)))


def every(traj: nf.Trajectory, k: int) -> nf.Trajectory:
    """The same GD run as recorded with ``store_every=k`` (every k-th iterate)."""
    keep = slice(None, None, k)
    return replace(
        traj,
        steps=traj.steps[keep],
        iterates=traj.iterates[keep],
        loss=traj.loss[keep],
        grad_norm=traj.grad_norm[keep],
        sharpness=traj.sharpness[keep],
        update_u=traj.update_u[keep],
    )


def library_model(problem: nf.Problem, lr: float, terms: list[str]) -> Hybrid:
    return Hybrid(GradientFlow(problem, lr), TermLibrary(problem, lr, terms))


def planted(problem: nf.Problem, lr: float, **coefficients: float) -> Hybrid:
    """Gradient flow plus constant-coefficient terms set to ``coefficients``: the law behind planted data."""
    model = library_model(problem, lr, list(coefficients))
    with torch.no_grad():
        for name, value in coefficients.items():
            model.correction.constants[name].fill_(value)
    return model


def simulated(model: Hybrid, steps: int, store_every: int = 1, theta0: torch.Tensor | None = None) -> nf.Trajectory:
    """Data from a known hybrid ODE (RK4, 2 substeps per step), packaged as a trajectory."""
    p = model.problem
    t = torch.arange(0, steps + 1, store_every, dtype=torch.float64)
    with torch.no_grad():
        x = odeint(model, p.theta0 if theta0 is None else theta0, t, method="rk4", options={"step_size": 0.5})
    nan = torch.full((len(t),), math.nan, dtype=torch.float64)
    return nf.Trajectory(
        lr=model.lr,
        steps=t.long(),
        iterates=x,
        loss=nan,
        grad_norm=nan,
        sharpness=nan[:, None],
        update_u=nan,
        problem=p.description,
    )


def relative_errors(coefficients: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    return {k: abs(coefficients[k] - v) / abs(v) for k, v in truth.items()}


# ------------------------------------------------------------------------------------- the acceptance tests
@pytest.fixture(scope="module")
def gd_run() -> tuple[nf.Problem, nf.Trajectory]:
    p = tanh_net()
    return p, nf.run_gd(p, 0.02, 500, eig_every=100, progress=False)


@pytest.mark.slow
def test_recovers_the_modified_equation_from_every_step(gd_run):
    p, traj = gd_run
    res = fit(library_model(p, 0.02, ["Hg", "H2g", "D3gg"]), traj, window=50, progress=False)
    err = relative_errors(res.coefficients, THEORY)
    assert max(err.values()) < 0.05, res.coefficients
    assert res.hybrid_error < 1e-3 * res.physics_error
    assert len(res.history) <= 6  # Gauss-Newton: a handful of iterations
    for name in THEORY:  # the systematic O(lr^4) bias is not noise: the error bars are small but honest
        assert 0 < res.uncertainty[name] < 0.05 * abs(THEORY[name])


@pytest.mark.slow
def test_sparse_recording_ode_fit_succeeds_where_regression_fails(gd_run):
    p, dense = gd_run
    sparse = every(dense, 10)
    assert sparse.store_every == 10
    reg = fit(library_model(p, 0.02, ["Hg", "H2g", "D3gg"]), sparse, window=50, method="regression", progress=False)
    ode = fit(library_model(p, 0.02, ["Hg", "H2g", "D3gg"]), sparse, window=50, progress=False)
    reg_err = relative_errors(reg.coefficients, THEORY)
    ode_err = relative_errors(ode.coefficients, THEORY)
    assert max(ode_err.values()) < 0.05, ode.coefficients
    # derivative regression on every-10-steps data gets the second-order terms wrong, even their sign
    assert reg_err["H2g"] > 1 and reg_err["D3gg"] > 1, reg.coefficients
    assert reg.coefficients["D3gg"] > 0
    assert ode.hybrid_error < 1e-2 * reg.hybrid_error


@pytest.mark.slow
def test_first_order_term_alone_tends_to_minus_one_half_as_lr_shrinks():
    p = tanh_net()
    errs = []
    for lr in (0.04, 0.01):
        traj = nf.run_gd(p, lr, 200, eig_every=100, progress=False)
        res = fit(library_model(p, lr, ["Hg"]), traj, window=50, progress=False)
        errs.append(abs(res.coefficients["Hg"] + 0.5) / 0.5)
    assert errs[1] < 0.05
    assert errs[1] < 0.75 * errs[0]  # the bias from the missing O(lr^3) terms shrinks with lr (measured 1.4% -> 0.8%)


def test_planted_corrections_are_fitted_back():
    p = tanh_net(inputs=3, hidden=4, n=20)
    lr = 0.2
    data = simulated(planted(p, lr, Hg=-0.8, D3gg=0.6), 60, store_every=4)
    res = fit(library_model(p, lr, ["Hg", "D3gg"]), data, window=20, min_norm=0.0, step_size=0.5, progress=False)
    assert res.settings["init_used"] == "regression"
    assert relative_errors(res.coefficients, {"Hg": -0.8, "D3gg": 0.6}) == pytest.approx({"Hg": 0, "D3gg": 0}, abs=0.01)
    assert res.hybrid_error < 1e-6 * res.physics_error


def test_adjoint_direct_and_finite_difference_gradients_agree():
    p = tanh_net(inputs=2, hidden=3, n=10)
    lr = 0.3
    data = simulated(Hybrid(GradientFlow(p, lr), None), 12, store_every=2)
    model = library_model(p, lr, ["Hg", "H2g"])
    with torch.no_grad():
        model.correction.constants["Hg"].fill_(-0.3)
        model.correction.constants["H2g"].fill_(0.2)
    # adjoint (continuous adjoint, solved backwards) against backpropagation, both to tight tolerances
    tight = dict(window=4, min_norm=0.1, solver="dopri5", rtol=1e-11, atol=1e-13)
    loss_a, grad_a = fit_loss(model, data, method="adjoint", **tight)
    loss_d, grad_d = fit_loss(model, data, method="direct", **tight)
    assert loss_a == pytest.approx(loss_d, rel=1e-12)
    assert float((grad_a - grad_d).norm()) <= 1e-5 * float(grad_d.norm())
    # backpropagation through a fixed grid is the exact gradient of the discrete loss: central differences
    fixed = dict(window=4, min_norm=0.1, solver="rk4", step_size=0.5)
    _, grad = fit_loss(model, data, method="direct", **fixed)
    fd = torch.zeros(2, dtype=torch.float64)
    h = 1e-5
    for j, name in enumerate(model.correction.constants):  # model.parameters() order
        c = model.correction.constants[name]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                c += sign * h
            values.append(fit_loss(model, data, method="direct", **fixed)[0])
            with torch.no_grad():
                c -= sign * h
        fd[j] = (values[0] - values[1]) / (2 * h)
    assert float((grad - fd).norm()) <= 1e-5 * float(fd.norm())
    _, grad_fixed_adjoint = fit_loss(model, data, method="adjoint", **fixed)
    assert float((grad_fixed_adjoint - grad).norm()) <= 1e-3 * float(grad.norm())  # O(step^4) discretisation gap


def test_fit_is_reproducible_bit_for_bit_and_reports_everything():
    p = tanh_net(inputs=2, hidden=3, n=10)
    lr = 0.3
    data = simulated(planted(p, lr, Hg=-0.5), 40)
    runs = [
        fit(library_model(p, lr, ["Hg", "g"]), data, window=10, step_size=0.5, init="current", progress=False)
        for _ in (0, 1)
    ]
    assert runs[0].coefficients == runs[1].coefficients
    assert runs[0].history == [{**h, "time": runs[0].history[i]["time"]} for i, h in enumerate(runs[1].history)]
    res = runs[0]
    assert res.coefficients["Hg"] == pytest.approx(-0.5, abs=1e-3) and abs(res.coefficients["g"]) < 1e-3
    assert set(res.uncertainty) == {"Hg", "g"}
    assert res.window_errors.shape == res.physics_window_errors.shape == (4,)
    assert int(res.windows["validation"].sum()) == 1
    assert res.physics_error > 100 * res.hybrid_error
    assert res.settings["window"] == 10 and res.settings["optimizer_used"] == "gauss-newton"
    assert res.trajectory is data and res.n_function_evals > 0 and res.timing["total"] > 0
    assert "Hg=" in repr(res)


def test_coefficient_profile_follows_a_coefficient_that_changes_in_time():
    # the first 40 steps come from Hg = -0.8, the next 40 from Hg = +0.4: a law of time, not of the state
    p = tanh_net(inputs=3, hidden=4, n=20)
    lr = 0.2
    first = simulated(planted(p, lr, Hg=-0.8), 40)
    second = simulated(planted(p, lr, Hg=0.4), 40, theta0=first.iterates[-1])
    data = replace(
        first,
        steps=torch.cat([first.steps, second.steps[1:] + 40]),
        iterates=torch.cat([first.iterates, second.iterates[1:]]),
        **{
            k: torch.cat([getattr(first, k), getattr(second, k)[1:]])
            for k in ("loss", "grad_norm", "sharpness", "update_u")
        },
    )
    model = library_model(p, lr, ["Hg"])
    prof = nf.coefficient_profile(model, data, bin=10, target="iterates")
    assert prof["step"].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    c = prof["coefficients"]["Hg"]
    # bins away from the switch (whose 5-point stencils straddle it) recover each constant
    assert c[:3].tolist() == pytest.approx([-0.8] * 3, rel=5e-3)
    assert c[5:].tolist() == pytest.approx([0.4] * 3, rel=5e-3)
    assert float(prof["unexplained"][[0, 1, 2, 5, 6, 7]].max()) < 1e-4
    assert float(prof["unexplained"][3:5].max()) > 1e-3  # the switch cannot be one constant
    # excluding the switch drops those bins, and a fit of one constant without them sits between the two
    prof = nf.coefficient_profile(model, data, bin=10, target="iterates", exclude=[(38, 42)])
    assert prof["step"].tolist() == [0, 10, 20, 50, 60, 70]
    res = fit(model, data, window=10, method="regression", exclude=[(38, 42)], progress=False)
    assert res.settings["exclude"] == [[38, 42]]  # lists, as a checkpoint's JSON gives them back
    assert res.windows["step"].tolist() == [0, 10, 20, 50, 60, 70]
    assert -0.8 < res.coefficients["Hg"] < 0.4
    with pytest.raises(nf.InputError, match="removes every window"):
        fit(model, data, window=10, exclude=[(0, 80)], progress=False)
    with pytest.raises(nf.InputError, match="start < stop"):
        fit(model, data, window=10, exclude=[(50, 40)], progress=False)
    with pytest.raises(nf.InputError, match="pairs"):
        fit(model, data, window=10, exclude=[5], progress=False)
    with pytest.raises(nf.InputError, match="pairs"):
        fit(model, data, window=10, exclude=[(40, math.inf)], progress=False)
    open_ended = nf.coefficient_profile(model, data, bin=10, target="iterates", exclude=[(38, None)])
    assert open_ended["step"].tolist() == [0, 10, 20]
    assert open_ended["coefficients"]["Hg"].tolist() == pytest.approx([-0.8] * 3, rel=5e-3)


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small() -> tuple[nf.Problem, nf.Trajectory]:
    p = tanh_net(inputs=2, hidden=3, n=10)
    return p, simulated(Hybrid(GradientFlow(p, 0.3), None), 30)


def test_a_fit_integrates_with_the_flow_s_own_solver_unless_told_otherwise(small):
    p, traj = small

    class EulerFlow(GradientFlow):  # a physics that, like the central and oscillation flows, names its integrator
        solver = {"method": "euler", "options": {"step_size": 0.25}}

    kw = {"window": 10, "max_iters": 1, "progress": False}
    own = fit(Hybrid(EulerFlow(p, 0.3), TermLibrary(p, 0.3, ["Hg"])), traj, **kw)
    assert (own.settings["solver"], own.settings["step_size_used"]) == ("euler", 0.25)
    told = fit(Hybrid(EulerFlow(p, 0.3), TermLibrary(p, 0.3, ["Hg"])), traj, solver="rk4", step_size=0.5, **kw)
    assert (told.settings["solver"], told.settings["step_size"]) == ("rk4", 0.5)
    assert fit(library_model(p, 0.3, ["Hg"]), traj, **kw).settings["solver"] == "rk4"
    # the windows were solved as recorded: Euler in quarter steps misses gradient flow's exact solution by more
    assert own.physics_error > 10 * told.physics_error


def test_bad_input_is_refused_with_advice(small):
    p, data = small
    model = library_model(p, 0.3, ["Hg"])
    with pytest.raises(nf.InputError, match="longer run"):
        fit(model, data, window=50, progress=False)
    other = tanh_net(inputs=2, hidden=4, n=10)
    with pytest.raises(nf.InputError, match="parameters"):
        fit(library_model(other, 0.3, ["Hg"]), data, progress=False)
    with pytest.raises(nf.InputError, match="lr=0.3 but the model uses lr=0.1"):
        fit(library_model(p, 0.1, ["Hg"]), data, progress=False)
    bad = data.iterates.clone()
    bad[17, 0] = math.nan
    with pytest.raises(nf.InputError, match="not finite from step 17"):
        fit(model, replace(data, iterates=bad), window=10, progress=False)
    with pytest.raises(nf.InputError, match="multiple of the recording interval"):
        fit(model, every(data, 3), window=10, progress=False)
    with pytest.raises(nf.InputError, match="unknown solver"):
        fit(model, data, window=10, solver="rk5", progress=False)
    with pytest.raises(nf.InputError, match="Hybrid"):
        fit(GradientFlow(p, 0.3), data, window=10, progress=False)
    free_form = Hybrid(GradientFlow(p, 0.3), nf.corrections.NeuralCorrection(p, 0.3, hidden=4))
    with pytest.raises(nf.InputError, match="needs a TermLibrary"):
        fit(free_form, data, window=10, method="regression", progress=False)


class _Exploding(TermLibrary):
    """A library whose right-hand side turns NaN once its Hg coefficient passes -0.25."""

    def vector_field(self, t, state):
        out = super().vector_field(t, state)
        return out * math.nan if float(self.constants["Hg"].detach()) < -0.25 else out


def test_solver_failure_stops_with_a_clear_error_and_keeps_the_best_parameters(small):
    p, _ = small
    lr = 0.3
    data = simulated(planted(p, lr, Hg=-0.5), 30)
    model = Hybrid(GradientFlow(p, lr), _Exploding(p, lr, ["Hg"]))
    with pytest.raises(nf.DivergenceError, match="underflow in dt.*best parameters so far") as info:
        fit(
            model, data, window=10, solver="dopri5", optimizer="adam", learning_rate=0.1, init="current", progress=False
        )
    kept = float(model.correction.constants["Hg"].detach())
    assert -0.25 <= kept < -0.1  # the last good iterate of Adam, not the one that failed
    assert info.value.partial["model"] is model
    assert len(info.value.partial["history"]) >= 2
    # the regression needs no ODE solve; its final window solves fail, and the fitted coefficient is kept
    model = Hybrid(GradientFlow(p, lr), _Exploding(p, lr, ["Hg"]))
    with pytest.raises(nf.DivergenceError, match="final window solves") as info:
        fit(model, data, window=10, method="regression", progress=False)
    assert float(model.correction.constants["Hg"].detach()) == pytest.approx(-0.5, rel=0.05)
    assert info.value.partial["model"] is model
