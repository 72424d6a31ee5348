"""Correction terms agree with dense linear algebra; libraries, gates and hybrids behave as documented."""

from __future__ import annotations

import pytest
import torch
from test_fit import one_thread, tanh_net  # noqa: F401  (the thread fixture applies to this module too)

import neuralflow as nf
from neuralflow.autodiff import d3, dense_hessian, gradient
from neuralflow.corrections import TERMS, Hybrid, NeuralCorrection, TermLibrary
from neuralflow.flows import GradientFlow


@pytest.fixture(scope="module")
def problem() -> nf.Problem:
    return tanh_net(inputs=3, hidden=4, n=20)


@pytest.fixture(scope="module")
def states(problem) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return problem.theta0 + 0.3 * torch.randn(3, problem.dim, dtype=torch.float64, generator=gen)


def test_fields_match_dense_linear_algebra(problem, states):
    lr = 0.07
    lib = TermLibrary(problem, lr, list(TERMS))
    fields = lib.fields(states)
    for b, theta in enumerate(states):
        H, g = dense_hessian(problem, theta), gradient(problem, theta)
        evals, evecs = torch.linalg.eigh(H)
        u = evecs[:, -1]
        expected = {
            "g": lr * g,
            "Hg": lr**2 * H @ g,
            "H2g": lr**3 * H @ H @ g,
            "D3gg": lr**3 * d3(problem, theta, g, g),
            "gradS": lr * d3(problem, theta, u, u),
            "u_ug": lr * (u @ g) * u,
        }
        crit = evecs[:, evals >= 1.95 / lr]
        expected["gradScrit"] = lr * sum((d3(problem, theta, v, v) for v in crit.T), torch.zeros_like(g))
        for name, want in expected.items():
            # eigenvector-based terms are as accurate as LOBPCG's residual tolerance (1e-6)
            tol = 1e-4 if name in ("gradS", "gradScrit", "u_ug") else 1e-8
            assert float((fields[name][b] - want).norm()) <= tol * float(want.norm()) + 1e-15, name


def test_gradScrit_sums_the_critical_eigenvalues_and_is_zero_without_any(problem, states):
    theta = states[0]
    evals = torch.linalg.eigvalsh(dense_hessian(problem, theta)).flip(0)
    # A step size that makes exactly the top two eigenvalues critical (>= 1.95 / lr).
    lr = 1.95 / float(evals[1]) * 1.001
    assert float(evals[2]) < 1.95 / lr
    lib = TermLibrary(problem, lr, ["gradS", "gradScrit"], max_critical=3)
    f = lib.fields(theta[None])
    _, vecs = torch.linalg.eigh(dense_hessian(problem, theta))
    want = lr * (d3(problem, theta, vecs[:, -1], vecs[:, -1]) + d3(problem, theta, vecs[:, -2], vecs[:, -2]))
    assert float((f["gradScrit"][0] - want).norm()) <= 1e-4 * float(want.norm())
    stable = TermLibrary(problem, 0.5 / float(evals[0]), ["gradScrit"])
    assert float(stable.fields(theta[None])["gradScrit"].abs().max()) == 0.0


def test_sigma2_feature_is_the_self_stabilisation_variance(problem, states):
    """``sigma2 = max(0, -2 <g, grad L> / ||grad L||^2)``, L the critical sum (S when none is critical)."""

    def law(p: nf.Problem, theta: torch.Tensor, lr: float) -> float:
        g = gradient(p, theta)
        evals, vecs = torch.linalg.eigh(dense_hessian(p, theta))
        crit = vecs[:, evals >= 1.95 / lr]
        grad = sum((d3(p, theta, v, v) for v in (crit.T if crit.shape[1] else vecs[:, -1:].T)), torch.zeros_like(g))
        return max(0.0, float(-2 * (g @ grad) / (grad @ grad)))

    def feature(p: nf.Problem, theta: torch.Tensor, lr: float) -> float:
        lib = TermLibrary(p, lr, ["gradScrit"], gated=True, amplitude=["sigma2"], max_critical=3)
        return float(lib.feature_values(theta[None])[0, lib.inspected_features.index("sigma2")])

    quartic = nf.problems.zhu_quartic()  # sharpening at its start: -<g, grad S> = 47 > 0
    theta = states[0]
    evals = torch.linalg.eigvalsh(dense_hessian(problem, theta))
    cases = [
        (quartic, quartic.theta0, 0.2),  # the top eigenvalue (18.2) is critical, the other (0.014) is not
        (quartic, quartic.theta0, 0.01),  # none is critical: S
        (problem, theta, 1.95 / float(evals[-2]) * 1.001),  # two critical; the sum's sigma2 clips to 0 here
    ]
    wants = [law(*case) for case in cases]
    assert wants[0] > 1e-3 and wants[0] == pytest.approx(wants[1])
    for case, want in zip(cases, wants, strict=True):
        assert feature(*case) == pytest.approx(want, rel=1e-4, abs=1e-12)
    with pytest.raises(nf.InputError, match="gated"):
        TermLibrary(problem, 0.1, ["gradS"], amplitude=["sigma2"])


def test_library_forward_contributions_and_coefficients(problem, states):
    lr = 0.05
    lib = TermLibrary(problem, lr, ["Hg", "H2g", "D3gg"])
    with torch.no_grad():
        for name, c in zip(lib.terms, (-0.5, -1 / 3, -1 / 12), strict=True):
            lib.constants[name].fill_(c)
    fields = lib.fields(states)
    contrib = lib.contributions(states)
    coeffs = lib.coefficient_values(states)
    out = lib(torch.tensor(0.0), states)
    assert torch.allclose(out, sum(contrib.values()), rtol=1e-12)
    for name, c in zip(lib.terms, (-0.5, -1 / 3, -1 / 12), strict=True):
        assert torch.allclose(coeffs[name], torch.full((3,), c, dtype=torch.float64))
        assert torch.allclose(contrib[name], c * fields[name])
    assert lib.feature_values(states).shape == (3, 3)
    assert lib.feature_names == ["lr_S_minus_2", "lr_S", "loss"]
    # one state (d,) gives the first row of the batch
    assert torch.allclose(lib(torch.tensor(0.0), states[0]), out[0])


def test_hybrid_is_flow_plus_correction_and_differentiable(problem, states):
    lr = 0.05
    flow = GradientFlow(problem, lr)
    lib = TermLibrary(problem, lr, ["Hg", "D3gg"])
    with torch.no_grad():
        lib.constants["Hg"].fill_(-0.5)
        lib.constants["D3gg"].fill_(0.3)
    model = Hybrid(flow, lib)
    t = torch.tensor(0.0)
    assert torch.allclose(model(t, states), flow(t, states) + lib(t, states), rtol=1e-12)
    assert torch.equal(Hybrid(flow, None)(t, states), flow(t, states))
    # Jacobian-vector products of the right-hand side against central finite differences (the adjoint needs them).
    x = states[:1].clone().requires_grad_(True)
    v = torch.randn_like(x)
    w = torch.randn_like(x)
    (vjp,) = torch.autograd.grad(model(t, x), x, w)
    h = 1e-5
    with torch.no_grad():
        fd = ((model(t, states[:1] + h * v) - model(t, states[:1] - h * v)) * w).sum() / (2 * h)
    assert abs(float((vjp * v).sum()) - float(fd)) <= 1e-6 * abs(float(fd))


def test_gated_coefficient_is_off_below_the_edge_and_on_at_it(problem, states):
    S = float(torch.linalg.eigvalsh(dense_hessian(problem, states[0]))[-1])
    below = TermLibrary(problem, 1.5 / S, ["gradS"], gated=True)
    at = TermLibrary(problem, 2.0 / S, ["gradS"], gated=True)
    for lib in (below, at):
        with torch.no_grad():
            lib.gates["gradS"].scale.fill_(-1.0)
    c_below = float(below.coefficient_values(states[:1])["gradS"][0])
    c_at = float(at.coefficient_values(states[:1])["gradS"][0])
    assert abs(c_below) < 1e-3
    assert c_at < -0.5
    assert at.gated == ["gradS"] and not at.constants
    assert len(list(at.parameters())) > 1


def test_config_rebuilds_and_approximations(problem):
    lib = TermLibrary(problem, 0.1, ["g", "gradS"], gated=["gradS"], hidden=5)
    cfg = lib.config()
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "lr")}
    again = TermLibrary(problem, cfg["lr"], **kwargs)
    assert again.config() == cfg
    assert lib.gate("gradS") is lib.gates["gradS"]
    names = [a.name for a in lib.approximations]
    assert names == ["effective-step-size", "no-oscillation"]
    for spec in TERMS.values():
        assert spec.name in spec.approximation.revised_by
    assert TERMS["Hg"].theory == -0.5 and TERMS["D3gg"].theory == pytest.approx(-1 / 12)
    assert TERMS["gradS"].theory is None
    net = NeuralCorrection(problem, 0.1, features="features", hidden=7)
    assert net.config()["hidden"] == 7 and net.config()["features"] == "features"
    assert Hybrid(GradientFlow(problem, 0.1), lib).config()["correction"] == cfg


def test_neural_correction_starts_at_zero_and_learns_a_field(problem, states):
    net = NeuralCorrection(problem, 0.1, features="state", hidden=8)
    t = torch.tensor(0.0)
    assert float(net(t, states).detach().abs().max()) == 0.0
    net_f = NeuralCorrection(problem, 0.1, features="features", hidden=8)
    with torch.no_grad():
        net_f.net[4].bias.fill_(1.0)
    assert torch.allclose(net_f(t, states), torch.full((3, problem.dim), 0.1, dtype=torch.float64))


def test_bad_input_names_the_known_terms(problem):
    with pytest.raises(nf.InputError, match="known terms are .*'D3gg'.*'Hg'"):
        TermLibrary(problem, 0.1, ["Hg", "H3g"])
    with pytest.raises(nf.InputError, match="not in the library"):
        TermLibrary(problem, 0.1, ["Hg"], gated=["gradS"])
    with pytest.raises(nf.InputError, match=r"not gated; the gated terms are \['gradS'\]"):
        TermLibrary(problem, 0.1, ["Hg", "gradS"], gated=["gradS"]).gate("Hg")
    with pytest.raises(nf.InputError, match="known features"):
        TermLibrary(problem, 0.1, ["Hg"], features=["sharpness"])
    with pytest.raises(nf.InputError, match="same Problem"):
        Hybrid(GradientFlow(problem, 0.1), TermLibrary(tanh_net(inputs=3, hidden=4, n=20, seed=1), 0.1, ["Hg"]))
    with pytest.raises(nf.InputError, match="lr"):
        Hybrid(GradientFlow(problem, 0.1), TermLibrary(problem, 0.2, ["Hg"]))
    with pytest.raises(nf.InputError, match="physics flow"):
        Hybrid(TermLibrary(problem, 0.1, ["Hg"]), None)
