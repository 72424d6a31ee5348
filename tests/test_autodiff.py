import pytest
import torch

import neuralflow as nf
from neuralflow import autodiff as ad


@pytest.fixture(scope="module")
def small_net():
    return nf.problems.mlp_digits(n=40, widths=(3,), seed=1)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4, dtype=torch.float64), torch.nn.Tanh(), torch.nn.Linear(4, 2, dtype=torch.float64)
    )
    x = torch.randn(12, 3, dtype=torch.float64)
    return nf.problems.from_module(net, x, torch.sin(x[:, :2]))


def _dense_third(problem, theta, v, w):
    def vhw(th):
        h = torch.autograd.functional.hessian(problem.loss, th, create_graph=True)
        return v @ h @ w

    th = theta.clone().requires_grad_(True)
    return torch.autograd.grad(vhw(th), th)[0]


def test_hvp_agrees_with_dense_hessian(tiny_net):
    p = tiny_net
    theta = p.theta0 + 0.05 * torch.randn(p.dim, dtype=torch.float64)
    H = torch.autograd.functional.hessian(p.loss, theta)
    V = torch.randn(3, p.dim, dtype=torch.float64)
    assert torch.allclose(ad.hvp(p, theta, V), V @ H, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ad.hvp(p, theta, V[0]), H @ V[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(ad.dense_hessian(p, theta), H, rtol=1e-10, atol=1e-12)


def test_d3_agrees_with_dense_third_derivative(tiny_net):
    p = tiny_net
    theta = p.theta0 + 0.1 * torch.randn(p.dim, dtype=torch.float64)
    V = torch.randn(2, p.dim, dtype=torch.float64)
    W = torch.randn(2, p.dim, dtype=torch.float64)
    got = ad.d3(p, theta, V, W)
    for i in range(2):
        assert torch.allclose(got[i], _dense_third(p, theta, V[i], W[i]), rtol=1e-8, atol=1e-11)
    assert torch.allclose(ad.d3(p, theta, V[0], W[0]), got[0])
    pairs = ad.Curvature(p, theta).d3_pairs(V)  # all pairs, each H v_b graph shared
    assert torch.allclose(pairs[0, 1], _dense_third(p, theta, V[0], V[1]), rtol=1e-8, atol=1e-11)
    assert torch.allclose(pairs[1, 0], pairs[0, 1]) and torch.allclose(pairs[1, 1], ad.d3(p, theta, V[1], V[1]))


def test_state_derivatives_match_the_functional_ones(small_net):
    p = small_net
    thetas = p.theta0 + 0.05 * torch.randn(2, p.dim, dtype=torch.float64)
    s = ad.StateDerivatives(p, thetas.clone().requires_grad_(True), create_graph=True)
    for b in range(2):
        assert torch.allclose(s.g[b], ad.gradient(p, thetas[b]), rtol=1e-12, atol=1e-14)
    hg = s.hvp(s.g)
    assert torch.allclose(hg[1], ad.hvp(p, thetas[1], s.g[1].detach()), rtol=1e-10, atol=1e-13)
    assert hg.requires_grad  # differentiable again: what the adjoint method needs


def test_top_eigenpairs_returns_the_largest_algebraic_eigenvalues():
    torch.manual_seed(0)
    d = 40
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    spectrum = torch.linspace(-10.0, 5.0, d, dtype=torch.float64)  # largest magnitude is negative
    A = Q @ torch.diag(spectrum) @ Q.T
    p = nf.problems.quadratic(0.5 * (A + A.T))
    res = ad.top_eigenpairs(p, p.theta0, k=3, tol=1e-9, max_iters=500, guard=1)
    assert res.converged
    assert torch.allclose(res.values, spectrum.flip(0)[:3], rtol=1e-9)
    for i in range(3):
        overlap = (res.vectors[i] @ Q[:, d - 1 - i]).abs()
        assert overlap == pytest.approx(1.0, abs=1e-8)
    assert res.n_hvp > 0


def test_eigenpairs_on_a_net_match_eigh_and_warm_start_is_cheaper(small_net):
    p = small_net
    theta = p.theta0
    evals, evecs = torch.linalg.eigh(ad.dense_hessian(p, theta))
    cold = ad.top_eigenpairs(p, theta, k=2, tol=1e-8, max_iters=500)
    assert torch.allclose(cold.values, evals.flip(0)[:2], rtol=1e-8)
    assert (cold.vectors[0] @ evecs[:, -1]).abs() == pytest.approx(1.0, abs=1e-6)
    # A slightly moved point: the warm start needs far fewer products and keeps the signs.
    moved = theta - 0.01 * ad.gradient(p, theta)
    warm = ad.top_eigenpairs(p, moved, k=2, v0=cold.block, tol=1e-8, max_iters=500)
    again = ad.top_eigenpairs(p, moved, k=2, tol=1e-8, max_iters=500)
    assert warm.n_hvp < again.n_hvp
    assert (warm.vectors * cold.vectors).sum(1).min() > 0
    assert torch.allclose(warm.values, again.values, rtol=1e-8)


def test_align_signs():
    prev = torch.eye(2, dtype=torch.float64)
    new = torch.tensor([[-1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(ad.align_signs(new, prev), torch.tensor([[1.0, -0.1], [0.0, 1.0]], dtype=torch.float64))


def test_bad_k():
    p = nf.problems.zhu_quartic()
    with pytest.raises(nf.InputError, match="k must be"):
        ad.top_eigenpairs(p, p.theta0, k=3)


def test_lobpcg_keeps_its_block_when_the_search_space_degenerates(monkeypatch):
    """A degenerate Rayleigh-Ritz pencil (e.g. non-finite products at a blown-up state) ends the iteration, no crash."""
    p = nf.problems.quadratic(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    monkeypatch.setattr(ad, "_ritz", lambda S, AS, m: None)
    res = ad.top_eigenpairs(p, p.theta0, k=1, v0=torch.tensor([[1.0, 0.1, 0.0]], dtype=torch.float64), tol=1e-12)
    assert not res.converged and res.iterations == 0
    assert 2.9 < float(res.values[0]) <= 3.0  # the Rayleigh quotient of the starting block
