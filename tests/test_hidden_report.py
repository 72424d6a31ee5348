"""The report's view of hidden state: a fitted hidden-state correction beside its theory, its equations in every
rendering, the hidden-state diagnostic (fires on a history-dependent field, not on a state-only one), and the
ladder with a rung that carries extra state."""

from __future__ import annotations

import io
import json
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.mathtext  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_hidden_state import LR, SOLVER, PlantedHidden, damian, library, planted_problem, planted_trajectory  # noqa: E402

import neuralflow as nf  # noqa: E402
from neuralflow.corrections import Hybrid, TermLibrary  # noqa: E402
from neuralflow.fit import fit  # noqa: E402
from neuralflow.flows import CentralFlow, GradientFlow, OscillationFlow  # noqa: E402
from neuralflow.report import Report  # noqa: E402
from neuralflow.report.equations import equation_latex, equation_text, extra_equation  # noqa: E402
from neuralflow.report.hidden import hidden_state_evidence, history_approximation  # noqa: E402


def _render_math(equation: str) -> None:
    matplotlib.mathtext.math_to_image(f"${equation}$", io.BytesIO(), dpi=50, format="png")


# ------------------------------------------------------------------------- a hidden-state correction


@pytest.fixture(scope="module")
def planted_fit():
    """The planted two-variable system (growth 2.2, drift coupling 0.45; physics 2 and 1/2) fitted with a floor."""
    p = planted_problem()
    model = Hybrid(PlantedHidden(p, LR), library(p, terms=("floquet", "drift", "floor")))
    return fit(model, planted_trajectory(), window=20, progress=False, **SOLVER)


def test_report_of_a_hidden_state_fit_puts_each_coefficient_beside_its_theory(planted_fit):
    report = planted_fit.report()
    rows = {t.name: t for t in report.terms}
    assert report.source == "hidden-state" and report.verdict == "revise" and report.closed > 0.99
    assert rows["floquet"].coefficient == pytest.approx(2.2, rel=1e-6) and rows["floquet"].theory == 2
    assert rows["drift"].coefficient == pytest.approx(0.45, rel=1e-6) and rows["drift"].theory == 0.5
    assert rows["floor"].theory == 0  # the flow's q
    assert rows["floquet"].approximation.name == "linear-floquet-growth"
    assert rows["drift"].approximation.name == "second-order-oscillation"
    # leave-one-out shares: both revisions matter, the floor (fitted ~0, as planted) does not; they add to closed
    assert rows["drift"].share > 0.1 and rows["floquet"].share > 0.1 and abs(rows["floor"].share) < 1e-3
    assert sum(t.share for t in report.terms) == pytest.approx(report.closed, rel=1e-9)
    # gap and shares over all windows, training and held out; the held-out figures are a note
    held_out = planted_fit.windows["validation"]
    assert 0 < int(held_out.sum()) < len(held_out)
    assert report.physics_error == pytest.approx(float(planted_fit.physics_window_errors.mean()), rel=1e-12)
    assert report.hybrid_error == pytest.approx(float(planted_fit.window_errors.mean()), rel=1e-12)
    assert report.physics_error != pytest.approx(planted_fit.physics_error, rel=1e-3)
    assert any(f"over all {len(held_out)} windows" in n and "held-out" in n for n in report.notes)
    assert [t.name for t in report.terms][:2] == sorted(["drift", "floquet"], key=lambda n: -rows[n].share)
    text = str(report)
    assert re.search(r"^1\s+(drift|floquet)\s+\S+%\s+(0\.45|2\.2)\d* \+- \S+\s+(1/2|2)\s+", text, re.M)
    assert "  dtheta/dt = F_planted-hidden(theta) - 0.45 lr grad <H, Sigma>\n" in text
    assert re.search(r"  ds/dt = 2\.2 s log\|1 - lr lambda\| [+-] \S+\n", text)
    assert "giving floquet the coefficient 2.2" in text and "(theory 2)" in text
    # every rendering works and says the same
    md, tex, html = report.to_markdown(), report.to_latex(), report._repr_html_()
    assert r"\frac{ds}{dt}=2.2\,s\log|1-\eta\lambda|" in md and report.equation() in tex
    assert "second-order-oscillation" in html and "<table" in html
    _render_math(report.equation())
    back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert str(back) == text and back.to_latex() == tex
    assert set(report.figures()) == {"dynamics", "contributions"}
    assert set(report.contributions) == {"step", "floquet", "drift", "floor"}
    plt.close("all")


def test_oscillation_flow_equations_print_in_matrix_form():
    """The oscillation flow's covariance equation, e.g. ``dX/dt = 2.03 (R X + X R)/2 + 1.1e-20 I``."""
    flow = OscillationFlow(damian(), LR, q=1e-20, n_track=2)
    eq = extra_equation(flow, {"floquet": 2.03, "drift": 0.49, "amplitude": -0.5})
    theta, extra, where = equation_text(eq)
    assert theta == "dtheta/dt = -lr g - 0.49 lr grad <H, Sigma>"
    assert extra == "dX/dt = 2.03 (R X + X R)/2 - 0.5 X X + 1e-20 I"  # the floor is the physics' q (not fitted)
    assert "R = diag(log|1 - lr lambda_i|)" in where and "Sigma = U^T X U" in where and "lag" not in where
    lagged = OscillationFlow(damian(), LR, q=1e-20, n_track=2, lag=0.125)
    assert "the couplings lag 0.125 steps (X - 0.125 dX/dt in the drift" in equation_text(extra_equation(lagged, {}))[2]
    lagged_latex = equation_latex(extra_equation(lagged, {}))
    assert lagged_latex.endswith(r",\quad \tau_{\mathrm{lag}}=0.125") and r"\tau" not in equation_latex(eq)
    _render_math(lagged_latex)
    latex = equation_latex(eq)
    assert latex == (
        r"\frac{d\theta}{dt}=-\eta\,g-0.49\,\eta\,\nabla\langle H,\Sigma\rangle,\quad "
        r"\frac{dX}{dt}=2.03\,\frac{RX+XR}{2}-0.5\,X^{2}+1\times 10^{-20}\,I"
    )
    _render_math(latex)
    # with GD's backward-error term (order=1) the theta equation carries it, as the term library writes Hg
    discrete = OscillationFlow(damian(), LR, q=1e-20, n_track=2, order=1)
    theta, extra, where = equation_text(extra_equation(discrete, {"PHg": 0.6}))
    assert theta == "dtheta/dt = -lr g - 0.5 lr grad <H, Sigma> - 0.6 lr^2 P H g"
    assert extra == "dX/dt = 2 (R X + X R)/2 + 1e-20 I" and "P = I - U U^T" in where
    latex = equation_latex(extra_equation(discrete, {}))
    assert r"-0.5\,\eta^{2}\,PHg" in latex
    _render_math(latex)


# ------------------------------------------------------------------------------------ the diagnostic

DIAG_LR, PERIOD, STEPS = 0.05, 40, 200
A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))


def _reparametrised_run(tau) -> tuple[nf.Problem, nf.Trajectory]:
    """``theta(t) = exp(-lr A tau(t)) theta_0``: exactly ``dtheta/dt = -lr (1 - h(t)) g`` with ``h = 1 - tau'``.

    The needed correction is ``h(t)`` times the ``g`` term; the state at time ``t`` depends on ``tau(t)`` alone.
    """
    p = nf.problems.quadratic(A, theta0=[1.0, 1.0])
    t = torch.arange(STEPS + 1, dtype=torch.float64)
    xs = torch.exp(-DIAG_LR * tau(t)[:, None] * A.diagonal()[None, :]) * p.theta0
    nan = torch.full((STEPS + 1,), math.nan, dtype=torch.float64)
    return p, nf.Trajectory(
        lr=DIAG_LR,
        steps=t.long(),
        iterates=xs,
        loss=p.batched_loss(xs),
        grad_norm=nan.clone(),
        sharpness=nan[:, None].clone(),
        update_u=nan.clone(),
        problem=p.description,
    )


def _state_only_fit(tau):
    p, traj = _reparametrised_run(tau)
    model = Hybrid(GradientFlow(p, DIAG_LR), TermLibrary(p, DIAG_LR, terms=["g"]))
    return fit(model, traj, window=10, stride=5, progress=False)


def _history(t):
    """``h(t) = 2 sin(2 pi t / P)``: GD-like descent alternating with ascent, so the run passes the same states
    going down and coming back up, needing opposite corrections there (a hidden oscillator, not the state)."""
    return t - (PERIOD / math.pi) * (1 - torch.cos(2 * math.pi * t / PERIOD))


def _history_one_signed(t):
    """``h(t) = 0.8 (1 - cos(2 pi t / P))`` >= 0: against gradient flow the needed correction is "nothing" in one
    pass and "a lot" in the next from the same states (quiet against oscillating); only against the fitted
    state-only correction (about its mean) do they have opposite signs."""
    return t - 0.8 * (t - (PERIOD / (2 * math.pi)) * torch.sin(2 * math.pi * t / PERIOD))


def _state(t):
    """``h(t) = 0.6 (1 - 2 t / N)``: the loss falls monotonically, so ``h`` is a function of the loss (the state);
    the fitted constant leaves a residual that changes sign once, through small values."""
    return t - 0.6 * (t - t * t / STEPS)


@pytest.mark.parametrize("history, verdict", [(_history, "hidden-state"), (_history_one_signed, "revise")])
def test_diagnostic_fires_on_a_history_dependent_field(history, verdict):
    """Fired, the statement comes first and its approximation heads the revisions, whether the fitted constant
    closed little of the gap (verdict "hidden-state" instead of "outside") or more than half (the mean of a
    one-signed h; "revise")."""
    result = _state_only_fit(history)
    report = result.report(max_windows=0)
    ev = report.hidden_state
    assert ev.fired and ev.term == "g" and ev.pairs >= 10
    a, b = ev.example["needed"]
    assert a * b < 0 and min(abs(a), abs(b)) > 0.3  # opposite about the fitted constant, and of the size of h
    assert abs(a - b) > sum(ev.example["within"])
    log_loss = result.trajectory.loss[result.windows["step"]].log()
    loss_a, loss_b = ev.example["features"]["loss"]
    assert abs(math.log(loss_a / loss_b)) <= 0.1 * float(log_loss.max() - log_loss.min())
    assert report.verdict == verdict
    first = report.suggestions()[0]
    assert first.startswith(
        f"A hidden state is missing: {ev.pairs} pairs of windows that start from nearly the "
        "same state (log L within 10 percent of their range along the run) need opposite "
        "corrections along g; e.g. the window at step "
    )
    assert "[no-oscillation]" in first and "nf.OscillationFlow" in first
    assert "outside the library" not in " ".join(report.suggestions())
    approx, share, rows = report.revisions()[0]
    assert approx.name == "no-oscillation" and rows == [] and share == pytest.approx(report.unexplained)
    back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.hidden_state == ev and str(back) == str(report)


def test_diagnostic_fires_on_nothing_against_a_lot():
    """Quiet against oscillating on gradient flow, with a correction that did not settle on the mean: from the same
    states one pass needs no correction and the next a lot (``h >= 0``); same sign, incompatible."""
    result = _state_only_fit(_history_one_signed)
    with torch.no_grad():
        result.model.correction.constants["g"].zero_()
    ev = hidden_state_evidence(result)
    a, b = ev.example["needed"]
    assert ev.fired and a * b > 0 and abs(a - b) > 0.5
    assert "need incompatible corrections along g" in ev.text()


def test_diagnostic_does_not_fire_on_a_state_only_field():
    result = _state_only_fit(_state)
    report = result.report(max_windows=0)
    assert not report.hidden_state.fired and report.hidden_state.windows > 10 and report.verdict == "outside"
    assert "outside the library" in report.suggestions()[-1]
    # without the size rule, the small change of the needed coefficient between neighbouring windows would fire it
    assert hidden_state_evidence(result, min_change=0.0).fired


def test_diagnostic_does_not_fire_on_noise():
    """Gradient flow itself, observed with 1 percent noise per coordinate: a window's slope of the miss is
    noise, and the miss stays below a tenth of the window's motion (the floor ``min_error``)."""
    fired = []
    for seed in range(3):
        p, traj = _reparametrised_run(lambda t: t)
        gen = torch.Generator().manual_seed(seed)
        noisy = traj.iterates * (1 + 0.01 * torch.randn(traj.iterates.shape, generator=gen, dtype=torch.float64))
        noisy[0] = traj.iterates[0]
        traj = nf.Trajectory(**{**traj.__dict__, "iterates": noisy, "loss": p.batched_loss(noisy)})
        result = fit(
            Hybrid(GradientFlow(p, DIAG_LR), TermLibrary(p, DIAG_LR, terms=["g"])),
            traj,
            window=10,
            stride=5,
            progress=False,
        )
        assert not hidden_state_evidence(result).fired
        fired.append(hidden_state_evidence(result, min_error=0.01, z=0.0).fired)
    assert any(fired)  # without the floor and the intervals, noise fires it


def test_diagnostic_ranks_the_quasi_static_approximation_of_the_central_flow():
    p = nf.problems.quadratic(A)
    assert history_approximation(CentralFlow(p, DIAG_LR)).name == "quasi-static-oscillation"
    assert history_approximation(GradientFlow(p, DIAG_LR)).name == "no-oscillation"


# ------------------------------------------------------------------------------------------ the ladder


def test_ladder_fits_a_hidden_state_library_on_a_rung_with_extra_state():
    traj = planted_trajectory()
    p = planted_problem()
    lad = nf.report.ladder(
        traj,
        [GradientFlow(p, LR), PlantedHidden(p, LR)],
        terms=["g"],
        window=20,
        progress=False,
        report_options={"max_windows": 0},
        **SOLVER,
    )
    grad, hidden = lad.results
    assert isinstance(grad.model.correction, TermLibrary)
    assert hidden.model.correction.terms == ["floquet", "floor", "drift"]  # the defaults the planted flow supports
    assert hidden.coefficients["floquet"] == pytest.approx(2.2, rel=0.02)
    assert hidden.coefficients["drift"] == pytest.approx(0.45, rel=0.02)
    assert all(bool((~r.windows["validation"]).all()) for r in lad.results)  # every rung on the same windows
    first, second = lad.reports
    assert second.source == "hidden-state" and second.closed > 0.99 and second.physics_error < first.physics_error
    with pytest.raises(nf.InputError, match="without held-out windows"):
        nf.report.ladder(traj, [GradientFlow(p, LR), PlantedHidden(p, LR)], window=20, val_fraction=0.2, **SOLVER)
    text = str(lad)
    assert re.search(
        r"^planted-hidden\s+\S+\s+\d\.\d%\s+\S+\s+100\.0%\s+(second-order-oscillation|"
        r"linear-floquet-growth) \S+% \((drift|floquet)\)",
        text,
        re.M,
    )
    assert str(nf.report.Ladder.from_dict(json.loads(json.dumps(lad.to_dict())))) == text


# ------------------------------------------------------------------------------------ a latent correction


@pytest.fixture(scope="module")
def latent_fit():
    """The planted damped oscillator whose velocity is hidden (tests/test_latent.py), fitted with a latent correction
    that may act through a coefficient of ``g`` and through its direct force, from fitted window starts."""
    from test_latent import LR as LATENT_LR
    from test_latent import SOLVER as LATENT_SOLVER
    from test_latent import oscillator_problem, oscillator_trajectory

    from neuralflow.corrections import LatentCorrection

    p = oscillator_problem()
    model = Hybrid(GradientFlow(p, LATENT_LR), LatentCorrection(p, LATENT_LR, m=2, fields=("g",), hidden=16))
    adam = {"method": "direct", "optimizer": "adam", "learning_rate": 3e-2, "patience": 50, "val_fraction": 0}
    return fit(
        model,
        oscillator_trajectory(),
        window=20,
        extra_start="fitted",
        max_iters=100,
        progress=False,
        **adam,
        **LATENT_SOLVER,
    )


def test_the_report_integrates_a_fit_s_windows_from_their_fitted_starts(latent_fit):
    from neuralflow.report.hidden import solve_windows, window_errors, window_rows

    starts = latent_fit.windows["extra_start"]
    assert starts.shape == (len(latent_fit.windows["step"]), 2) and starts.abs().max() > 0
    rows, t = window_rows(latent_fit)
    again = window_errors(latent_fit, solve_windows(latent_fit, latent_fit.model, rows, t), rows)
    torch.testing.assert_close(again, latent_fit.window_errors.cpu(), rtol=1e-6, atol=1e-12)


def test_the_report_reads_a_latent_correction_and_says_a_hidden_state_is_missing(latent_fit, tmp_path):
    report = latent_fit.report()
    assert report.source == "latent" and report.closed > 0.99  # measured: 99.9 percent, Pz 99.5 of it
    rows = {t.name: t for t in report.terms}
    assert set(rows) == {"g", "Pz"} and all(t.regime == "latent" for t in rows.values())
    # what is missing is a velocity, which only the direct force can carry: the planted system has no g-coefficient
    assert rows["Pz"].share > 0.9 and report.terms[0].name == "Pz"
    assert sum(t.share for t in report.terms) == pytest.approx(report.closed, rel=1e-9)
    assert rows["g"].gate is not None and rows["g"].gate.formula.explained < 0.5
    assert any("(W z)_g, is not a function of the state" in n for n in report.notes)
    assert report.suggestions()[0].startswith("A hidden state is missing: latent states")
    assert all(t.approximation == history_approximation(latent_fit.model.flow) for t in report.terms)
    eq = report.equation()
    assert r"\frac{dz}{dt}=\eta\,f_{\phi}(\theta,z)" in eq and r"\eta\,Pz" in eq and "c_{\\mathrm{g}}(z)" in eq
    _render_math(eq)
    assert str(Report.from_dict(json.loads(json.dumps(report.to_dict())))) == str(report)
    # the loss curve's hybrid follows GD's loss where the physics cannot (its windows from the fitted starts)
    loss = report.curves["loss"]
    hybrid = [abs(h - o) for h, o in zip(loss["hybrid"], loss["observed"], strict=True)]
    physics = [abs(h - o) for h, o in zip(loss["physics"], loss["observed"], strict=True)]
    assert sum(hybrid) < 0.1 * sum(physics)
    plt.close("all")
    path = nf.checkpoint.save(latent_fit, tmp_path / "latent.nff")  # with its report, which it could not hold before
    assert str(nf.checkpoint.stored_report(path)) == str(report)
    assert str(nf.checkpoint.load(path).report()) == str(report)  # rebuilt from the loaded fit's fitted starts


def test_a_latent_report_reads_a_force_only_correction_and_calls_no_constant_history():
    from test_latent import LR as LATENT_LR
    from test_latent import SOLVER as LATENT_SOLVER
    from test_latent import oscillator_problem, oscillator_trajectory

    from neuralflow.corrections import LatentCorrection

    p, traj = oscillator_problem(), oscillator_trajectory()
    adam = {"method": "direct", "optimizer": "adam", "val_fraction": 0, "progress": False, **LATENT_SOLVER}
    force_only = Hybrid(GradientFlow(p, LATENT_LR), LatentCorrection(p, LATENT_LR, m=2, fields=(), hidden=16))
    res = fit(force_only, traj, window=20, extra_start="fitted", max_iters=40, learning_rate=3e-2, **adam)
    report = res.report()
    assert [t.name for t in report.terms] == ["Pz"] and report.terms[0].share == pytest.approx(report.closed)
    assert report.closed > 0.5 and report.suggestions()[0].startswith("A hidden state is missing")
    # nothing fitted (a zero learning rate): z stays 0, (W z)_g is the constant 0, which is no history
    idle = Hybrid(GradientFlow(p, LATENT_LR), LatentCorrection(p, LATENT_LR, m=2, fields=("g",), direct=False))
    still = fit(idle, traj, window=20, max_iters=1, learning_rate=0.0, **adam).report()
    assert still.closed == 0 and still.terms[0].coefficient == 0
    assert not any("carries history" in n for n in still.notes)
    assert not any(s.startswith("A hidden state is missing") for s in still.suggestions())


def test_a_latent_report_on_a_flow_with_extra_state_prints_both_states_equations():
    """A latent correction riding on a flow with its own extra state: the report's equations give the flow's extra
    state (at the physics' own coefficients) beside the latent terms of dtheta/dt and the latent equation."""
    from neuralflow.corrections import LatentCorrection

    p = planted_problem()
    model = Hybrid(PlantedHidden(p, LR), LatentCorrection(p, LR, m=2, fields=("g",), hidden=4))
    adam = {"method": "direct", "optimizer": "adam", "learning_rate": 1e-2, "val_fraction": 0, "progress": False}
    report = fit(model, planted_trajectory(), window=20, max_iters=3, **adam, **SOLVER).report()
    assert report.source == "latent" and report.extra_equation is not None
    text = str(report)
    assert "equations (the physics' own coefficients, with the latent terms):" in text
    theta = next(line for line in text.splitlines() if line.startswith("  dtheta/dt = "))
    assert theta.startswith("  dtheta/dt = F_planted-hidden(theta) - 0.5 lr grad <H, Sigma> + ")  # rank order
    assert sorted(theta.split(" - 0.5 lr grad <H, Sigma> + ")[1].split(" + ")) == ["c_g(z) g", "lr P z"]
    assert re.search(r"  ds/dt = 2 s log\|1 - lr lambda\|", text) and "  dz/dt = lr f_phi(theta, z)\n" in text
    eq = report.equation()
    assert r"\frac{ds}{dt}=2\," in eq and r"+c_{\mathrm{g}}(z)\," in eq and r"+\eta\,Pz" in eq
    assert eq.endswith(r",\quad \frac{dz}{dt}=\eta\,f_{\phi}(\theta,z)")
    _render_math(eq)
    back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert str(back) == text and back.equation() == eq
    plt.close("all")
