"""The examples, the demo and the notebook run end to end (fast settings), so they cannot rot."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

from neuralflow import checkpoint
from neuralflow._io import FORMAT_VERSION
from neuralflow.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_modified_equation_recovers_the_first_order_term(tmp_path, monkeypatch, capsys):
    _run("modified_equation.py", "--fast", "--save", str(tmp_path / "m.nff"), monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "Hg" in out and "D3gg" in out
    result = checkpoint.load(tmp_path / "m.nff")
    assert result.coefficients["Hg"] == pytest.approx(-0.5, abs=0.05)
    assert result.hybrid_error < result.physics_error


def test_edge_of_stability_points_at_the_missing_oscillation(monkeypatch, capsys):
    _run("edge_of_stability.py", "--fast", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "central" in out and "[no-oscillation]: adding gradS" in out and "what remains" in out


def test_custom_problem_round_trips_a_user_module(monkeypatch, capsys):
    _run("custom_problem.py", "--fast", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "reloaded from a checkpoint" in out


def test_the_demo_writes_what_it_promises(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--fast", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "suggestions:" in printed
    assert "dX/dt = " in printed  # the fitted equation of the oscillation covariance
    names = {p.name for p in out.iterdir()}
    assert {"trajectory.nft", "fit.nff", "report.md", "ladder.md", "gd.png", "variance.png", "summary.json"} <= names
    assert any(n.startswith("report_") and n.endswith(".png") for n in names)  # the report's figures
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eos_onset"] is not None and set(summary["coefficients"]) == {"floquet", "drift"}
    # the noise seeds the oscillation: the quiet stretch past 2/lr is the same on every machine
    assert summary["settings"]["noise"] == 1e-10 and summary["quiet_stretches"] == [[183, 239]]
    assert [r["physics"] for r in summary["ladder"]["reports"]] == ["gradient", "central", "oscillation"]
    assert checkpoint.load(out / "fit.nff").coefficients == summary["coefficients"]
    assert checkpoint.stored_report(out / "fit.nff").to_markdown() == (out / "report.md").read_text()


def _kernel_imports_this_checkout(monkeypatch) -> None:
    """A notebook's kernel is a new process: make it import this checkout, whatever the environment has installed."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_the_notebook_executes_on_the_shipped_checkpoint(monkeypatch):
    import nbclient
    import nbformat

    _kernel_imports_this_checkout(monkeypatch)
    for name in ("modified_equation.nff", "edge_of_stability.nff", "demo.nff"):
        assert (ROOT / "checkpoints" / name).is_file(), "run python examples/make_checkpoints.py"
        # shipped in the current format (an older one still loads, but then the checkpoints were not regenerated)
        assert checkpoint.info(ROOT / "checkpoints" / name)["format_version"] == FORMAT_VERSION
    nb = nbformat.read(EXAMPLES / "inspect_checkpoint.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the report as HTML
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the figures, the demo's variance
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "dX/dt = " in printed  # the demo checkpoint's learned equation of the oscillation covariance


def test_the_tour_notebook_shows_reprs_and_frames(monkeypatch):
    import nbclient
    import nbformat

    _kernel_imports_this_checkout(monkeypatch)
    nb = nbformat.read(EXAMPLES / "notebook_tour.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("neuralflow Trajectory" in h for h in html)  # Trajectory._repr_html_
    assert any("flows against GD" in h for h in html)  # Comparison._repr_html_
    assert any("standard error" in h for h in html)  # FitResult._repr_html_
    assert sum("dataframe" in h for h in html) >= 4  # the four to_frame() tables, rendered by pandas
    assert any("image/png" in o.get("data", {}) for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Comparison(scalar-factorization" in printed and "tensor" not in printed
