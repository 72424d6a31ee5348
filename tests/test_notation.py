"""Every registry entry writes itself: terms, features and flows carry their text and LaTeX, the report reads
them from there, and every approximation record lives in :mod:`neuralflow.flows.approximations`."""

from __future__ import annotations

import dataclasses
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.mathtext  # noqa: E402
import pytest  # noqa: E402

from neuralflow import corrections, flows, problems  # noqa: E402
from neuralflow.corrections import FEATURES, HIDDEN_TERMS, TERMS, FeatureSpec, TermSpec  # noqa: E402
from neuralflow.flows import APPROXIMATIONS, FLOWS, OscillationFlow, flow_latex  # noqa: E402
from neuralflow.flows.approximations import Approximation  # noqa: E402
from neuralflow.report import Gate, Report, TermSummary  # noqa: E402
from neuralflow.report.equations import equation_text, extra_equation  # noqa: E402


def parses(latex: str) -> None:
    matplotlib.mathtext.math_to_image(f"${latex}$", io.BytesIO(), dpi=50, format="png")


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_term_has_text_and_latex_that_parses(name):
    spec = TERMS[name]
    assert spec.name == name and spec.formula and spec.latex
    parses(spec.latex)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_every_feature_has_text_and_latex_that_parses(name):
    spec = FEATURES[name]
    assert spec.name == name and spec.text and spec.latex
    parses(spec.latex)


@pytest.mark.parametrize("name", sorted(HIDDEN_TERMS))
def test_every_hidden_state_term_has_its_notation_in_its_registry_entry(name):
    spec = HIDDEN_TERMS[name]
    assert spec.name == name and spec.text and spec.direction_text
    for latex in (spec.latex, spec.direction_latex):
        parses(latex.format(x="X"))
    equation = equation_text(extra_equation(OscillationFlow(problems.zhu_quartic(), 0.1, n_track=1), {name: 0.25}))
    assert any(spec.text.format(x="X") in line for line in equation), equation


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_flow_has_latex_that_parses(name):
    latex = flow_latex(name)
    assert latex
    parses(latex)


def test_a_flow_instance_writes_what_its_registry_entry_writes():
    zhu = problems.zhu_quartic()
    for order in (1, 2):
        assert flows.ModifiedFlow(zhu, 0.1, order=order).latex == flow_latex(f"modified{order}")
    assert flows.GradientFlow(zhu, 0.1).latex == flow_latex("gradient")
    assert flow_latex("modified1") != flow_latex("modified2")
    assert flow_latex("no-such-flow") is None


def test_a_new_term_and_feature_reach_the_report_from_their_registry_entries(monkeypatch):
    """Adding a term or a feature is one registry entry: the report writes it from there."""
    hg = TERMS["Hg"]
    monkeypatch.setitem(TERMS, "Hg3", dataclasses.replace(hg, name="Hg3", latex=r"\eta^{2}\,H^{3} g"))
    edge = FEATURES["lr_S"]
    monkeypatch.setitem(FEATURES, "half_lr_S", FeatureSpec("half_lr_S", "lr S / 2", r"\eta S/2", 1.0, edge.value))
    gate = Gate({"half_lr_S": (0.5, 1.5)}, (0.0, 1.0), None)
    report = Report(
        "p", 0.1, "central", 1.0, 0.5, [TermSummary("Hg3", 0.6, -0.5), TermSummary("Hg", 0.2, 0.1, gate=gate)]
    )
    equation = report.equation()
    assert r"\eta^{2}\,H^{3} g" in equation and r"\eta S/2" in equation
    assert equation.startswith(r"\frac{d\theta}{dt}=" + flows.CentralFlow.latex)
    parses(equation)


def test_every_approximation_lives_in_one_home():
    """Each flow's and each term's approximation is the very record of :data:`APPROXIMATIONS`, under its slug,
    and the old import paths name the same objects."""
    used = {spec.approximation for spec in TERMS.values()}
    used |= {spec.approximation for spec in corrections.HIDDEN_TERMS.values()}
    zhu = problems.zhu_quartic()
    for build in FLOWS.values():
        used |= set(build(zhu, 0.1).approximations)
    assert used and all(APPROXIMATIONS[a.name] is a for a in used)
    from neuralflow.corrections import EFFECTIVE_STEP_SIZE, NO_OSCILLATION_CRITICAL, SLAVED_TOP_DIRECTION
    from neuralflow.flows.base import Approximation as OldApproximation
    from neuralflow.flows.central import SECOND_ORDER_OSCILLATION
    from neuralflow.flows.gradient import CONTINUOUS_TIME_1
    from neuralflow.flows.oscillation import ISOTROPIC_INJECTION

    assert OldApproximation is Approximation
    for record in (
        EFFECTIVE_STEP_SIZE,
        NO_OSCILLATION_CRITICAL,
        SLAVED_TOP_DIRECTION,
        SECOND_ORDER_OSCILLATION,
        CONTINUOUS_TIME_1,
        ISOTROPIC_INJECTION,
    ):
        assert APPROXIMATIONS[record.name] is record


def test_every_term_an_approximation_names_exists():
    """``revised_by`` names terms of :data:`TERMS` or :data:`HIDDEN_TERMS` only (a typo would point a reader at
    nothing)."""
    for approximation in APPROXIMATIONS.values():
        assert set(approximation.revised_by) <= set(TERMS) | set(HIDDEN_TERMS), approximation.name


def test_term_specs_are_registered_under_their_own_names():
    assert all(isinstance(s, TermSpec) and s.name == n for n, s in TERMS.items())
