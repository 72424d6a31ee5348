"""Tests that pin numbers a mutation could change silently: the window error's scale, the uncertainty's
calibration, the balance weights on noisy data, and the ranges of val_fraction and CentralFlow's relaxation."""

from __future__ import annotations

import math

import pytest
import torch

import neuralflow as nf
from neuralflow.corrections import TermLibrary
from neuralflow.errors import InputError
from neuralflow.fit.optimisers import gauss_newton
from neuralflow.fit.shooting import SolverFailure

LR = 0.1
RATES = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)  # the quadratic's curvatures


def _quadratic():
    return nf.problems.quadratic(torch.diag(RATES), theta0=torch.ones(8, dtype=torch.float64))


def _noisy_flow(c: float, sigma: float, steps: int, seed: int, noisy_from: int | None = None) -> nf.Trajectory:
    """Samples of ``x' = -(1 - c) lr A x`` (gradient flow with coefficient ``c`` on the term ``g``) at integer
    times, with independent Gaussian increments of size ``sigma`` (``1e5 sigma`` from step ``noisy_from`` on)."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.exp(-LR * RATES * (1 - c))
    x = [torch.ones(8, dtype=torch.float64)]
    for k in range(steps):
        s = sigma * (1e5 if noisy_from is not None and k >= noisy_from else 1.0)
        x.append(x[-1] * decay + s * torch.randn(8, generator=gen, dtype=torch.float64))
    x = torch.stack(x)
    nan = torch.full((len(x),), math.nan, dtype=torch.float64)
    return nf.Trajectory(
        lr=LR,
        steps=torch.arange(len(x)),
        iterates=x,
        loss=nan,
        grad_norm=nan,
        sharpness=nan[:, None],
        update_u=nan,
        problem=_quadratic().description,
    )


def _fit_g(traj: nf.Trajectory, **options) -> nf.FitResult:
    p = _quadratic()
    model = nf.Hybrid(nf.flows.GradientFlow(p, LR), TermLibrary(p, LR, terms=["g"]))
    return nf.fit(model, traj, window=10, method="regression", val_fraction=0.0, progress=False, **options)


def test_the_window_error_is_the_mean_over_outputs_normalised_by_the_mean_squared_displacement():
    """GD on 1/2 a x^2 against gradient flow, both in closed form: e_k = ((1 - lr a)^k - exp(-lr a k))^2 x_s^2."""
    a, x0, window = 2.0, 1.5, 6
    traj = nf.run_gd(nf.problems.quadratic([[a]], theta0=[x0]), LR, 30, eig_every=0, progress=False)
    p = nf.problems.quadratic([[a]], theta0=[x0])
    res = nf.fit(
        nf.Hybrid(nf.flows.GradientFlow(p, LR), TermLibrary(p, LR, terms=["Hg"])),
        traj,
        window=window,
        method="regression",
        val_fraction=0.25,
        step_size=0.1,
        progress=False,
    )
    starts = res.windows["step"].to(torch.float64)
    k = torch.arange(1, window + 1, dtype=torch.float64)
    xs = x0 * (1 - LR * a) ** starts[:, None]
    gd = xs * (1 - LR * a) ** k
    flow = xs * torch.exp(-LR * a * k)
    displacement = (gd - xs).square().mean()  # over every window and output
    expected = (flow - gd).square().mean(1) / displacement  # mean over the outputs of each window
    assert torch.allclose(res.physics_window_errors, expected, rtol=1e-6)
    assert res.normaliser == pytest.approx(float(displacement), rel=1e-12)
    shown = res.windows["validation"]
    assert res.physics_error == pytest.approx(float(expected[shown].mean()), rel=1e-6)


def test_the_95_percent_interval_covers_the_true_coefficient_about_95_percent_of_the_time():
    """40 synthetic runs with known noise. The OLS standard error ignores the correlation that the 5-point
    derivative puts between neighbouring points: for independent increments the spread of the estimate is
    sqrt(144/100) = 1.2 times the stated one (the stencil's long-run over short-run variance), so the
    nominal 95 percent interval covers about 89 percent (measured 0.89 over 150 runs). A factor of 10 either
    way (the mutation this guards) puts the spread of the z-scores at 0.12 or 12."""
    truth = 0.2
    z = []
    for seed in range(40):
        res = _fit_g(_noisy_flow(truth, 1e-3, 40, seed))
        z.append((res.coefficients["g"] - truth) / res.uncertainty["g"])
    z = torch.tensor(z)
    assert 0.8 < float(z.std()) < 1.7
    assert 0.75 <= float((z.abs() <= 1.96).double().mean()) < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_weights_discount_a_stretch_of_heavy_noise(seed):
    """The second half of the run is 1e5 times noisier: unweighted least squares follows its noise (and the bias
    its random walk puts in the regressors, about 0.3), the balanced fit the quiet half (within 3 standard errors).
    Inverted weights would make the noisy half decide alone."""
    traj = _noisy_flow(0.2, 1e-6, 80, 100 + seed, noisy_from=40)
    plain, balanced = _fit_g(traj), _fit_g(traj, balance=True)
    err_plain, err_balanced = abs(plain.coefficients["g"] - 0.2), abs(balanced.coefficients["g"] - 0.2)
    assert err_balanced < 3 * balanced.uncertainty["g"]
    assert err_plain > 10 * err_balanced


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_val_fraction_outside_zero_one_is_refused(val_fraction):
    with pytest.raises(InputError, match=r"val_fraction must be in \[0, 1\)"):
        p = _quadratic()
        nf.fit(
            nf.Hybrid(nf.flows.GradientFlow(p, LR), TermLibrary(p, LR, terms=["g"])),
            _noisy_flow(0.2, 1e-3, 40, 0),
            window=10,
            method="regression",
            val_fraction=val_fraction,
            progress=False,
        )


@pytest.mark.parametrize("relaxation", [0, 0.0, -1.0, math.nan, math.inf, True])
def test_central_flow_relaxation_must_be_a_positive_finite_time(relaxation):
    p = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    with pytest.raises(InputError, match="relaxation must be a positive finite time"):
        nf.flows.CentralFlow(p, 0.1, relaxation=relaxation)


class _FailingFarOut:
    """Residual ``exp(p) - 1`` whose solve fails beyond ``p = 5`` (a window that diverges at a wild trial point)."""

    def __init__(self, p0: float) -> None:
        self.p = torch.tensor([p0], dtype=torch.float64)
        self.failed = 0

    def get(self) -> torch.Tensor:
        return self.p.clone()

    def set(self, p: torch.Tensor) -> None:
        self.p = p.clone()

    def residuals(self, grad: bool = False) -> torch.Tensor:
        if float(self.p[0]) > 5:
            self.failed += 1
            raise SolverFailure("the ODE solution became non-finite")
        return torch.exp(self.p) - 1

    def jacobian(self, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(p)[:, None]


def test_gauss_newton_rejects_a_trial_step_whose_solve_fails():
    """From ``p = -3`` the undamped step lands at ``p = 16``, where the solve fails: the step is rejected and damped
    (not the end of the fit), and the fit reaches the root ``p = 0``."""
    obj = _FailingFarOut(-3.0)
    losses = []
    gauss_newton(obj, "gauss-newton", 30, 1e-14, 0.0, lambda it, loss, p: losses.append(loss) and False)
    assert obj.failed >= 1 and abs(float(obj.p[0])) < 1e-6
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
