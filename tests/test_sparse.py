"""Sparse regression: exact supports, ties below numerical resolution, blocked folds, every BLAS kernel."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neuralflow as nf
from neuralflow.report import gate_formula
from neuralflow.sparse import cv_folds, sparse_regression, training_masks

BASIS = ("1", "x", "x2", "relu", "step")


def _random_gate_problems(n: int, seed: int):
    """Noise-free gated coefficients ``c(x)``, ``x = lr S - 2``, on runs that end shortly after the edge."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        B = int(rng.integers(40, 160))
        x = torch.linspace(-rng.uniform(0.3, 1.5), rng.uniform(0.05, 0.6), B, dtype=torch.float64)
        columns = {"1": torch.ones_like(x), "x": x, "x2": x * x, "relu": x.clamp_min(0), "step": (x > 0).double()}
        k = int(rng.integers(1, 4))
        true = sorted(int(j) for j in rng.choice(len(BASIS), size=k, replace=False))
        # Terms of comparable size (within a factor of 10), the whole formula at any scale: a term 1e6 times
        # smaller than the rest is below the resolution of the normal equations, a tie, not a defect.
        coef = rng.uniform(0.2, 2, size=k) * rng.choice([-1, 1], size=k) * 10.0 ** rng.uniform(-4, 1)
        c = sum(float(a) * columns[BASIS[j]] for a, j in zip(coef, true, strict=True))
        yield x, c, [BASIS[j] for j in true]


def test_gate_formula_of_lr_s_knot_at_two():
    s = torch.linspace(1.2, 2.4, 80, dtype=torch.float64)  # lr S
    c = 0.05 + 0.7 * (s - 2).clamp_min(0)
    formula = gate_formula({"lr_S": s}, c)
    assert formula.text() == "0.05 + 0.7 relu(lr S - 2)"
    assert formula.explained == pytest.approx(1.0, abs=1e-9)


def test_noise_free_formulas_are_recovered_when_the_edge_comes_late_in_the_run():
    # The relu/step terms are active only on the last 3-50 percent of the run. With one contiguous block per
    # fold, their whole active region can sit in the held-out fold, where they cannot be validated: the old
    # folds got 38 of these 150 wrong. Blocks dealt over the run (with their buffers) leave only regions
    # shorter than about three blocks of 25, 12 percent of the run.
    wrong = []
    for x, c, true in _random_gate_problems(150, seed=0):
        got = [kind for kind, _, _ in gate_formula({"lr_S_minus_2": x}, c).basis]
        if got != true:
            wrong.append(float((x > 0).double().mean()))  # fraction of the run past the edge
    assert len(wrong) <= 10, wrong
    assert max(wrong, default=0.0) < 0.15, wrong


def test_exact_fits_are_ties_and_the_sparsest_wins():
    gen = torch.Generator().manual_seed(3)
    F = torch.randn(60, 5, 30, generator=gen, dtype=torch.float64)
    y = 2.0 * F[:, 0] - 0.5 * F[:, 2]  # every superset of {0, 2} fits exactly
    sol = sparse_regression(F, y)
    exact = sol.supports[:, 0] & sol.supports[:, 2]
    assert exact.sum() > 1 and (sol.cv_error[exact] == 0).all()  # round-off below resolution is a tie at zero
    assert (sol.cv_error[~exact] > 0).all()
    np.testing.assert_allclose(sol.coefficients, [2.0, 0, -0.5, 0, 0], rtol=1e-12, atol=0)
    assert sol.coefficients[1] == 0 and sol.coefficients[3] == 0 and sol.coefficients[4] == 0


def test_folds_are_blocks_dealt_over_the_whole_run_with_a_buffer_around_each():
    fold, h = cv_folds(100, 5)
    assert np.bincount(fold).tolist() == [20] * 5
    for f in range(5):  # every fold holds data from each fifth of the run
        assert all(((fold == f) & (np.arange(100) // 20 == q)).any() for q in range(5))
    assert (np.diff(fold) != 0).sum() == 24 and h == 4  # 25 contiguous blocks of 4, buffers of one block
    train = training_masks(fold, 5, h)
    for f in range(5):
        held = np.nonzero(fold == f)[0]
        gap = np.abs(np.arange(100)[:, None] - held[None, :]).min(1)
        assert (train[f] == (gap > h)).all()  # neither held out nor within h of a held-out sample
    assert sorted(set(cv_folds(7, 5)[0].tolist())) == [0, 1, 2, 3, 4]  # few samples: still every fold used


def test_sparse_regression_prunes_absent_fields_and_reports_what_it_cannot_express():
    gen = torch.Generator().manual_seed(1)
    F = torch.randn(60, 4, 30, generator=gen, dtype=torch.float64)
    y = 2.0 * F[:, 0] - 0.5 * F[:, 2] + 0.01 * torch.randn(60, 30, generator=gen, dtype=torch.float64)
    sol = sparse_regression(F, y)
    assert sol.coefficients[1] == 0 and sol.coefficients[3] == 0
    assert sol.coefficients[0] == pytest.approx(2.0, rel=1e-2)
    assert sol.coefficients[2] == pytest.approx(-0.5, rel=1e-2)
    assert sol.residual < 1e-4
    # A target orthogonal to every field: nothing is expressible.
    z = torch.randn(60, 30, generator=gen, dtype=torch.float64)
    q = torch.linalg.qr(F.permute(0, 2, 1).reshape(-1, 4))[0]
    z = z.reshape(-1) - q @ (q.T @ z.reshape(-1))
    assert sparse_regression(F, z.reshape(60, 30)).residual == pytest.approx(1.0, abs=1e-9)


def test_bad_shapes_are_refused():
    with pytest.raises(nf.InputError, match="X must be"):
        sparse_regression(torch.zeros(4, 2), torch.zeros(3))


def _openblas_core_types() -> list[str]:
    """OpenBLAS kernel paths this CPU can run: forcing one it lacks would be an illegal instruction."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    types = ["Prescott"]  # SSE3, every x86-64
    if "avx2" in flags:
        types.append("Haswell")
    if "avx512f" in flags:
        types.append("SkylakeX")
    return types


@pytest.mark.skipif(os.environ.get("NEURALFLOW_CORETYPE_CHILD") == "1", reason="already inside a forced kernel")
@pytest.mark.parametrize("core", _openblas_core_types() or ["default"])
def test_the_same_formulas_under_every_openblas_kernel(core):
    """This file's tests again with the BLAS kernel forced (``OPENBLAS_CORETYPE``): round-off differs, answers not."""
    env = dict(os.environ, NEURALFLOW_CORETYPE_CHILD="1")
    if core != "default":
        env["OPENBLAS_CORETYPE"] = core
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "not every_openblas_kernel"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
