import subprocess
import sys

import pytest
import torch

import neuralflow as nf
from neuralflow.cli import main


def test_run_gd_writes_the_trajectory_and_figure_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "run.nft"
    code = main(["run-gd", "--problem", "zhu-quartic", "--lr", "0.2", "--steps", "300", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "EoS onset    step" in text and str(out) in text and "final loss" in text
    traj = nf.Trajectory.load(out)
    assert traj.lr == 0.2 and len(traj) == 301
    assert out.with_suffix(".png").stat().st_size > 1000


def test_divergence_saves_the_partial_trajectory(tmp_path, capsys):
    out = tmp_path / "div.nft"
    code = main(["run-gd", "--problem", "scalar-factorization", "--lr", "3", "--steps", "500", "--out", str(out)])
    assert code == 2
    assert "diverged at step" in capsys.readouterr().err
    partial = nf.Trajectory.load(out)
    assert torch.isfinite(partial.iterates).all()


@pytest.mark.parametrize("module", ["neuralflow", "neuralflow.cli"])
def test_python_dash_m_entry_point(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run-gd" in res.stdout


def test_fit_writes_a_fit_file_that_loads(tmp_path, capsys):
    run = tmp_path / "run.nft"
    args = ["run-gd", "--problem", "scalar-factorization", "--lr", "0.02", "--steps", "100", "--out", str(run)]
    assert main(args) == 0
    out = tmp_path / "fit.nff"
    code = main(["fit", str(run), "--terms", "Hg", "--window", "10", "--method", "regression", "--out", str(out)])
    assert code == 0
    assert "Hg" in capsys.readouterr().out
    res = nf.load(out)
    assert abs(res.coefficients["Hg"] + 0.5) < 0.05  # -1/2 up to O(lr) without H2g (test_fit checks the limit)


def test_fit_can_leave_out_the_quiet_stretch_past_two_over_lr(tmp_path, monkeypatch):
    run = tmp_path / "run.nft"
    assert main(["run-gd", "--problem", "zhu-quartic", "--lr", "0.2", "--steps", "200", "--out", str(run)]) == 0
    # this run oscillates from the start; plant a quiet stretch to check that the flag reaches the fit
    monkeypatch.setattr(nf.Trajectory, "eos_transients", lambda self, ratio=0.1: [(50, 80)])
    out = tmp_path / "fit.nff"
    code = main(
        [
            "fit",
            str(run),
            "--terms",
            "Hg",
            "--window",
            "10",
            "--method",
            "regression",
            "--target",
            "smoothed",
            "--balance",
            "--exclude-transients",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = nf.load(out)
    assert res.settings["balance"] is True
    assert [tuple(r) for r in res.settings["exclude"]] == [(50, 80)]
    starts = res.windows["step"].tolist()
    assert starts and all(s + 10 < 50 or s >= 80 for s in starts)


def test_fit_passes_a_baseline_gated_term(tmp_path):
    run = tmp_path / "run.nft"
    args = ["run-gd", "--problem", "scalar-factorization", "--lr", "0.02", "--steps", "40", "--out", str(run)]
    assert main(args) == 0
    out = tmp_path / "fit.nff"
    code = main(
        [
            "fit",
            str(run),
            "--terms",
            "Hg",
            "--gated",
            "Hg",
            "--baseline",
            "Hg",
            "--features",
            "lr_S_minus_2",
            "--window",
            "10",
            "--method",
            "regression",
            "--max-iters",
            "5",
            "--solver",
            "euler",
            "--step-size",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lib = nf.load(out).model.correction
    assert lib.baseline == ["Hg"] and hasattr(lib.gates["Hg"], "base")
