import pytest
import torch

import neuralflow as nf
from neuralflow.errors import InputError


def test_mlp_digits_matches_the_documented_construction():
    p = nf.problems.mlp_digits(n=100, widths=(16, 8), seed=3)
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 8, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 10, dtype=torch.float64),
    )
    flat = torch.cat([q.detach().reshape(-1) for _, q in net.named_parameters()])
    assert torch.equal(p.theta0, flat)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data[:100] / 16.0)
    y = torch.nn.functional.one_hot(torch.as_tensor(d.target[:100]), 10).double()
    expected = 0.5 * ((net(x) - y) ** 2).sum(1).mean()
    assert torch.allclose(p.loss(p.theta0), expected, rtol=1e-12)
    assert p.dim == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert p.description["widths"] == [16, 8]


def test_batch_size_splits_the_data_without_changing_the_loss():
    full = nf.problems.mlp_digits(n=90, widths=(8,))
    chunked = nf.problems.mlp_digits(n=90, widths=(8,), batch_size=32)
    assert len(chunked.parts) == 3
    theta = full.theta0 + 0.1
    assert torch.allclose(full.loss(theta), chunked.loss(theta), rtol=1e-12)
    g1 = nf.autodiff.gradient(full, theta)
    g2 = nf.autodiff.gradient(chunked, theta)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)
    v = torch.randn(full.dim, dtype=torch.float64)
    assert torch.allclose(nf.autodiff.hvp(full, theta, v), nf.autodiff.hvp(chunked, theta, v), rtol=1e-9, atol=1e-12)


def test_toy_losses():
    z = nf.problems.zhu_quartic((2.0, 0.5))
    assert z.loss(z.theta0).item() == 0.0  # on the minimum set xy = 1
    h = nf.autodiff.dense_hessian(z, z.theta0)
    assert torch.allclose(torch.linalg.eigvalsh(h).max(), torch.tensor(2 * (4 + 0.25), dtype=torch.float64))
    f = nf.problems.scalar_factorization(4, theta0=[1.0] * 4)
    h = nf.autodiff.dense_hessian(f, f.theta0)
    assert torch.allclose(torch.linalg.eigvalsh(h).max(), torch.tensor(4.0, dtype=torch.float64))
    A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    q = nf.problems.quadratic(A, theta0=[1.0, 2.0])
    assert q.loss(q.theta0).item() == pytest.approx(0.5 * (1 + 12))


def test_from_module_cross_entropy_and_from_function():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64)
    labels = torch.randint(0, 4, (10,))
    p = nf.problems.from_module(net, x, labels, loss="ce")
    assert torch.allclose(p.loss(p.theta0), torch.nn.functional.cross_entropy(net(x), labels))
    q = nf.problems.from_function(lambda th: (th**4).sum(), torch.ones(3, dtype=torch.float64))
    assert q.loss(q.theta0).item() == 3.0
    assert q.batched_loss(torch.ones(2, 3, dtype=torch.float64)).tolist() == [3.0, 3.0]


def test_make_rebuilds_from_the_description():
    p = nf.problems.mlp_digits(n=50, widths=(4,), seed=2)
    q = nf.problems.make(p.description)
    assert torch.equal(p.theta0, q.theta0)
    with pytest.raises(InputError, match="registered problems"):
        nf.problems.make({"name": "nope"})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: nf.problems.from_function(lambda th: th**2, torch.ones(3, dtype=torch.float64)), "0-dim"),
        (lambda: nf.problems.from_function(lambda th: th.sum(), torch.ones(2, 2)), "1-D"),
        (lambda: nf.problems.from_function(lambda th: th.sum(), torch.ones(3, dtype=torch.long)), "floating"),
        (lambda: nf.problems.from_function(lambda th: th.sum(), torch.tensor([1.0, float("nan")])), "NaN"),
        (
            lambda: nf.problems.from_module(
                torch.nn.Linear(2, 1), torch.tensor([[1.0, float("nan")]]), torch.ones(1, 1)
            ),
            "NaN",
        ),
        (lambda: nf.problems.from_module(torch.nn.Linear(2, 1), torch.ones(3, 2), torch.ones(2, 1)), "same"),
        (lambda: nf.problems.quadratic([[1.0, 2.0], [0.0, 1.0]]), "symmetric"),
        (lambda: nf.problems.mlp_digits(n=10, activation="swish"), "activation"),
    ],
)
def test_bad_problems_are_refused(build, match):
    with pytest.raises(InputError, match=match):
        build()


def test_check_theta():
    p = nf.problems.zhu_quartic()
    with pytest.raises(InputError, match="2 parameters"):
        p.check_theta(torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match="dtype"):
        p.check_theta(torch.ones(2, dtype=torch.float32))


def test_zoo_problems_rebuild_from_their_description_and_are_smooth():
    cnn = nf.problems.cnn_digits(n=20, channels=(2, 3), seed=1)
    # Conv2d(1, 2, 3): 18 + 2; Conv2d(2, 3, 3): 54 + 3; Linear(16 * 3, 10): 480 + 10
    assert cnn.dim == 20 + 57 + 490 and cnn.thrice_differentiable
    assert torch.equal(nf.problems.make(cnn.description).theta0, cnn.theta0)
    lstm = nf.problems.lstm_recall(n=16, length=5, hidden=3, seed=2)
    assert lstm.dim == 4 * 3 * (1 + 3 + 2) + 3 + 1 and lstm.thrice_differentiable
    assert torch.equal(nf.problems.make(lstm.description).theta0, lstm.theta0)
    other = nf.problems.lstm_recall(n=16, length=5, hidden=3, seed=3)
    assert other.loss(lstm.theta0 * 0) != lstm.loss(lstm.theta0 * 0)  # the data follow the seed
    with pytest.raises(nf.InputError, match="channels"):
        nf.problems.cnn_digits(channels=(4,))
    with pytest.raises(nf.InputError, match="length"):
        nf.problems.lstm_recall(length=0)


def test_the_lstm_target_is_the_first_entry_of_each_sequence():
    lstm = nf.problems.lstm_recall(n=8, length=4, hidden=2)
    # at zero weights the net outputs 0, so the loss is half the mean square of the targets
    x = torch.randn(8, 4, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert lstm.loss(torch.zeros_like(lstm.theta0)).item() == pytest.approx(0.5 * (x[:, 0] ** 2).mean().item())


@pytest.mark.parametrize("builder", [nf.problems.mlp_digits, nf.problems.cnn_digits, nf.problems.lstm_recall])
def test_the_same_seed_gives_the_same_net_in_every_dtype(builder):
    """Built in float64 on the CPU, then cast: a float32 run compares round-off, not two different nets."""
    kw = {"n": 40} if builder is not nf.problems.lstm_recall else {"n": 16}
    wide, narrow = builder(**kw), builder(**kw, dtype=torch.float32)
    assert narrow.theta0.dtype == torch.float32
    assert torch.equal(narrow.theta0, wide.theta0.to(torch.float32))
