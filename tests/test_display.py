"""Notebook display: short text reprs, HTML reprs, pandas frames and plots into given axes."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import pytest

import neuralflow as nf


@pytest.fixture(scope="module")
def run():
    p = nf.problems.scalar_factorization(3)
    traj = nf.run_gd(p, 0.02, 60, n_eigs=2, progress=False)
    model = nf.Hybrid(nf.flows.GradientFlow(p, 0.02), nf.corrections.TermLibrary(p, 0.02, ["Hg"]))
    result = nf.fit(model, traj, window=10, method="regression", progress=False)
    comparison = nf.compare(traj, nf.flows.GradientFlow(p, 0.02), nf.flows.ModifiedFlow(p, 0.02, order=1))
    return p, traj, model, result, comparison


def test_comparison_repr_is_one_short_line_without_tensors(run):
    comparison = run[4]
    text = repr(comparison)
    assert "tensor" not in text and "\n" not in text and len(text) < 200
    assert "gradient" in text and "modified1" in text


def test_trajectory_frame_holds_every_step_of_the_history(run):
    traj = run[1]
    frame = traj.to_frame()
    assert list(frame.index) == traj.history["step"].tolist()
    assert {"loss", "grad_norm", "sharpness_1", "sharpness_2", "update_u"} <= set(frame.columns)
    assert (frame["sharpness_2"].to_numpy() == traj.history["sharpness"][:, 1].numpy()).all()
    assert "<table" in traj._repr_html_() and "scalar-factorization" in traj._repr_html_()


def test_comparison_frame_has_one_row_per_flow_with_the_table_numbers(run):
    comparison = run[4]
    frame = comparison.to_frame()
    assert list(frame.index) == ["gradient", "modified1"]
    assert frame.loc["modified1", "distance"] == comparison.rows[1]["distance"]
    assert frame.loc["modified1", "distance"] < frame.loc["gradient", "distance"]  # the modified equation is closer
    assert comparison._repr_html_().count("<tr>") == 3


def test_report_and_profile_frames(run):
    _, traj, model, result, _ = run
    report = result.report()
    frame = report.to_frame()
    assert list(frame.index) == [t.label for t in report.terms]
    assert frame.loc["Hg", "coefficient"] == pytest.approx(result.coefficients["Hg"])
    assert frame.loc["Hg", "approximation"] == "continuous-time-order-1"
    profile = nf.coefficient_profile(model, traj, bin=20)
    pf = profile.to_frame()
    assert list(pf.index) == profile["step"].tolist()
    assert (pf["Hg"].to_numpy() == profile["coefficients"]["Hg"].numpy()).all()
    assert f"{result.coefficients['Hg']:+.6g}" in result._repr_html_()


def test_plots_draw_into_the_axes_given(run):
    traj, comparison = run[1], run[4]
    fig, axes = plt.subplots(3, 1)
    assert comparison.figure(ax=axes) is fig and axes[0].lines
    fig2, axes2 = plt.subplots(2, 1)
    assert traj.plot(ax=axes2) is fig2 and axes2[1].lines
    plt.close("all")


def test_without_pandas_to_frame_says_what_to_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(nf.NeuralflowError, match="pip install"):
        run[1].to_frame()
