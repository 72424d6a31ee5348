"""Files cannot lie: the checksum covers the metadata, the metadata meets its schema, a file does not decide sizes."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuralflow as nf
from neuralflow import _io, _validate, checkpoint
from neuralflow.errors import FileFormatError, InputError, NeuralflowError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small():
    """A 5-step trajectory on the Zhu quartic: a header of about 1 kB."""
    return nf.run_gd(nf.problems.zhu_quartic(), 0.2, 4, progress=False)


def _craft(path, kind, meta, tensors, **header_fields):
    """Write a file as a forger would: any header, with a checksum that matches it."""
    from safetensors.torch import save

    header = {
        "kind": kind,
        "format_version": _io.FORMAT_VERSION,
        "neuralflow_version": nf.__version__,
        "torch_version": torch.__version__,
        "meta": meta,
        **header_fields,
    }
    header["sha256"] = _io.digest(header, tensors)
    path.write_bytes(save(tensors, metadata={"neuralflow": json.dumps(header)}))
    return path


def _parts(traj, path):
    tensors, header = _io.read(traj.save(path), "trajectory")
    return tensors, header["meta"]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where NaN (the recorded series are NaN where nothing was measured)."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))


def _same(a: nf.Trajectory, b: nf.Trajectory) -> bool:
    tensors = ("steps", "iterates", "loss", "grad_norm", "sharpness", "update_u")
    return (
        json.dumps([a.lr, a.problem, a.meta]) == json.dumps([b.lr, b.problem, b.meta])
        and all(torch.equal(getattr(a, n).nan_to_num(7.0), getattr(b, n).nan_to_num(7.0)) for n in tensors)
        and a.history.keys() == b.history.keys()
        and all(torch.equal(a.history[k].nan_to_num(7.0), b.history[k].nan_to_num(7.0)) for k in a.history)
    )


def test_every_single_bit_flip_of_a_trajectory_file_is_caught_or_harmless(small, tmp_path):
    """Each of the file's bits (header and tensors) flipped in turn: an error, or exactly the saved content."""
    data = small.save(tmp_path / "run.nft").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    caught = 0
    for bit in range(8 * len(data)):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        try:
            back = nf.Trajectory.from_bytes(bytes(b))
        except NeuralflowError:
            caught += 1
            continue
        assert _same(back, small), f"bit {bit} (byte {bit // 8} of a {8 + n}-byte header) changed the content"
    assert caught > 0.99 * 8 * len(data)


def test_bit_flips_of_a_fit_file_header_never_change_what_is_read(tmp_path):
    """A .nff header (about 10 kB): a seeded sample of its bits flipped, read at the container level."""
    problem = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    traj = nf.run_gd(problem, 0.1, 12, progress=False)
    model = nf.Hybrid(nf.flows.GradientFlow(problem, 0.1), nf.corrections.TermLibrary(problem, 0.1, terms=["Hg"]))
    data = checkpoint.save(
        nf.fit(model, traj, window=4, method="regression", progress=False), tmp_path / "fit.nff"
    ).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    ref_tensors, ref_header = _io.parse(data, "fit", "fit.nff")
    bits = torch.randperm(8 * (8 + n), generator=torch.Generator().manual_seed(0))[:6000]
    for bit in bits.tolist():
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        try:
            tensors, header = _io.parse(bytes(b), "fit", "fit.nff")
        except NeuralflowError:
            continue
        assert json.dumps(header) == json.dumps(ref_header), f"bit {bit} changed the metadata"
        assert tensors.keys() == ref_tensors.keys() and all(_equal(tensors[k], ref_tensors[k]) for k in ref_tensors), (
            f"bit {bit} changed a tensor"
        )


def test_an_edited_metadata_value_is_caught_by_the_checksum(small, tmp_path):
    path = small.save(tmp_path / "run.nft")
    data = path.read_bytes()
    edited = data.replace(b'\\"lr\\": 0.2', b'\\"lr\\": 0.3')
    assert edited != data
    path.write_bytes(edited)
    with pytest.raises(FileFormatError, match="checksum"):
        nf.Trajectory.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(lr=-0.02), r"metadata.lr must lie in \(0"),
        (lambda m: m.update(lr=math.nan), "metadata.lr must be a finite number"),
        (lambda m: m.update(lr=True), "metadata.lr must be a number"),
        (lambda m: m.update(lr="0.2"), "metadata.lr must be a number"),
        (lambda m: m["meta"].update(eig_tol=-1.0), "metadata.meta.eig_tol"),
        (lambda m: m.update(warp=1), "unknown key 'warp'"),  # meta takes a user's notes, the record does not
        (
            lambda m: m.update(problem={"name": "mlp-digits", "n": 60, "dtype": "manual_seed"}),
            "metadata.problem.dtype is 'manual_seed'; known values",
        ),
        (
            lambda m: m.update(problem={"name": "mlp-digits", "n": 60, "dtype": "float16"}),
            "metadata.problem.dtype is 'float16'; known values",
        ),
        (lambda m: m["problem"].update(colour="red"), "metadata.problem has the unknown key 'colour'"),
        (lambda m: m["problem"].update(theta0=[1.0, 2.0, 3.0]), "theta0 must have 2 to 2 entries"),
        (
            lambda m: m.update(meta=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]),
            "nested more than 32 levels",
        ),
    ],
)
def test_metadata_that_breaks_the_schema_is_refused_even_with_a_valid_checksum(small, tmp_path, edit, message):
    tensors, meta = _parts(small, tmp_path / "run.nft")
    edit(meta)
    path = _craft(tmp_path / "forged.nft", "trajectory", meta, tensors)
    with pytest.raises(FileFormatError, match=message):
        nf.Trajectory.load(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"format_version": 0}, r"format_version must be an integer in \[1"),
        ({"format_version": True}, "format_version must be an integer"),
        ({"format_version": "1"}, "format_version must be an integer"),
        ({"format_version": 1.0}, "format_version must be an integer"),
        ({"format_version": 3}, "newer than this neuralflow supports"),
        ({"colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_the_format_version_is_an_int_of_at_least_one(small, tmp_path, fields, message):
    tensors, meta = _parts(small, tmp_path / "run.nft")
    with pytest.raises(FileFormatError, match=message):
        nf.Trajectory.load(_craft(tmp_path / "forged.nft", "trajectory", meta, tensors, **fields))


def test_a_deeply_nested_header_is_a_clear_error_not_a_recursion_error(small, tmp_path):
    from safetensors.torch import save

    tensors, meta = _parts(small, tmp_path / "run.nft")
    deep = '{"kind": "trajectory", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "deep.nft"
    path.write_bytes(save(tensors, metadata={"neuralflow": deep}))
    with pytest.raises(FileFormatError, match="nested too deeply"):
        nf.Trajectory.load(path)
    meta["meta"] = {"eig_every": 1}
    nested = [1]
    for _ in range(60):
        nested = [nested]
    meta["problem"] = {"name": "sequential", "module": "x", "examples": 3, "loss": "mse", "extra": nested}
    with pytest.raises(FileFormatError, match="nested more than 32 levels"):
        nf.Trajectory.load(_craft(tmp_path / "forged.nft", "trajectory", meta, tensors))


def test_a_file_cannot_make_the_loader_build_a_huge_problem(small, tmp_path):
    tensors, meta = _parts(small, tmp_path / "run.nft")
    meta["problem"] = {
        "name": "mlp-digits",
        "n": 60,
        "widths": [100000, 100000],
        "activation": "tanh",
        "seed": 0,
        "dtype": "float64",
        "batch_size": None,
    }
    traj = nf.Trajectory.load(_craft(tmp_path / "huge.nft", "trajectory", meta, tensors))  # only the small tensors
    with pytest.raises(InputError, match=r"10,007,600,010 parameters, more than the limit of 10,000,000"):
        nf.problems.make(traj.problem)
    meta["problem"]["widths"] = [8]
    assert (
        nf.problems.make(
            nf.Trajectory.load(_craft(tmp_path / "ok.nft", "trajectory", meta, tensors)).problem, max_params=None
        ).dim
        == 64 * 8 + 8 + 8 * 10 + 10
    )
    with pytest.raises(InputError, match="more than the limit of 100"):
        nf.problems.make({"name": "scalar-factorization", "depth": 10**9}, max_params=100)


def test_tensors_of_the_wrong_dtype_or_rank_are_refused(small, tmp_path):
    tensors, meta = _parts(small, tmp_path / "run.nft")
    for name, bad in (
        ("iterates", tensors["iterates"].half()),
        ("steps", tensors["steps"].double()),
        ("loss", tensors["loss"][:, None]),
    ):
        forged = {**tensors, name: bad}
        with pytest.raises(FileFormatError, match=f"tensor '{name}' has dtype"):
            nf.Trajectory.load(_craft(tmp_path / "forged.nft", "trajectory", meta, forged))


def test_files_of_format_version_one_still_load(tmp_path):
    """A checkpoint of format version 1 (checksum of the tensors only; the shipped checkpoints were version 1 before
    they were regenerated) loads, and its checksum is still checked."""
    path = Path(__file__).parent / "golden" / "edge_of_stability_v1.nff"
    assert nf.checkpoint.info(path)["format_version"] == 1
    assert nf.load(path).coefficients
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # a bit of the last tensor
    broken = tmp_path / "broken.nff"
    broken.write_bytes(bytes(data))
    with pytest.raises(FileFormatError):
        nf.load(broken)


# ------------------------------------------------------------------------------------------ property-based


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@FAST
@given(lr=st.floats(allow_nan=True) | st.integers() | _json)
def test_only_a_positive_finite_lr_passes(lr):
    ok = not isinstance(lr, bool) and isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0
    try:
        _validate.TRAJECTORY.check({"lr": lr}, "metadata")
    except InputError:
        assert not ok
    else:
        assert ok


@FAST
@given(version=_json)
def test_only_a_supported_int_format_version_passes(small, tmp_path, version):
    tensors, meta = _parts(small, tmp_path / "run.nft")
    ok = isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= _io.FORMAT_VERSION
    path = _craft(tmp_path / "v.nft", "trajectory", meta, tensors, format_version=version)
    try:
        nf.Trajectory.load(path)
    except FileFormatError:
        assert not ok
    else:
        assert ok


@FAST
@given(data=st.binary(max_size=300), prefix=st.integers(0, 2000))
def test_arbitrary_bytes_give_a_neuralflow_error_and_nothing_else(small, tmp_path, data, prefix):
    good = small.save(tmp_path / "run.nft").read_bytes()
    for blob in (data, good[: min(prefix, len(good) - 1)] + data):  # junk, or a cut file with junk after the cut
        if blob == good:  # the junk happened to restore the cut
            continue
        with pytest.raises(NeuralflowError):
            _io.parse(blob, "trajectory", "probe")


@FAST
@given(
    lr=st.floats(1e-6, 1e3),
    eig_every=st.integers(0, 10**6),
    tol=st.floats(1e-12, 1.0),
    theta0=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2),
    smoothed=st.booleans(),
)
def test_any_valid_metadata_round_trips_exactly(small, tmp_path, lr, eig_every, tol, theta0, smoothed):
    import dataclasses

    traj = dataclasses.replace(
        small,
        lr=lr,
        problem={"name": "zhu-quartic", "theta0": theta0},
        meta={"eig_every": eig_every, "eig_tol": tol, "smoothed": smoothed},
    )
    assert _same(nf.Trajectory.load(traj.save(tmp_path / "r.nft")), traj)


@FAST
@given(
    description=st.fixed_dictionaries(
        {"name": st.just("mlp-digits")},
        optional={
            "n": _json | st.integers(-5, 3000),
            "widths": _json | st.lists(st.integers(-2, 10**6), max_size=4),
            "dtype": _json | st.sampled_from(["float64", "float32", "float16", "bfloat16", "manual_seed"]),
            "seed": _json,
            "activation": _json | st.sampled_from(["tanh", "relu", "exp"]),
            "batch_size": _json,
        },
    )
)
def test_a_problem_description_is_refused_or_builds_within_the_limit(description):
    try:
        _validate.check_problem_description(description, max_params=50_000)
    except InputError:
        return
    widths = description.get("widths", [64, 64])
    assert description.get("dtype", "float64") in ("float64", "float32")
    assert all(isinstance(w, int) and w >= 1 for w in widths)
    assert _validate.PROBLEM_DESCRIPTIONS["mlp-digits"].size(description) <= 50_000


def test_the_size_limit_holds_for_checkpoints_and_the_command_line_until_raised(small, tmp_path, capsys):
    from neuralflow.cli import main

    path = "checkpoints/modified_equation.nff"  # mlp-digits, 610 parameters
    with pytest.raises(InputError, match="610 parameters, more than the limit of 100"):
        nf.load(path, max_params=100)
    assert nf.load(path, max_params=None).model.problem.dim == 610
    tensors, meta = _parts(small, tmp_path / "run.nft")
    meta["problem"] = {
        "name": "mlp-digits",
        "n": 60,
        "widths": [100000, 100000],
        "activation": "tanh",
        "seed": 0,
        "dtype": "float64",
        "batch_size": None,
    }
    huge = _craft(tmp_path / "huge.nft", "trajectory", meta, tensors)
    assert main(["compare", str(huge), "--out", str(tmp_path / "c.png")]) == 2
    assert "more than the limit of 10,000,000" in capsys.readouterr().err
    assert main(["compare", str(huge), "--max-params", "100", "--out", str(tmp_path / "c.png")]) == 2
    assert "more than the limit of 100;" in capsys.readouterr().err


def test_whatever_the_writers_produce_reads_back(tmp_path):
    """Files the library itself writes pass the schemas: an unnamed problem, a user's note in meta, a user's net
    whose class shares a registered problem's name, an MLP without hidden layers, a float32 toy problem (rebuilt in
    float32), a fit of a trajectory without history."""
    p = nf.problems.zhu_quartic()
    t = nf.run_gd(p, 0.1, 12, progress=False)
    bare = nf.Trajectory(
        lr=0.1,
        steps=t.steps,
        iterates=t.iterates,
        loss=t.loss,
        grad_norm=t.grad_norm,
        sharpness=t.sharpness,
        update_u=t.update_u,
    )
    assert nf.Trajectory.load(bare.save(tmp_path / "bare.nft")).problem == {}
    t.meta["note"] = "first try"
    assert nf.Trajectory.load(t.save(tmp_path / "note.nft")).meta["note"] == "first try"

    class Quadratic(torch.nn.Module):  # the name of a registered problem
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    user = nf.problems.from_module(
        Quadratic(), torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    )
    assert nf.Trajectory.load(nf.run_gd(user, 0.1, 3, progress=False).save(tmp_path / "u.nft")).problem["name"] == (
        "quadratic"
    )
    linear = nf.run_gd(nf.problems.mlp_digits(n=20, widths=()), 0.1, 3, progress=False)
    assert nf.Trajectory.load(linear.save(tmp_path / "lin.nft")).problem["widths"] == []
    single = nf.run_gd(nf.problems.zhu_quartic(dtype=torch.float32), 0.1, 3, progress=False)
    rebuilt = nf.problems.make(nf.Trajectory.load(single.save(tmp_path / "f32.nft")).problem)
    assert rebuilt.dtype == torch.float32 and rebuilt.loss(rebuilt.theta0) == single.loss[0]
    no_history = nf.Trajectory(
        lr=0.1,
        steps=t.steps,
        iterates=t.iterates,
        loss=t.loss,
        grad_norm=t.grad_norm,
        sharpness=t.sharpness,
        update_u=t.update_u,
        problem=p.description,
    )
    model = nf.Hybrid(nf.flows.GradientFlow(p, 0.1), nf.corrections.TermLibrary(p, 0.1, terms=["Hg"]))
    fitted = nf.fit(model, no_history, window=4, method="regression", progress=False)
    back = checkpoint.load(checkpoint.save(fitted, tmp_path / "f.nff"))
    assert back.coefficients == fitted.coefficients


def test_compare_and_fit_rebuild_the_problem_on_the_device_and_dtype_asked(tmp_path):
    from neuralflow.cli import main

    run = nf.run_gd(nf.problems.zhu_quartic(), 0.1, 20, progress=False).save(tmp_path / "z.nft")
    for extra in (["--device", "cpu"], ["--dtype", "float32"]):
        assert (
            main(
                [
                    "compare",
                    str(run),
                    "--flows",
                    "gradient",
                    "--quiet",
                    "--json",
                    str(tmp_path / "c.json"),
                    "--out",
                    str(tmp_path / "c.png"),
                    *extra,
                ]
            )
            == 0
        )
        table = json.loads((tmp_path / "c.json").read_text())
        assert table["provenance"]["dtype"] == ("float32" if "float32" in extra else "float64")
