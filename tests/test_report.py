"""The report: ranked terms, suggestions, sparse formulas, distillation, output forms, ladder.

Golden files live in ``tests/golden/``; regenerate them after an intended change of the output
forms with ``NEURALFLOW_UPDATE_GOLDEN=1 pytest tests/test_report.py`` and review the diff.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.mathtext  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from neuralflow.flows import Approximation  # noqa: E402
from neuralflow.flows.gradient import CONTINUOUS_TIME_1, NO_OSCILLATION  # noqa: E402
from neuralflow.report import (  # noqa: E402
    Gate,
    Report,
    TermSummary,
    distill,
    gate_formula,
    shares,
    theory_text,
)
from neuralflow.report.build import window_shares  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("NEURALFLOW_UPDATE_GOLDEN") == "1"

CONTINUOUS_TIME_2 = Approximation(
    name="continuous-time-order-2",
    statement="GD's continuous-time limit is truncated after the first-order backward-error term.",
    exact_when="lr -> 0, to O(lr^3) per step",
    revised_by=("H2g", "D3gg"),
    reference="Hairer, Lubich, Wanner, ch. IX",
)


# --------------------------------------------------------------------------------- sparse regression


def test_gate_formula_finds_the_switch_at_the_edge_of_stability():
    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(-1.0, 0.6, 120, dtype=torch.float64)  # lr S - 2 along a run into EoS
    c = -0.3 * torch.relu(x) + 1e-3 * torch.randn(120, generator=gen, dtype=torch.float64)
    loss = torch.linspace(1.0, 0.2, 120, dtype=torch.float64)
    formula = gate_formula({"lr_S_minus_2": x, "lr_S": x + 2, "loss": loss}, c)  # lr_S duplicates lr_S - 2
    assert [b[:2] for b in formula.basis] == [("relu", "lr_S_minus_2")]
    assert formula.coefficients[0] == pytest.approx(-0.3, rel=0.01)
    assert formula.explained > 0.99
    assert formula.text(2) == "-0.3 relu(lr S - 2)"


def test_distill_recovers_planted_coefficients_and_residual():
    gen = torch.Generator().manual_seed(2)
    fields = {n: torch.randn(40, 20, generator=gen, dtype=torch.float64) for n in ("g", "Hg", "H2g", "D3gg")}
    extra = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    out = -0.5 * fields["Hg"] - (1 / 3) * fields["H2g"] + 0.3 * extra
    coef, sol = distill(out, fields)
    assert coef["g"] == 0 and coef["D3gg"] == 0
    assert coef["Hg"] == pytest.approx(-0.5, abs=0.05)
    assert coef["H2g"] == pytest.approx(-1 / 3, abs=0.05)
    expected = float((0.3 * extra).pow(2).sum() / out.pow(2).sum())
    assert sol.residual == pytest.approx(expected, rel=0.3)


def test_shares_decompose_the_squared_norm_of_the_correction():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    s = shares({"a": a, "b": b}, closed=0.8)
    assert sum(s.values()) == pytest.approx(0.8, rel=1e-12)
    total = a + b
    assert s["a"] == pytest.approx(0.8 * float((a * total).sum() / (total * total).sum()), rel=1e-12)
    # Orthogonal contributions: shares are proportional to squared norms.
    a2 = torch.zeros(10, 5, dtype=torch.float64)
    a2[:, 0] = 3.0
    b2 = torch.zeros(10, 5, dtype=torch.float64)
    b2[:, 1] = 4.0
    s2 = shares({"a": a2, "b": b2}, closed=1.0)
    assert s2["a"] == pytest.approx(9 / 25) and s2["b"] == pytest.approx(16 / 25)


def test_theory_text_prints_simple_fractions():
    assert theory_text(-0.5) == "-1/2"
    assert theory_text(-1 / 12) == "-1/12"
    assert theory_text(0.0) == "0"
    assert theory_text(None) == "-"
    assert theory_text(math.pi) == "3.14"


# ------------------------------------------------------------------------------- fixed reports (golden)


def _recovery_report() -> Report:
    """The numbers of a small modified-equation recovery fit (gradient physics, lr = 0.02)."""
    return Report(
        problem="tanh-net",
        lr=0.02,
        physics="gradient",
        physics_error=3.1416e-4,
        hybrid_error=2.71828e-9,
        terms=[
            TermSummary("H2g", 0.0123, -0.33214, 0.0021, -1 / 3, CONTINUOUS_TIME_2),
            TermSummary("Hg", 0.9852, -0.499912, 0.00031, -0.5, CONTINUOUS_TIME_1),
            TermSummary("D3gg", 0.0025, -0.0841, 0.004, -1 / 12, CONTINUOUS_TIME_2),
        ],
        curves={
            "loss": {
                "step": [10, 20, 30],
                "observed": [0.5, 0.25, 0.125],
                "physics": [0.51, 0.26, 0.13],
                "hybrid": [0.5, 0.25, 0.125],
            },
            "distance": {"step": [0, 10, 20], "physics": [1e-3, 2e-3, 3e-3], "hybrid": [1e-7, 2e-7, 3e-7]},
        },
        contributions={
            "step": [0, 10, 20, 30],
            "Hg": [1e-3, 8e-4, 6e-4, 5e-4],
            "H2g": [1e-5, 8e-6, 6e-6, 5e-6],
            "D3gg": [2e-6, 1e-6, 1e-6, 1e-6],
        },
    )


def _eos_report() -> Report:
    """A gated sharpness-gradient term switching on at lr S = 2 (gradient physics at EoS)."""
    x = np.linspace(-0.8, 0.4, 46)
    values = -0.4 * np.maximum(x, 0) + 0.002 * np.sin(np.arange(46))
    loss = np.linspace(0.3, 0.05, 46)
    formula = gate_formula({"lr_S_minus_2": torch.tensor(x), "loss": torch.tensor(loss)}, torch.tensor(values))
    gate = Gate({"lr_S_minus_2": tuple(x), "loss": tuple(loss)}, tuple(values), formula)
    return Report(
        problem="mlp-digits",
        lr=0.1,
        physics="gradient",
        physics_error=0.0412,
        hybrid_error=0.0093,
        terms=[
            TermSummary("gradS", 0.6584, float(values.mean()), None, None, NO_OSCILLATION, gate),
            TermSummary("Hg", 0.13, -0.47, 0.05, -0.5, CONTINUOUS_TIME_1),
            TermSummary("u_ug", -0.0141, 0.02, 0.01, None, None),
        ],
        curves={
            "sharpness": {
                "step": [0, 50, 100],
                "observed": [7.0, 19.8, 20.1],
                "physics": [7.0, 22.0, 30.0],
                "hybrid": [7.0, 19.9, 20.0],
            }
        },
    )


def _distilled_report() -> Report:
    """A network correction distilled onto the library, with a residual the library cannot express."""
    return Report(
        problem="zhu-quartic",
        lr=0.2,
        physics="central",
        physics_error=0.0021,
        hybrid_error=0.0011,
        terms=[TermSummary("Hg", 0.31, -0.12, None, None, CONTINUOUS_TIME_1)],
        residual=0.1662,
        source="neural",
        notes=[
            "network correction distilled onto ['g', 'Hg'] by sparse regression (terms chosen by 5-fold "
            "cross-validation); the library expresses 65.1% of the network's squared output"
        ],
    )


def _outside_report() -> Report:
    return Report(
        "quadratic", 0.1, "gradient", 0.02, 0.0197, [TermSummary("Hg", 0.015, -0.02, 0.01, -0.5, CONTINUOUS_TIME_1)]
    )


REPORTS = {"recovery": _recovery_report, "eos": _eos_report, "distilled": _distilled_report}


def _round(obj, digits: int = 6):
    """Floats to ``digits`` significant figures, so golden JSON ignores last-digit float noise."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v, digits) for v in obj]
    return obj


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; generate it with NEURALFLOW_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed; review, then regenerate with NEURALFLOW_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("which", sorted(REPORTS))
def test_golden_output_forms(which):
    report = REPORTS[which]()
    _check_golden(f"{which}.txt", str(report))
    _check_golden(f"{which}.md", report.to_markdown())
    _check_golden(f"{which}.tex", report.to_latex())
    _check_golden(f"{which}.html", report._repr_html_())
    data = report.to_dict()
    json.dumps(data)  # JSON-able
    _check_golden(f"{which}.json", json.dumps(_round(data), indent=1, sort_keys=True) + "\n")


def _render_math(equation: str) -> None:
    matplotlib.mathtext.math_to_image(f"${equation}$", io.BytesIO(), dpi=50, format="png")


@pytest.mark.parametrize("which", sorted(REPORTS))
def test_latex_parses_as_math(which):
    report = REPORTS[which]()
    tex = report.to_latex()
    body = re.search(r"\\begin\{equation\}\n(.*)\n\\end\{equation\}", tex, re.S).group(1)
    assert body == report.equation()
    _render_math(body)


def test_every_physics_and_term_renders_as_math():
    from neuralflow.corrections import TERMS
    from neuralflow.flows import FLOWS

    for physics in [*FLOWS, "some_new_flow"]:
        terms = [TermSummary(t, 0.1, -1.234e-5, None, None, None) for t in [*TERMS, "new_term"]]
        _render_math(Report("p", 0.1, physics, 1.0, 0.5, terms).equation())
    gate = Gate({"lr_S": (1.0, 2.0), "my_feature": (0.0, 1.0)}, (0.0, 1.0), None)
    _render_math(Report("p", 0.1, "gradient", 1.0, 0.5, [TermSummary("gradS", 0.6, 0.5, gate=gate)]).equation())


def test_recovery_report_ranks_hg_first_next_to_minus_one_half():
    report = _recovery_report()
    assert report.terms[0].name == "Hg"
    assert report.verdict == "revise"
    assert repr(report) == (
        "Report(physics='gradient', problem='tanh-net', verdict='revise', closed=100.0%, top='Hg 98.5%')"
    )
    top = report.suggestions()[0]
    assert top.startswith("revise \"GD's discrete steps are replaced by their continuous-time limit")
    assert "[continuous-time-order-1]" in top and "-0.49991 +- 0.00031 (theory -1/2)" in top
    row = next(line for line in str(report).splitlines() if line.startswith("1 "))
    assert re.search(r"Hg\s+98\.5%\s+-0\.49991 \+- 0\.00031\s+-1/2\s+continuous-time-order-1", row)


def test_shares_and_unexplained_sum_to_one_hundred_percent():
    for make in (*REPORTS.values(), _outside_report):
        r = make()
        d = r.to_dict()
        assert d["closed"] == pytest.approx(1 - r.hybrid_error / r.physics_error)
        total = sum(t.share for t in r.terms) + (r.residual or 0.0)
        assert total == pytest.approx(r.closed, abs=1e-4)
        assert total + r.unexplained == pytest.approx(1.0, abs=1e-4)


def test_verdicts_outside_the_library_and_negligible():
    outside = _outside_report()
    assert outside.verdict == "outside"
    assert outside.suggestions() == [
        "No candidate term explains the gap; the missing physics is outside the library (physics error 0.02, "
        "98.5% unexplained)."
    ]
    distilled = _distilled_report()
    assert distilled.verdict == "outside"
    # the revisions come first, ranked; then what they leave outside the library
    assert "adding Hg with coefficient -0.12 closes 31.0 percent" in distilled.suggestions()[0]
    assert distilled.suggestions()[1].startswith(
        "The library explains only 31.0 percent of the gap; the rest of the missing physics is outside the library"
    )
    negligible = Report("quadratic", 0.1, "principal", 1e-9, 1e-9, [TermSummary("Hg", 0.0, 1e-6)])
    assert len(negligible.suggestions()) == 1
    assert negligible.verdict == "negligible"
    assert negligible.suggestions()[0].startswith(
        "The correction is negligible: the physics (principal) already explains the data to 0.0032 percent"
    )
    # A correction that closed most of the gap but leaves a quarter: suggestion plus a warning.
    partial = Report("q", 0.1, "gradient", 1.0, 0.25, [TermSummary("Hg", 0.75, -0.5, None, -0.5, CONTINUOUS_TIME_1)])
    assert partial.verdict == "revise" and "25.0 percent of the gap remains unexplained" in partial.suggestions()[-1]


def test_round_trip_through_json_renders_identically():
    for make in REPORTS.values():
        r = make()
        back = Report.from_dict(json.loads(json.dumps(r.to_dict())))
        assert str(back) == str(r)
        assert back.to_latex() == r.to_latex()
        assert back.to_dict() == r.to_dict()


def test_figures_are_returned_not_shown(tmp_path):
    figs = _eos_report().figures()
    assert set(figs) == {"dynamics", "gates"}
    for fig in figs.values():
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
    assert set(_recovery_report().figures()) == {"dynamics", "contributions"}
    plt.close("all")
    paths = _eos_report().save_figures(tmp_path)
    assert sorted(p.name for p in paths) == ["report_dynamics.png", "report_gates.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


# ------------------------------------------------------------------------------- reports of real fits


LR = 0.02


@pytest.fixture(scope="module")
def recovery():
    """GD on a depth-3 scalar factorisation at a small step: the modified-equation recovery problem."""
    import neuralflow as nf
    from neuralflow.corrections import Hybrid, TermLibrary
    from neuralflow.fit import fit
    from neuralflow.flows import GradientFlow

    p = nf.problems.scalar_factorization(3)
    traj = nf.run_gd(p, LR, 100, eig_every=0, progress=False)
    model = Hybrid(GradientFlow(p, LR), TermLibrary(p, LR, terms=["H2g", "Hg", "D3gg"]))
    return traj, fit(model, traj, window=10, progress=False)


def test_report_of_the_modified_equation_recovery_names_the_first_order_approximation(recovery):
    _, result = recovery
    report = result.report()
    assert [t.name for t in report.terms][0] == "Hg"
    hg = report.terms[0]
    assert hg.coefficient == pytest.approx(-0.5, rel=0.02) and hg.theory == -0.5
    assert hg.approximation == CONTINUOUS_TIME_1
    assert hg.share > 0.8 and report.closed > 0.99 and report.verdict == "revise"
    top = report.suggestions()[0]
    assert re.search(
        r"\[continuous-time-order-1\]: adding Hg with coefficient -0\.(49|50)\d* \+- \S+ "
        r"\(theory -1/2\)",
        top,
    )
    assert re.search(r"^1\s+Hg\s+\S+%\s+-0\.(49|50)\d* \+- \S+\s+-1/2\s+continuous-time-order-1", str(report), re.M)
    assert sum(t.share for t in report.terms) + report.unexplained == pytest.approx(1.0, abs=1e-9)
    _render_math(report.equation())
    # The report's numbers round-trip and render without recomputation.
    back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert str(back) == str(report)
    assert {"loss", "distance"} <= set(report.curves) and len(report.curves["distance"]["step"]) == len(
        result.window_errors
    )
    figs = back.figures()
    assert {"dynamics", "contributions"} <= set(figs)
    plt.close("all")


def _planted_trajectory(problem, lr: float, rotation: float, steps: int):
    """Exact solution of ``dtheta/dt = -lr A theta + lr * rotation * J theta`` sampled at integer steps.

    With ``rotation = 0`` this is gradient flow itself; a rotation is a field no candidate term
    (all built from the loss' derivatives, hence curl-free or aligned with them) can produce.
    """
    from neuralflow import Trajectory

    A = torch.tensor(problem.description["A"], dtype=torch.float64)
    J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    M = lr * (-A + rotation * J)
    ks = torch.arange(steps + 1)
    xs = torch.stack([torch.linalg.matrix_exp(k * M) @ problem.theta0 for k in ks.tolist()])
    loss = problem.batched_loss(xs)
    nan = torch.full((steps + 1,), math.nan, dtype=torch.float64)
    return Trajectory(
        lr=lr,
        steps=ks,
        iterates=xs,
        loss=loss,
        grad_norm=(xs @ A).norm(dim=1),
        sharpness=nan[:, None].clone(),
        update_u=nan.clone(),
        problem=problem.description,
    )


@pytest.mark.parametrize("rotation, verdict", [(0.5, "outside"), (0.0, "negligible")])
def test_report_says_when_the_missing_physics_is_outside_the_library(rotation, verdict):
    import neuralflow as nf
    from neuralflow.corrections import Hybrid, TermLibrary
    from neuralflow.fit import fit
    from neuralflow.flows import GradientFlow
    from neuralflow.report import build_report

    p = nf.problems.quadratic([[1.0, 0.0], [0.0, 1.5]])
    traj = _planted_trajectory(p, 0.1, rotation, 60)
    method = "adjoint" if verdict == "outside" else "regression"
    result = fit(
        Hybrid(GradientFlow(p, 0.1), TermLibrary(p, 0.1, terms=["Hg"])),
        traj,
        window=10,
        method=method,
        max_iters=5,
        progress=False,
    )
    report = build_report(result)
    assert report.verdict == verdict
    first = report.suggestions()[0]
    if verdict == "outside":
        assert report.unexplained > 0.5
        assert "the missing physics is outside the library" in first
    else:
        assert report.suggestions() == [first]
        assert first.startswith("The correction is negligible: the physics (gradient) already explains the data")


def test_distillation_of_a_network_correction():
    """A network that outputs ``-1/2 lr^2 H g`` plus a rotation distils to ``Hg = -1/2`` and a residual."""
    import neuralflow as nf
    from neuralflow.autodiff import StateDerivatives
    from neuralflow.corrections import Hybrid, NeuralCorrection
    from neuralflow.fit import FitResult
    from neuralflow.flows import GradientFlow
    from neuralflow.report import RESIDUAL, build_report

    lr = 0.1
    p = nf.problems.quadratic(torch.diag(torch.tensor([1.0, 2.5, 4.0], dtype=torch.float64)))
    traj = nf.run_gd(p, lr, 60, eig_every=0, progress=False)
    states = traj.iterates
    sd = StateDerivatives(p, states, create_graph=False)
    hg = sd.hvp(sd.g).detach()
    rotation = torch.stack([states[:, 1], -states[:, 0], torch.zeros_like(states[:, 0])], dim=1)
    target = -0.5 * lr**2 * hg + lr**2 * rotation  # dtheta/dt in step time
    net = NeuralCorrection(p, lr, hidden=64)
    with torch.no_grad():  # train the output layer by least squares on the hidden features: F_a = lr * net(theta)
        hidden = torch.cat([net.net[:4](states), torch.ones(len(states), 1, dtype=torch.float64)], dim=1)
        w = torch.linalg.lstsq(hidden, target / lr).solution
        net.net[4].weight.copy_(w[:-1].T)
        net.net[4].bias.copy_(w[-1])
        assert float((lr * net.net(states) - target).pow(2).sum() / target.pow(2).sum()) < 1e-4
    result = FitResult(
        model=Hybrid(GradientFlow(p, lr), net),
        coefficients={},
        uncertainty={},
        history=[],
        window_errors=torch.zeros(0),
        physics_window_errors=torch.zeros(0),
        physics_error=1e-3,
        hybrid_error=1e-5,
        timing={},
        settings={"window": 10, "solver": "rk4", "step_size": 0.5},
        trajectory=traj,
        n_function_evals=0,
    )
    report = build_report(result)
    assert report.source == "neural" and [t.name for t in report.terms] == ["Hg"]
    assert report.terms[0].coefficient == pytest.approx(-0.5, rel=0.1)
    assert report.terms[0].approximation == CONTINUOUS_TIME_1
    planted_fraction = float((lr**2 * rotation).pow(2).sum() / target.pow(2).sum())
    assert report.residual == pytest.approx(0.99 * planted_fraction, rel=0.5)
    assert RESIDUAL in str(report) and "cross-validation" in report.notes[0]
    assert sum(t.share for t in report.terms) + report.residual + report.unexplained == pytest.approx(1.0, abs=1e-9)
    assert report.verdict == "revise"


def test_ladder_shows_the_gap_shrink_as_the_physics_improves(recovery):
    import neuralflow as nf
    from neuralflow.flows import GradientFlow, ModifiedFlow

    traj, result = recovery
    p = result.model.problem
    lad = nf.report.ladder(
        traj,
        [GradientFlow(p, LR), ModifiedFlow(p, LR, order=1)],
        terms=["Hg"],
        window=10,
        progress=False,
        report_options={"max_windows": 0},
    )
    grad, mod = lad.reports
    assert mod.physics_error < 0.05 * grad.physics_error
    assert grad.terms[0].coefficient == pytest.approx(-0.5, rel=0.05)
    assert abs(mod.terms[0].coefficient) < 0.05
    text = str(lad)
    assert re.search(r"^gradient\s+\S+\s+100\.0%", text, re.M) and re.search(
        r"^modified1\s+\S+\s+[0-4]\.\d%", text, re.M
    )
    assert Report.from_dict(lad.to_dict()["reports"][1]).physics == "modified1"
    assert "| gradient |" in lad.to_markdown()


def test_command_line_prints_the_report_and_saves_the_figures(tmp_path, monkeypatch, capsys):
    """``neuralflow report fit.nff``: the checkpoint loader is stubbed so that only the command is tested here."""
    from neuralflow import checkpoint
    from neuralflow.cli import main

    class Loaded:
        def report(self):
            return _eos_report()

    monkeypatch.setattr(checkpoint, "load", lambda path, **kw: Loaded() if str(path).endswith("fit.nff") else None)
    # a fit saved without its report's numbers: rebuilt from the fit
    monkeypatch.setattr(checkpoint, "stored_report", lambda path: None)
    assert main(["report", str(tmp_path / "fit.nff"), "--markdown", str(tmp_path / "report.md")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(_eos_report()))
    assert sorted(p.name for p in (tmp_path / "fit.report").iterdir()) == ["report_dynamics.png", "report_gates.png"]
    assert (tmp_path / "report.md").read_text() == _eos_report().to_markdown()
    plt.close("all")


def test_gated_coefficient_of_a_real_library_is_summarised_by_a_switch_at_the_edge_of_stability():
    """A gate set to ``-0.3 sigmoid(50 (lr S - 2))`` reads back as ``-0.3 step(lr S - 2)``."""
    import neuralflow as nf
    from neuralflow import Trajectory
    from neuralflow.corrections import Hybrid, TermLibrary
    from neuralflow.fit import FitResult
    from neuralflow.flows import GradientFlow
    from neuralflow.report import build_report

    lr = 0.5
    # L = (1 + x^2) y^2 / 2 + x^2 / 2: at y ~ 0 the sharpness is 1 + x^2, so lr S crosses 2 at x = sqrt(3).
    p = nf.problems.from_function(
        lambda th: 0.5 * (1 + th[0] ** 2) * th[1] ** 2 + 0.5 * th[0] ** 2,
        torch.tensor([0.0, 0.05], dtype=torch.float64),
    )
    xs = torch.stack(
        [torch.linspace(0.0, 2.2, 60, dtype=torch.float64), torch.full((60,), 0.05, dtype=torch.float64)], dim=1
    )
    nan = torch.full((60,), math.nan, dtype=torch.float64)
    traj = Trajectory(
        lr=lr,
        steps=torch.arange(60),
        iterates=xs,
        loss=p.batched_loss(xs),
        grad_norm=nan.clone(),
        sharpness=nan[:, None].clone(),
        update_u=nan.clone(),
        problem=p.description,
    )
    lib = TermLibrary(p, lr, terms=["Hg", "gradS"], gated=["gradS"])
    with torch.no_grad():
        lib.constants["Hg"].fill_(-0.5)
        lib.gates["gradS"].scale.fill_(-0.3)
        lib.gates["gradS"].gain.fill_(50.0)
        lib.gates["gradS"].margin.fill_(0.0)
    result = FitResult(
        model=Hybrid(GradientFlow(p, lr), lib),
        coefficients={"Hg": -0.5},
        uncertainty={"Hg": 0.01},
        history=[],
        window_errors=torch.zeros(0),
        physics_window_errors=torch.zeros(0),
        physics_error=1e-2,
        hybrid_error=1e-3,
        timing={},
        settings={"window": 0},
        trajectory=traj,
        n_function_evals=0,
    )
    report = build_report(result)
    gate = next(t for t in report.terms if t.name == "gradS")
    assert gate.approximation == NO_OSCILLATION and gate.gate is not None
    formula = gate.gate.formula
    assert formula.explained > 0.9
    kinds = {b[:2]: a for b, a in zip(formula.basis, formula.coefficients, strict=True)}
    assert kinds.get(("step", "lr_S_minus_2")) == pytest.approx(-0.3, rel=0.15)
    assert "step(lr S - 2)" in gate.coefficient_text()
    assert r"\mathrm{step}\left(\eta S-2\right)" in report.equation()
    _render_math(report.equation())
    assert set(report.figures()) == {"gates", "contributions"}
    plt.close("all")


def test_bad_input_gets_a_clear_error():
    import neuralflow as nf
    from neuralflow.corrections import Hybrid
    from neuralflow.fit import FitResult
    from neuralflow.flows import GradientFlow
    from neuralflow.report import build_report, ladder

    p = nf.problems.quadratic([[1.0]])
    traj = nf.run_gd(p, 0.1, 5, eig_every=0, progress=False)
    physics_only = FitResult(
        model=Hybrid(GradientFlow(p, 0.1), None),
        coefficients={},
        uncertainty={},
        history=[],
        window_errors=torch.zeros(0),
        physics_window_errors=torch.zeros(0),
        physics_error=1.0,
        hybrid_error=1.0,
        timing={},
        settings={},
        trajectory=traj,
        n_function_evals=0,
    )
    with pytest.raises(nf.InputError, match="no correction"):
        build_report(physics_only)
    with pytest.raises(nf.InputError, match="at least one physics"):
        ladder(traj, [])
    with pytest.raises(nf.InputError, match="unknown physics 'newtonian'; known flows are"):
        ladder(traj, ["newtonian"], problem=p)
    with pytest.raises(nf.InputError, match="library is empty"):
        distill(torch.zeros(4, 2), {})


def test_command_line_on_a_real_checkpoint(recovery, tmp_path, capsys):
    from neuralflow import checkpoint
    from neuralflow.cli import main
    from neuralflow.report import build_report

    _, result = recovery
    path = checkpoint.save(result, tmp_path / "fit.nff")
    assert main(["report", str(path), "--figures", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(build_report(result)))
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {"report_dynamics.png", "report_contributions.png"}
    plt.close("all")


def test_shares_credit_the_windows_where_the_correction_closed_the_gap():
    """Term ``a`` closes 0.9 of window A's error, ``b`` 0.1 of window B's with a field 100x larger, ``c`` hurts in C.

    The shares split ``closed`` by where the gap was closed (a: 0.45, b: 0.05 of the 50 percent), not
    by the size of the fields (which would give b nearly everything); a window the correction made
    worse credits nobody.
    """
    import neuralflow as nf

    nan = torch.full((31,), math.nan, dtype=torch.float64)
    targets = nf.Trajectory(
        lr=0.1,
        steps=torch.arange(31),
        iterates=torch.zeros(31, 2, dtype=torch.float64),
        loss=nan,
        grad_norm=nan,
        sharpness=nan[:, None],
        update_u=nan,
        problem={"name": "test"},
    )
    result = SimpleNamespace(
        windows={"step": torch.tensor([0, 10, 20]), "validation": torch.tensor([True, False, False])},
        settings={"window": 10},
        physics_window_errors=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        window_errors=torch.tensor([0.1, 0.9, 3.0], dtype=torch.float64),
    )
    seen = []

    def parts(at: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        seen.append(at.shape)
        a, b, c = torch.zeros_like(at), torch.zeros_like(at), torch.zeros_like(at)
        a[:3, 0], b[3:6, 1], c[6:, 0] = 1.0, 100.0, 5.0  # each window's first, middle and last state, A, B, C
        return {}, {"a": a, "b": b, "c": c}

    problem = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float64)
    share = window_shares(result, targets, parts, 0.5, 100, problem)
    assert seen == [(9, 2)]
    assert share["a"] == pytest.approx(0.45, abs=1e-12) and share["b"] == pytest.approx(0.05, abs=1e-12)
    assert share["c"] == 0.0
    unweighted = shares(parts(torch.zeros(9, 2, dtype=torch.float64))[1], 0.5)
    assert unweighted["b"] > 0.49  # what the squared norm alone says
    result.window_errors = torch.tensor([1.5, 1.0, 3.0], dtype=torch.float64)
    assert window_shares(result, targets, parts, 0.0, 100, problem) is None  # nowhere closed: the caller falls back

    # every other step recorded: each window's first, middle and last recorded state
    kept = torch.arange(0, 31, 2)
    every_other = nf.Trajectory(
        lr=0.1,
        steps=kept,
        iterates=kept[:, None].to(torch.float64).repeat(1, 2),
        loss=nan[kept],
        grad_norm=nan[kept],
        sharpness=nan[kept, None],
        update_u=nan[kept],
        problem={"name": "test"},
    )
    result.windows["step"] = torch.tensor([0, 10, 20])
    result.window_errors = torch.tensor([0.1, 0.9, 3.0], dtype=torch.float64)
    seen.clear()

    def record(at: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        seen.append(at[:, 0].tolist())
        return parts(at)

    window_shares(result, every_other, record, 0.5, 100, problem)
    assert seen[0] == [0, 4, 10, 10, 14, 20, 20, 24, 30]


def test_suggestions_come_one_per_approximation():
    """H2g and D3gg both repair the second-order continuous-time limit: one suggestion, their shares added."""
    report = _recovery_report()
    report.min_share = 0.01
    first, second = report.suggestions()
    assert "[continuous-time-order-1]: adding Hg with coefficient" in first
    assert (
        "[continuous-time-order-2]: adding H2g with coefficient -0.3321 +- 0.0021 (theory -1/3) and adding D3gg "
        "with coefficient -0.0841 +- 0.0040 (theory -1/12) closes 1.5 percent of the gap" in second
    )


# ------------------------------------------------------------------------- a golden report from a real fit


def _close_to(actual, expected, path: str = "report") -> list[str]:
    """Differences between two JSON trees: strings and structure exactly, numbers to 1e-6 (relative) + 1e-12."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{path}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} != {sorted(expected)}"]
        return [d for k in expected for d in _close_to(actual[k], expected[k], f"{path}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {actual!r} != {expected!r}"]
        return [
            d for i, (a, e) in enumerate(zip(actual, expected, strict=True)) for d in _close_to(a, e, f"{path}[{i}]")
        ]
    if isinstance(expected, float) or isinstance(actual, float):
        if (
            isinstance(actual, bool)
            or not isinstance(actual, int | float)
            or not math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12)
        ):
            return [f"{path}: {actual!r} != {expected!r}"]
        return []
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def test_golden_report_of_a_real_fit(recovery):
    """The whole report of the recovery fit (coefficients, uncertainties, errors, shares, curves) against a file.

    Unlike the hand-typed reports above, this catches a numerical regression anywhere between the fit and the
    report: the window error's normaliser, the uncertainty, the shares. Compared to 1e-6, far above the
    last-bit differences between BLAS kernels and far below any real change.
    """
    _, result = recovery
    data = json.loads(json.dumps(result.report().to_dict()))
    path = GOLDEN / "fitted_recovery.json"
    if UPDATE:
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    assert path.exists(), f"missing golden file {path}; generate it with NEURALFLOW_UPDATE_GOLDEN=1"
    differences = _close_to(data, json.loads(path.read_text()))
    assert not differences, "\n".join(differences[:20])
