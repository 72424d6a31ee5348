import math

import pytest
import torch

import neuralflow as nf
from neuralflow.errors import DivergenceError, InputError


def test_gd_iterates_follow_the_update_rule_and_record_measurements():
    A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    p = nf.problems.quadratic(A, theta0=[1.0, 1.0])
    lr = 0.1
    traj = nf.run_gd(p, lr, 5, progress=False)
    expected = torch.stack([torch.tensor([0.9**k, 0.6**k], dtype=torch.float64) for k in range(6)])
    assert torch.allclose(traj.iterates, expected, rtol=1e-13)
    assert torch.equal(traj.steps, torch.arange(6))
    assert torch.allclose(traj.sharpness[:, 0], torch.full((6,), 4.0, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(traj.loss, 0.5 * (expected**2 * torch.tensor([1.0, 4.0])).sum(1))
    assert torch.allclose(traj.grad_norm, (expected * torch.tensor([1.0, 4.0])).norm(dim=1))
    # Top eigenvector is e2: the update along it is -lr * 4 * x2.
    assert torch.allclose(traj.update_u.abs(), lr * 4 * expected[:, 1], rtol=1e-6)
    assert traj.eos_onset is None


def test_store_every_keeps_memory_bounded_and_the_last_step():
    p = nf.problems.zhu_quartic()
    traj = nf.run_gd(p, 0.05, 25, store_every=10, eig_every=5, progress=False)
    assert traj.steps.tolist() == [0, 10, 20, 25]
    assert traj.history["loss"].shape == (26,)
    assert torch.isnan(traj.history["sharpness"][1, 0]) and torch.isfinite(traj.history["sharpness"][5, 0])
    dense = nf.run_gd(p, 0.05, 25, eig_every=0, progress=False)
    assert torch.allclose(traj.iterates, dense.iterates[[0, 10, 20, 25]], rtol=0, atol=0)


def test_zhu_quartic_reaches_the_edge_of_stability():
    # Zhu et al.: lr = 0.2 from (3.2, 0.3); on xy = 1 sharpness 2 (x^2 + y^2) falls until it meets 2/lr = 10.
    p = nf.problems.zhu_quartic()
    traj = nf.run_gd(p, 0.2, 400, progress=False)
    onset = traj.eos_onset
    assert onset is not None
    late = traj.history["sharpness"][300:, 0]
    assert abs(late.median().item() - 10.0) < 0.5
    # Period-2 oscillation along the top eigenvector: the update flips sign step to step.
    u = traj.history["update_u"][300:]
    flips = (u[1:] * u[:-1] < 0).float().mean().item()
    assert flips > 0.9


def test_divergence_names_the_step_and_keeps_the_partial_trajectory():
    A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    p = nf.problems.quadratic(A)
    with pytest.raises(DivergenceError, match=r"diverged at step \d+.*sharpness 10") as err:
        nf.run_gd(p, 0.5, 2000, progress=False)  # |1 - 0.5 * 10| = 4: explodes
    partial = err.value.partial
    assert isinstance(partial, nf.Trajectory) and len(partial) > 100
    assert torch.isfinite(partial.iterates).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"lr": math.nan}, "lr must be"),
        ({"lr": math.inf}, "lr must be"),
        ({"steps": 0}, "steps must be"),
        ({"n_eigs": 3}, "n_eigs must be"),
        ({"store_every": 0}, "store_every must be"),
        ({"eig_every": -1}, r"eig_every must be a non-negative int \(0 = never\)"),
        ({"eig_retries": 1.5}, "eig_retries must be a non-negative int"),
        ({"checkpoint_every": True}, "checkpoint_every must be a non-negative int"),
        ({"noise_seed": -1}, "noise_seed must be a non-negative int"),
        ({"noise": -1e-3}, "noise must be a finite non-negative"),
        ({"theta0": torch.ones(3, dtype=torch.float64)}, "2 parameters"),
        ({"theta0": torch.ones(2, dtype=torch.float32)}, "dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    p = nf.problems.zhu_quartic()
    args = {"lr": 0.1, "steps": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        nf.run_gd(p, args.pop("lr"), args.pop("steps"), progress=False, **args)


def _median_late_sharpness(traj, start):
    s = traj.history["sharpness"][start:, 0]
    return s[torch.isfinite(s)].median().item()


def test_small_digits_net_sharpens_to_the_edge_of_stability():
    # A faster stand-in for the full check below (Cohen et al. 2025 set-up: n = 500, widths (32, 32), lr = 0.15).
    p = nf.problems.mlp_digits(n=500, widths=(32, 32), seed=0)
    traj = nf.run_gd(p, 0.15, 800, eig_every=10, store_every=100, progress=False)
    s = traj.history["sharpness"][:, 0]
    assert s[0] < 0.6 * traj.eos_threshold  # progressive sharpening starts well below 2/lr
    assert traj.eos_onset is not None and 150 < traj.eos_onset < 450
    assert abs(_median_late_sharpness(traj, 500) / traj.eos_threshold - 1) < 0.05


@pytest.mark.slow
def test_digits_edge_of_stability_full_size():
    # Measured reference values (Cohen et al. 2021 set-up on digits): sharpness 6.9 at step 0, crosses
    # 2/lr = 20 near step 800, then hovers at 20.
    p = nf.problems.mlp_digits(n=1000, widths=(64, 64), seed=0)
    traj = nf.run_gd(p, 0.1, 3000, eig_every=10, store_every=100, progress=False)
    s = traj.history["sharpness"][:, 0]
    assert s[0].item() == pytest.approx(6.92, abs=0.05)
    assert 600 < traj.eos_onset < 900
    assert abs(_median_late_sharpness(traj, 1500) / 20.0 - 1) < 0.05
    assert traj.history["loss"][-1] < 0.5 * traj.history["loss"][0]
