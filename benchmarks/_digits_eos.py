"""The edge-of-stability run the EoS benchmarks share: GD on the 500-digit tanh MLP at lr = 0.15."""

from __future__ import annotations

import time

import neuralflow as nf

LR = 0.15


def digits_eos_run(steps: int) -> tuple[nf.Problem, nf.Trajectory, float]:
    """``mlp_digits(n=500, widths=(32, 32), seed=0)`` and ``steps`` GD steps with the sharpness every step; seconds."""
    t0 = time.perf_counter()
    problem = nf.problems.mlp_digits(n=500, widths=(32, 32), seed=0)
    traj = nf.run_gd(problem, lr=LR, steps=steps, eig_every=1, progress=False)
    return problem, traj, time.perf_counter() - t0
