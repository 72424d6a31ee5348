import pytest
import torch

import neuralflow as nf
from neuralflow.errors import FileFormatError, InputError


@pytest.fixture(scope="module")
def traj():
    return nf.run_gd(nf.problems.zhu_quartic(), 0.2, 60, n_eigs=2, progress=False)


def test_smoothed_is_the_midpoint_process(traj):
    sm = traj.smoothed()
    x = traj.iterates
    assert sm.steps.tolist() == list(range(1, 60))
    k = 30
    assert torch.allclose(sm.iterates[k - 1], (x[k - 1] + 2 * x[k] + x[k + 1]) / 4)
    sparse = nf.run_gd(nf.problems.zhu_quartic(), 0.2, 20, store_every=5, progress=False)
    with pytest.raises(InputError, match="store_every=1"):
        sparse.smoothed()


def test_slice_by_step_range(traj):
    part = traj.slice(10, 20)
    assert part.steps.tolist() == list(range(10, 20))
    assert torch.equal(part.iterates, traj.iterates[10:20])
    assert part.history["step"].tolist() == list(range(10, 20))
    with pytest.raises(InputError, match="covers steps"):
        traj.slice(100, 200)


def test_save_load_round_trip(traj, tmp_path):
    path = traj.save(tmp_path / "run.nft")
    back = nf.Trajectory.load(path)
    assert back.lr == traj.lr and back.problem == traj.problem and back.meta == traj.meta
    for name in ("steps", "iterates", "loss", "grad_norm", "sharpness", "update_u"):
        assert torch.equal(getattr(back, name), getattr(traj, name))
    assert back.history.keys() == traj.history.keys()
    assert back.eos_onset == traj.eos_onset
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_truncated_and_tampered_files_name_the_file(traj, tmp_path):
    path = traj.save(tmp_path / "run.nft")
    data = path.read_bytes()
    cut = tmp_path / "cut.nft"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="cut.nft"):
        nf.Trajectory.load(cut)
    tampered = tmp_path / "tampered.nft"
    tampered.write_bytes(data[:-8] + bytes(8))
    with pytest.raises(FileFormatError, match="tampered.nft.*checksum"):
        nf.Trajectory.load(tampered)
    junk = tmp_path / "junk.nft"
    junk.write_bytes(b"not a file at all")
    with pytest.raises(FileFormatError, match="junk.nft"):
        nf.Trajectory.load(junk)


def test_a_pickle_is_never_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.nft"
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(FileFormatError, match="evil.nft"):
        nf.Trajectory.load(evil)
    assert not marker.exists()


def test_plot_returns_a_figure_with_the_threshold(traj):
    fig = traj.plot()
    ax = fig.axes[1]
    assert any(abs(line.get_ydata()[0] - 2 / 0.2) < 1e-12 for line in ax.get_lines())
    assert len(fig.axes) == 2


def test_eos_transients_are_the_quiet_stretches_past_two_over_lr():
    # a drift along x; sharpness above 2/lr from step 20 on; the period-two oscillation along y is
    # round-off sized until step 40 and established after it, so [20, 40) is the transient
    lr, T = 0.1, 80
    k = torch.arange(T, dtype=torch.float64)
    sign = (-1.0) ** k
    amplitude = torch.where(k < 40, 1e-9, 0.05)
    x = torch.stack([0.01 * k, sign * amplitude], dim=1)
    sharp = torch.where(k < 20, 15.0, 25.0)[:, None]
    nan = torch.full((T,), float("nan"), dtype=torch.float64)
    traj = nf.Trajectory(lr=lr, steps=k.long(), iterates=x, loss=nan, grad_norm=nan, sharpness=sharp, update_u=nan)
    ((start, stop),) = traj.eos_transients()
    assert start == 20
    assert 38 <= stop <= 40  # the midpoint's neighbours see the established oscillation one step early
    quiet = traj.eos_transients(ratio=1e-9)  # the round-off oscillation is not "quiet" at this ratio
    assert quiet == []
    with pytest.raises(InputError, match="eig_every=1"):
        nf.Trajectory(
            lr=lr, steps=k.long(), iterates=x, loss=nan, grad_norm=nan, sharpness=nan[:, None], update_u=nan
        ).eos_transients()


def test_a_last_step_off_the_store_every_grid_is_handled_everywhere():
    """run_gd stores steps 0, 3, 6, 9 and the last, 10: the spacing is still 3, and what needs an even grid drops 10."""
    p = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    traj = nf.run_gd(p, 0.1, 10, store_every=3, progress=False)
    assert traj.steps.tolist() == [0, 3, 6, 9, 10] and traj.store_every == 3
    assert traj.on_grid().steps.tolist() == [0, 3, 6, 9]
    longer = nf.run_gd(p, 0.1, 20, store_every=3, progress=False)  # 0, 3, ..., 18, 20
    assert nf.run_gd(p, 0.1, 9, store_every=3, progress=False).on_grid().steps.tolist() == [0, 3, 6, 9]
    assert "every 3" in traj._repr_html_()
    comparison = nf.compare(traj, nf.flows.GradientFlow(p, 0.1), problem=p)
    assert len(comparison.rows) == 1
    model = nf.Hybrid(nf.flows.GradientFlow(p, 0.1), nf.corrections.TermLibrary(p, 0.1, terms=["Hg"]))
    result = nf.fit(model, longer, window=3, method="regression", progress=False)
    assert result.settings["window"] == 3 and result.physics_error > 0
    uneven = nf.Trajectory(
        lr=0.1,
        steps=torch.tensor([0, 2, 3, 5]),
        iterates=torch.zeros(4, 2),
        loss=torch.zeros(4),
        grad_norm=torch.zeros(4),
        sharpness=torch.zeros(4, 1),
        update_u=torch.zeros(4),
    )
    with pytest.raises(nf.InputError, match="not evenly spaced"):
        _ = uneven.store_every
