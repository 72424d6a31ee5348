"""Checkpoints: exact round trips for every flow and correction, safety against hostile or damaged files."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import neuralflow as nf
from neuralflow import _io, checkpoint
from neuralflow.corrections import NeuralCorrection, TermLibrary
from neuralflow.errors import FileFormatError, InputError
from neuralflow.flows import FLOWS
from neuralflow.report import build_report

LR = 0.1
CORRECTIONS = {
    "constant": lambda p: TermLibrary(p, LR, terms=["Hg", "gradS"]),
    "gated": lambda p: TermLibrary(p, LR, terms=["Hg", "gradScrit"], gated=["gradScrit"]),
    "neural": lambda p: NeuralCorrection(p, LR, hidden=4),
}


@pytest.fixture(scope="module")
def fitted():
    """A real fit on a tiny registered problem (sharpness 5.7 < 2/lr = 20, so the central flow can start)."""
    torch.manual_seed(0)
    problem = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    traj = nf.run_gd(problem, LR, 12, eig_every=1, progress=False)
    model = nf.Hybrid(nf.flows.GradientFlow(problem, LR), TermLibrary(problem, LR, terms=["Hg"]))
    return nf.fit(model, traj, window=4, method="regression", progress=False)


def _with_model(result, model):
    """``result`` carrying another model, its coefficients those of the model's constants."""
    lib = model.correction
    coefficients = {n: float(c.detach()) for n, c in lib.constants.items()} if isinstance(lib, TermLibrary) else {}
    return dataclasses.replace(result, model=model, coefficients=coefficients, uncertainty={})


def _same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-aware equality


# the oscillation flow is simulation-only (no fit, so no fitted checkpoint); test_oscillation round-trips
# its simulation through checkpoint.save_simulation
HYBRID_FLOWS = sorted(set(FLOWS) - {"oscillation"})
# a hidden-state library needs a flow with extra state; test_hidden_state round-trips one
THETA_CORRECTIONS = sorted(set(CORRECTIONS) - {"hidden-state"})


@pytest.mark.parametrize("correction", THETA_CORRECTIONS)
@pytest.mark.parametrize("flow", HYBRID_FLOWS)
def test_round_trip_is_bit_for_bit(fitted, tmp_path, flow, correction):
    problem = fitted.model.problem
    model = nf.Hybrid(FLOWS[flow](problem, LR), CORRECTIONS[correction](problem))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # coefficients away from their zero initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    result = _with_model(fitted, model)
    path = checkpoint.save(result, tmp_path / "fit.nff", report=False)
    back = checkpoint.load(path)

    assert type(back.model.flow) is type(model.flow) and back.model.flow.config() == model.flow.config()
    assert back.model.correction.config() == model.correction.config()
    assert back.coefficients == result.coefficients
    state, state_back = model.state_dict(), back.model.state_dict()
    assert state.keys() == state_back.keys() and all(torch.equal(state[k], state_back[k]) for k in state)
    t = torch.arange(3, dtype=problem.dtype)
    x0 = fitted.trajectory.iterates[0]
    assert torch.equal(nf.simulate(back.model, x0, t), nf.simulate(model, x0, t))


def test_every_field_of_the_result_survives(fitted, tmp_path):
    back = checkpoint.load(checkpoint.save(fitted, tmp_path / "fit.nff", report=False))
    for f in dataclasses.fields(fitted):
        a, b = getattr(fitted, f.name), getattr(back, f.name)
        if f.name == "model":
            continue
        if f.name == "trajectory":
            for g in dataclasses.fields(a):
                x, y = getattr(a, g.name), getattr(b, g.name)
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), g.name
                elif g.name == "history":
                    assert x.keys() == y.keys()
                    for k in x:  # the oscillation series are NaN where a step's neighbours are missing
                        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
                else:
                    assert _same_json(x, y), g.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        elif f.name == "windows":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert _same_json(a, b), f.name
    assert back.coefficients["Hg"] == pytest.approx(float(back.model.correction.constants["Hg"].detach()), rel=1e-15)


def test_the_report_is_stored_and_the_loaded_fit_reports_the_same(fitted, tmp_path):
    report = build_report(fitted)
    path = checkpoint.save(fitted, tmp_path / "fit.nff", report=report)
    stored = checkpoint.stored_report(path)
    assert stored.to_dict() == report.to_dict()
    again = checkpoint.load(path).report()
    assert [t.name for t in again.terms] == [t.name for t in report.terms]
    assert again.terms[0].coefficient == report.terms[0].coefficient
    assert (again.physics_error, again.hybrid_error) == (report.physics_error, report.hybrid_error)
    assert again.suggestions() == report.suggestions()
    meta = checkpoint.info(path)
    assert meta["format_version"] == _io.FORMAT_VERSION and meta["neuralflow_version"] == nf.__version__
    assert meta["torch_version"] == torch.__version__ and meta["problem"]["name"] == "zhu-quartic"


def test_a_failing_report_does_not_fail_the_save(fitted, tmp_path, monkeypatch):
    def broken(result):
        raise nf.NeuralflowError("no report today")

    monkeypatch.setattr(checkpoint, "build_report", broken)
    with pytest.warns(UserWarning, match="no report today"):
        path = checkpoint.save(fitted, tmp_path / "fit.nff")
    assert checkpoint.stored_report(path) is None
    assert "no report today" in checkpoint.info(path)["report_error"]
    assert checkpoint.load(path).coefficients == fitted.coefficients


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    blob = pickle.dumps(Payload())
    pickle.loads(blob)  # the payload is live: unpickling it creates the file
    assert marker.exists()
    marker.unlink()
    for name, data in (("pickle.nff", blob), ("torch.nff", None)):
        path = tmp_path / name
        if data is None:  # torch.save's zip container pickles too
            torch.save({"x": Payload()}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(FileFormatError, match=name):
            checkpoint.load(path)
        assert not marker.exists()


class _HalfWriter:
    """A file whose write stops half-way with a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("crash", ["mid-write", "before-rename"])
def test_an_interrupted_save_leaves_the_previous_checkpoint(fitted, tmp_path, monkeypatch, crash):
    path = checkpoint.save(fitted, tmp_path / "fit.nff", report=False)
    before = path.read_bytes()
    lib = TermLibrary(fitted.model.problem, LR, terms=["Hg"])
    with torch.no_grad():
        lib.constants["Hg"].fill_(0.25)
    newer = _with_model(fitted, nf.Hybrid(fitted.model.flow, lib))
    if crash == "mid-write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        checkpoint.save(newer, path, report=False)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.nff"]  # no temporary file left behind
    assert checkpoint.load(path).coefficients == fitted.coefficients
    assert checkpoint.load(checkpoint.save(newer, path, report=False)).coefficients == {"Hg": 0.25}


def test_newer_truncated_and_wrong_kind_files_give_clear_errors(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "FORMAT_VERSION", _io.FORMAT_VERSION + 1)
    newer = checkpoint.save(fitted, tmp_path / "newer.nff", report=False)
    monkeypatch.undo()
    with pytest.raises(FileFormatError, match="newer.*upgrade neuralflow"):
        checkpoint.load(newer)
    good = checkpoint.save(fitted, tmp_path / "good.nff", report=False).read_bytes()
    for cut in (4, 100, len(good) // 2, len(good) - 1):
        (tmp_path / "cut.nff").write_bytes(good[:cut])
        with pytest.raises(FileFormatError, match="cut.nff"):
            checkpoint.load(tmp_path / "cut.nff")
    fitted.trajectory.save(tmp_path / "run.nft")
    with pytest.raises(FileFormatError, match="holds a 'trajectory', expected a 'fit'"):
        checkpoint.load(tmp_path / "run.nft")
    with pytest.raises(FileFormatError, match="no such file"):
        checkpoint.load(tmp_path / "missing.nff")


def _rewrite(path, edit):
    tensors, header = _io.read(path, "fit")
    edit(tensors, header["meta"])
    _io.write(path, "fit", tensors, header["meta"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t, m: t.update({"model.correction.constants.Hg": torch.zeros(3, dtype=torch.float64)}),
            "model's tensors do not match",
        ),
        (
            lambda t, m: t.update({"model.correction.constants.Hg": torch.tensor(7.0, dtype=torch.float64)}),
            "coefficient Hg .* altered",
        ),
        (lambda t, m: t.pop("trajectory.iterates"), "tensor 'trajectory.iterates'.* missing"),
        (lambda t, m: t.update({"trajectory.iterates": t["trajectory.iterates"][:-1]}), "does not fit together"),
        (lambda t, m: t.update({"stray": torch.zeros(1)}), "not described by the metadata"),
        (lambda t, m: m["model"]["flow"].update(name="warp-drive"), "unknown flow 'warp-drive'"),
        (lambda t, m: m["model"]["correction"].update(terms=["Hg", "H2g"]), "model's tensors do not match"),
    ],
)
def test_tensors_that_do_not_match_the_metadata_are_refused(fitted, tmp_path, edit, message):
    path = checkpoint.save(fitted, tmp_path / "fit.nff", report=False)
    _rewrite(path, edit)
    with pytest.raises(FileFormatError, match=message):
        checkpoint.load(path)


def test_problems_that_cannot_be_rebuilt_are_passed_by_the_user(tmp_path):
    def loss(theta):
        return 0.5 * (theta[0] ** 2 + 3 * theta[1] ** 2)

    problem = nf.problems.from_function(loss, torch.tensor([1.0, 1.0], dtype=torch.float64), name="bowl")
    traj = nf.run_gd(problem, 0.1, 10, eig_every=0, progress=False)
    lib = TermLibrary(problem, 0.1, terms=["Hg"])
    result = nf.fit(
        nf.Hybrid(nf.flows.GradientFlow(problem, 0.1), lib), traj, window=4, method="regression", progress=False
    )
    path = checkpoint.save(result, tmp_path / "bowl.nff", report=False)
    with pytest.raises(InputError, match=r"cannot be rebuilt.*checkpoint.load\(path, problem=\.\.\.\)"):
        checkpoint.load(path)
    assert checkpoint.load(path, problem=problem).coefficients == result.coefficients
    other = nf.problems.from_function(lambda th: 0.5 * (th**2).sum(), problem.theta0, name="bowl")
    with pytest.raises(InputError, match="pass the problem .* the fit was made on"):
        checkpoint.load(path, problem=other)
    with pytest.raises(InputError, match="made on problem 'bowl'"):
        checkpoint.load(path, problem=nf.problems.zhu_quartic())


def test_unregistered_flows_are_refused_at_save_time(fitted, tmp_path):
    class Warped(nf.flows.GradientFlow):
        name = "warped"

    problem = fitted.model.problem
    result = _with_model(fitted, nf.Hybrid(Warped(problem, LR), TermLibrary(problem, LR, terms=["Hg"])))
    with pytest.raises(InputError, match="not in the flow registry"):
        checkpoint.save(result, tmp_path / "fit.nff")
    assert not (tmp_path / "fit.nff").exists()
