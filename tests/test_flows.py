"""The physics flows: orders of accuracy, exactness on quadratics, the central flow at EoS, derivatives."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import neuralflow as nf
from neuralflow.autodiff import Curvature, d3, dense_hessian, gradient
from neuralflow.corrections import HIDDEN_TERMS
from neuralflow.flows import (
    FLOWS,
    CentralFlow,
    GradientFlow,
    ModifiedFlow,
    PrincipalFlow,
    compare,
    simulate,
    solve_sdcp,
)
from neuralflow.flows.central import WarmStart
from neuralflow.flows.principal import principal_rate

T0 = torch.zeros((), dtype=torch.float64)


def smooth_2d() -> nf.Problem:
    """A non-quadratic 2-D loss with non-zero third derivatives everywhere."""
    return nf.problems.from_function(
        lambda th: 0.25 * (th[0] ** 2 * th[1] ** 2 - 1) ** 2 + 0.1 * torch.sin(th[0] + 2 * th[1]),
        torch.tensor([1.3, 0.6], dtype=torch.float64),
    )


def tiny_net(batch_size: int | None = None) -> nf.Problem:
    torch.manual_seed(1)
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    return nf.problems.from_module(net, x, y, batch_size=batch_size)


# ------------------------------------------------------------------ modified flows


def test_modified_flow_order_of_accuracy():
    """Distance to GD after original time 1/2 shrinks like lr^(p+1) (Hairer, Lubich, Wanner ch. IX)."""
    p = smooth_2d()
    lrs = [0.04, 0.02, 0.01]
    errors = {0: [], 1: [], 2: []}
    for lr in lrs:
        k = round(0.5 / lr)
        gd = nf.run_gd(p, lr, k, eig_every=0, progress=False).iterates[-1]
        for order, flow in enumerate([GradientFlow(p, lr), ModifiedFlow(p, lr, 1), ModifiedFlow(p, lr, 2)]):
            end = simulate(flow, p.theta0, torch.tensor([0.0, k]), rtol=1e-10, atol=1e-12)[-1]
            errors[order].append(float((end - gd).norm()))
    x = torch.log(torch.tensor(lrs))
    for order, err in errors.items():
        y = torch.log(torch.tensor(err))
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        assert abs(slope - (order + 1)) < 0.3, (order, slope, err)
    assert errors[2][-1] < errors[1][-1] < errors[0][-1]


def test_modified_flow_matches_its_definition():
    """Order 2 minus order 1 is -lr^3 (H^2 g / 3 + D3L[g, g] / 12), D3L by finite differences of the Hessian."""
    p, lr = smooth_2d(), 0.1
    th = torch.tensor([0.9, 1.2], dtype=torch.float64)
    g = gradient(p, th)
    H = dense_hessian(p, th)
    eps = 1e-5
    quad = lambda x: g @ dense_hessian(p, x) @ g  # noqa: E731
    d3gg = torch.stack([(quad(th + eps * e) - quad(th - eps * e)) / (2 * eps) for e in torch.eye(2)])
    assert torch.allclose(d3gg, d3(p, th, g, g), rtol=1e-6, atol=1e-9)
    first = -lr * g - 0.5 * lr**2 * H @ g
    second = first - lr**3 * (H @ H @ g / 3 + d3gg / 12)
    assert torch.allclose(ModifiedFlow(p, lr, 1)(T0, th), first, rtol=1e-10, atol=1e-13)
    assert torch.allclose(ModifiedFlow(p, lr, 2)(T0, th), second, rtol=1e-6, atol=1e-12)
    batch = torch.stack([th, th + 0.1])
    assert torch.allclose(ModifiedFlow(p, lr, 2)(T0, batch)[0], second, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ principal flow


def test_principal_flow_reproduces_gd_on_a_quadratic():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.3, -0.5], dtype=torch.float64)) @ Q.T
    p, lr = nf.problems.quadratic(0.5 * (A + A.T)), 0.1  # lr * lambda_max = 0.9 < 1
    traj = nf.run_gd(p, lr, 10, eig_every=0, progress=False)
    states = simulate(PrincipalFlow(p, lr), p.theta0, traj.times, rtol=1e-9, atol=1e-11)
    rel = (states - traj.iterates).norm(dim=1) / traj.iterates.norm(dim=1)
    assert float(rel.max()) < 1e-8
    # the top-k flow with k = d resolves everything; with k < d the rest is gradient flow
    th = p.theta0 + 0.3
    assert torch.allclose(PrincipalFlow(p, lr, k=5)(T0, th), PrincipalFlow(p, lr)(T0, th), rtol=1e-6, atol=1e-9)
    lam, U = torch.linalg.eigh(A)
    g = A @ th
    top2 = U[:, -2:]
    expected = top2 @ (principal_rate(lam[-2:], lr) * (top2.T @ g)) - lr * (g - top2 @ (top2.T @ g))
    assert torch.allclose(PrincipalFlow(p, lr, k=2)(T0, th), expected, rtol=1e-6, atol=1e-9)


def test_principal_rate_is_smooth_and_takes_the_real_part():
    lr = 0.1
    lam = torch.tensor([-3.0, -1e-4, 0.0, 1e-4, 5.0, 15.0, 25.0], dtype=torch.float64)
    expected = torch.tensor([math.log(abs(1 - lr * v)) / v if v else -lr for v in lam.tolist()], dtype=torch.float64)
    assert torch.allclose(principal_rate(lam, lr), expected, rtol=1e-10)


# ------------------------------------------------------------------ central flow


def test_sdcp_closed_form_and_complementarity():
    A = torch.tensor([[-0.8]], dtype=torch.float64)
    X, _ = solve_sdcp(A, torch.tensor([[2.0]], dtype=torch.float64))
    assert float(X) == pytest.approx(0.4)
    assert float(solve_sdcp(-A, torch.tensor([[2.0]], dtype=torch.float64))[0]) == 0.0
    torch.manual_seed(3)
    k = 3
    D = torch.randn(k, k, 7, dtype=torch.float64)
    D = 0.5 * (D + D.transpose(0, 1))
    flat = D.reshape(k * k, -1)
    B = flat @ flat.T
    A = torch.randn(k, k, dtype=torch.float64)
    A = 0.5 * (A + A.T) - 0.5 * torch.eye(k, dtype=torch.float64)
    X, res = solve_sdcp(A, B, tol=1e-12)
    S = A + (B @ X.reshape(-1)).reshape(k, k)
    assert res < 1e-10
    assert float(torch.linalg.eigvalsh(X)[0]) > -1e-10 and float(torch.linalg.eigvalsh(S)[0]) > -1e-8
    assert abs(float((X * S).sum())) < 1e-8
    assert float(X.norm()) > 0.1  # a non-trivial solution: the test exercises the active set


def test_central_flow_single_eigenvalue_reduces_to_closed_form():
    """At S = 2/lr, sigma^2 = max(0, -2 <g, grad S> / ||grad S||^2) and dS/dt = 0."""
    p = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    th = p.theta0
    lam, U = torch.linalg.eigh(dense_hessian(p, th))
    u, lr = U[:, -1], 2 / float(lam[-1])  # exactly at the edge
    grad_s, g = d3(p, th, u, u), gradient(p, th)
    flow = CentralFlow(p, lr, critical=1.99)
    with pytest.raises(nf.InputError, match="2/lr"):  # a larger step: the start is above the edge
        CentralFlow(p, lr * 1.01)(T0, th)
    v = flow(T0, th)
    sigma2 = max(0.0, float(-2 * g @ grad_s / (grad_s @ grad_s)))
    assert sigma2 > 0
    assert float(flow.last.sigma2[0]) == pytest.approx(sigma2, rel=1e-5)
    assert torch.allclose(v, -lr * (g + 0.5 * sigma2 * grad_s), rtol=1e-5, atol=1e-10)
    assert abs(float(grad_s @ v)) < 1e-6 * float(grad_s.norm() * v.norm())  # d lambda / dt = 0
    assert float(flow.predicted_loss(th)) == pytest.approx(float(p.loss(th)) + sigma2 / lr, rel=1e-5)
    # ... unless the eigenvalue is held where it is: d lambda / dt = 0 with the closed-form sigma^2
    held = CentralFlow(p, lr * 1.01, critical=1.99, above_edge="hold")
    v_held = held(T0, th)
    assert abs(float(grad_s @ v_held)) < 1e-6 * float(grad_s.norm() * v_held.norm())
    assert torch.allclose(v_held, -lr * 1.01 * (g + 0.5 * sigma2 * grad_s), rtol=1e-5, atol=1e-10)


def test_central_flow_several_critical_eigenvalues_solve_the_complementarity_problem():
    """Along the flow's velocity, C = (2/lr - M)/tau - dM/dt is PSD, X is PSD and <X, C> = 0 (dM/dt from D3L)."""
    p = tiny_net()
    th = p.theta0 + 0.05
    H = dense_hessian(p, th)
    lam, vecs = torch.linalg.eigh(H)
    lr = 1.999 / float(lam[-1])
    critical = 0.999 * float(lam[-3]) * lr  # the top three eigenvalues are critical
    flow = CentralFlow(p, lr, critical=critical, relaxation=0.5)
    v = flow(T0, th)
    s = flow.last
    assert s.n_critical == 3
    assert torch.allclose(s.values[:3], lam.flip(0)[:3], rtol=1e-6)
    U = s.vectors
    eps = 1e-6
    dM = (U @ dense_hessian(p, th + eps * v) @ U.T - U @ dense_hessian(p, th - eps * v) @ U.T) / (2 * eps)
    C = (2 / lr * torch.eye(3, dtype=th.dtype) - U @ H @ U.T) / 0.5 - dM
    scale = float(C.abs().max())
    assert float(torch.linalg.eigvalsh(0.5 * (C + C.T))[0]) > -1e-6 * scale
    assert float(torch.linalg.eigvalsh(s.X)[0]) > -1e-10
    assert abs(float((s.X * C).sum())) < 1e-6 * scale * float(s.X.norm())
    assert float(s.X.norm()) > 0  # the oscillation is active
    assert torch.allclose(v, -lr * (gradient(p, th) + 0.5 * torch.einsum("kl,kld->d", s.X, s.D)))
    # an evaluation that reuses the Gram matrix (default gram_every=3) gets <D_kl, g> and grad <H, Sigma> from k
    # passes instead of the D_kl; near the state where the Gram matrix was made it must give the same field
    assert s.D is not None
    nudge = 1e-7 * v
    flow(T0, th + nudge)  # recomputed: no move was known before it
    assert flow.last.D is not None
    exact = flow.last
    reused = flow(T0, th + nudge)
    assert flow.last.D is None
    assert torch.allclose(flow.last.X, exact.X, rtol=1e-8, atol=1e-12)
    assert float((reused - exact.velocity(lr)).norm()) < 1e-8 * float(v.norm())
    far = flow(T0, th + 1e-3 * v)  # a jump: recomputed, not reused
    assert flow.last.D is not None and torch.isfinite(far).all()
    with pytest.raises(nf.InputError, match="above_edge"):
        CentralFlow(p, 0.1, above_edge="relax")
    with pytest.raises(nf.InputError, match="gram_every"):
        CentralFlow(p, lr, gram_every=0)
    # the same with the data in three parts (graphs built one at a time), reusing and recomputing
    chunked = CentralFlow(tiny_net(batch_size=4), lr, critical=critical, relaxation=0.5)
    chunked(T0, th)
    for _ in range(2):  # recomputed, then reused; its own cold eigen-solve (tol 1e-3): measured 2e-7
        assert float((chunked(T0, th + nudge) - exact.velocity(lr)).norm()) < 1e-6 * float(v.norm())
    assert chunked.last.D is None
    # the reused Gram matrix follows the eigenvectors when they reorder or flip within the cluster
    curv = Curvature(p, th)
    D = curv.d3_pairs(U)
    warm = WarmStart(gram=D.reshape(9, -1) @ D.reshape(9, -1).T, U=U, theta_gram=th, move=1.0)
    swapped = torch.stack([-U[1], U[0], U[2]])
    D2 = curv.d3_pairs(swapped)
    carried = warm.reusable_gram(th, swapped, gram_every=2)
    assert torch.allclose(carried, D2.reshape(9, -1) @ D2.reshape(9, -1).T, rtol=1e-10, atol=1e-12)
    assert warm.reusable_gram(th, torch.stack([U[0], U[1], (U[2] + U[0]) / 2**0.5]), gram_every=2) is None
    predicted = float(flow.predicted_loss(th))
    last = flow.last
    sigma = last.vectors.T @ last.X @ last.vectors  # <H, Sigma> = tr(H Sigma)
    assert predicted == pytest.approx(float(p.loss(th)) + 0.5 * float((H * sigma).sum()))


@pytest.mark.slow
def test_central_flow_tracks_gd_at_the_edge_of_stability():
    """Small digits EoS run: sharpness pinned at 2/lr; once GD's overshoot collapses, closer to smoothed GD.

    On this small net GD overshoots 2/lr by 20 percent for 150 steps after the onset (step 120) while
    its oscillation grows from round-off, following gradient flow (the onset transient of Cohen et al. 2025);
    at step ~270 it collapses onto the edge, where the central flow already is.
    """
    p, lr, steps = nf.problems.mlp_digits(n=200, widths=(8, 8)), 0.2, 300
    traj = nf.run_gd(p, lr, steps, eig_every=10, progress=False)
    assert traj.eos_onset is not None and traj.eos_onset < 150
    gf = GradientFlow(p, lr)
    gf.solver = {"method": "rk4", "options": {"step_size": 1.0}}
    central = CentralFlow(p, lr)
    cmp = compare(traj, gf, central, problem=p, n_probe=16)
    grad_rec, central_rec = cmp.records
    sharp = central_rec.sharpness[traj.steps[central_rec.probe] >= traj.eos_onset]
    threshold = 2 / lr
    assert float(sharp.max()) < 1.01 * threshold
    assert float(sharp.min()) > 0.99 * threshold
    assert float(grad_rec.sharpness[-1]) > 1.2 * threshold  # gradient flow leaves the edge
    assert central.n_critical_max >= 1
    late = slice(-20, None)  # after the collapse
    assert float(central_rec.distance_smoothed[late].mean()) < 0.7 * float(grad_rec.distance_smoothed[late].mean())
    assert float(central_rec.distance[-1]) < 0.6 * float(grad_rec.distance[-1])
    text = str(cmp)
    assert "central" in text and "dist smoothed" in text
    assert cmp.to_dict()["flows"][1]["flow"] == "central"
    assert len(cmp.figure().axes) == 3


# ------------------------------------------------------------------ derivatives for the adjoint


def _vjp_vs_finite_differences(flow, th: torch.Tensor, eps: float = 1e-6) -> None:
    torch.manual_seed(4)
    w = torch.randn_like(th)
    x = th.clone().requires_grad_(True)
    out = flow(T0, x)
    (vjp,) = torch.autograd.grad(out, x, w)
    along = lambda x: (w @ flow(T0, x.requires_grad_(True))).detach()  # noqa: E731
    fd = torch.stack([(along(th + eps * e) - along(th - eps * e)) / (2 * eps) for e in torch.eye(len(th)).to(th)])
    assert torch.allclose(vjp, fd, rtol=1e-5, atol=1e-8), (flow.name, vjp, fd)
    assert torch.allclose(out.detach(), flow(T0, th), rtol=1e-10, atol=1e-13)  # same field with and without graph


@pytest.mark.parametrize("name", ["gradient", "modified1", "modified2", "principal"])
def test_vector_jacobian_products_match_finite_differences(name):
    p = tiny_net()
    th = p.theta0 + 0.05
    _vjp_vs_finite_differences(FLOWS[name](p, 0.1), th)


def test_central_flow_jacobian_with_frozen_sigma_matches_finite_differences():
    """The autograd Jacobian of the central flow is -lr [H + 1/2 D4L[Sigma]] with U and X frozen."""
    p = tiny_net()
    th = p.theta0 + 0.05
    lam = float(torch.linalg.eigvalsh(dense_hessian(p, th))[-1])
    flow = CentralFlow(p, 1.999 / lam)
    state = flow.solve(th)
    assert state.n_critical == 1
    X = torch.tensor([[0.7]], dtype=th.dtype)
    frozen = replace(state, X=X, drift=torch.einsum("kl,kld->d", X, state.D))
    flow.solve = lambda theta, index=0: frozen
    _vjp_vs_finite_differences(flow, th)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_a_clear_message():
    p = smooth_2d()
    for order in (0, 3, 1.5, True):
        with pytest.raises(nf.InputError, match="order must be 1 or 2"):
            ModifiedFlow(p, 0.1, order=order)
    relu = nf.problems.mlp_digits(n=20, widths=(4,), activation="relu")
    with pytest.raises(nf.InputError, match="third derivatives"):
        ModifiedFlow(relu, 0.1, order=2)
    with pytest.raises(nf.InputError, match="third derivatives"):
        CentralFlow(relu, 0.1)
    with pytest.raises(nf.InputError, match="pass k"):
        PrincipalFlow(nf.problems.mlp_digits(n=20, widths=(32,)), 0.1)


def test_blow_up_and_non_finite_states_name_the_time():
    # dx/dt = -lr * (-x^3)... L = -x^4 / 4 blows up in finite time t = 1 / (2 lr x0^2) = 12.5
    p = nf.problems.from_function(lambda th: -(th**4).sum() / 4, torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(nf.DivergenceError, match=r"t = 1[0-9]\."):
        simulate(GradientFlow(p, 0.04), p.theta0, torch.tensor([0.0, 5.0, 20.0]))
    with pytest.raises(nf.DivergenceError, match="t = "):
        simulate(GradientFlow(p, 0.04), p.theta0, torch.arange(0.0, 30.0), solver="euler", step_size=1.0)
    with pytest.raises(nf.InputError, match="NaN or inf"):
        simulate(GradientFlow(p, 0.04), torch.tensor([math.nan], dtype=torch.float64), torch.tensor([0.0, 1.0]))
    with pytest.raises(nf.InputError, match="increasing"):
        simulate(GradientFlow(p, 0.04), p.theta0, torch.tensor([1.0, 0.0]))


def test_registry_and_approximations():
    p = smooth_2d()
    terms = {"g", "Hg", "H2g", "D3gg", "gradS", "gradScrit", "u_ug"} | set(HIDDEN_TERMS)  # theta and hidden-state
    for name, make in FLOWS.items():
        flow = make(p, 0.1)
        assert flow.config()["name"] == name
        assert flow.approximations
        for a in flow.approximations:
            assert set(a.revised_by) <= terms and a.statement and a.reference
    names = {a.name for a in ModifiedFlow(p, 0.1, 2).approximations}
    assert "continuous-time-order-3" in names
    assert "no-third-derivatives" in {a.name for a in PrincipalFlow(p, 0.1).approximations}
    assert "single-critical-eigenvalue" in {a.name for a in CentralFlow(p, 0.1, max_critical=1).approximations}


def test_compare_command_line(tmp_path, capsys):
    from neuralflow.cli import main

    p = nf.problems.scalar_factorization(3)
    path = tmp_path / "run.nft"
    nf.run_gd(p, 0.1, 30, eig_every=5, progress=False).save(path)
    fig = tmp_path / "fig.png"
    assert main(["compare", str(path), "--flows", "gradient,modified1", "--steps", "20", "--out", str(fig)]) == 0
    out = capsys.readouterr().out
    assert "modified1" in out and "dist GD" in out and fig.exists()
    assert main(["compare", str(path), "--flows", "gradient,nonsense"]) == 2
