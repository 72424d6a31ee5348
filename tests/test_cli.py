import subprocess
import sys

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


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "neuralflow", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run-gd" in res.stdout
