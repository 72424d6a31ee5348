"""Wrong data are refused with a clear error: a trajectory of another problem, targets of the wrong shape,
a NaN starting point, half precision."""

from __future__ import annotations

import math

import pytest
import torch

import neuralflow as nf
from neuralflow.corrections import TermLibrary
from neuralflow.errors import InputError


def test_fit_refuses_a_trajectory_that_its_problem_does_not_reproduce():
    """Digits data of n 60 on a model built on n 30: same name and dimension, another loss at the first iterate."""
    lr = 0.05
    traj = nf.run_gd(nf.problems.mlp_digits(n=60, widths=(4,)), lr, 8, eig_every=0, progress=False)
    other = nf.problems.mlp_digits(n=30, widths=(4,))
    assert other.dim == traj.dim and other.name == traj.problem["name"]
    model = nf.Hybrid(nf.flows.GradientFlow(other, lr), TermLibrary(other, lr, terms=["Hg"]))
    recorded = float(traj.loss[0])
    with pytest.raises(InputError, match=rf"gives loss [\d.]+ .* recorded {recorded:.12g}.*another problem"):
        nf.fit(model, traj, window=4, method="regression", progress=False)
    same = nf.problems.mlp_digits(n=60, widths=(4,))
    model = nf.Hybrid(nf.flows.GradientFlow(same, lr), TermLibrary(same, lr, terms=["Hg"]))
    assert math.isfinite(nf.fit(model, traj, window=4, method="regression", progress=False).coefficients["Hg"])


@pytest.mark.parametrize("shape", [(20, 1), (20,), (20, 3, 1), (20, 1, 3)])
def test_from_module_refuses_targets_of_the_wrong_shape_instead_of_broadcasting(shape):
    module = torch.nn.Linear(5, 3, dtype=torch.float64)
    x = torch.randn(20, 5, dtype=torch.float64)
    with pytest.raises(InputError, match=r"targets have shape .* outputs have shape \(N, 3\)"):
        nf.problems.from_module(module, x, torch.randn(shape, dtype=torch.float64))
    with pytest.raises(InputError, match="outputs' shape"):
        nf.problems.from_module(module, x, torch.randn(shape, dtype=torch.float64), loss="ce")
    assert nf.problems.from_module(module, x, torch.randint(0, 3, (20,)), loss="ce").dim == 18


def test_a_nan_starting_point_is_an_input_error_not_a_divergence():
    problem = nf.problems.zhu_quartic()
    for bad in (torch.tensor([math.nan, 1.0], dtype=torch.float64), torch.tensor([math.inf, 1.0], dtype=torch.float64)):
        with pytest.raises(InputError, match="theta0 contains NaN or inf"):
            nf.run_gd(problem, 0.1, 5, theta0=bad, progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_up_front(dtype):
    with pytest.raises(InputError, match="float64 .* or float32.*half precision"):
        nf.problems.mlp_digits(n=10, widths=(4,), dtype=dtype)
    with pytest.raises(InputError, match="half precision"):
        nf.problems.from_function(lambda t: (t**2).sum(), torch.ones(3, dtype=dtype))
