"""Every file and JSON result records what produced it; files without the record still load."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow import _io, provenance
from neuralflow.cli import main

KEYS = {
    "command",
    "caller",
    "neuralflow",
    "commit",
    "python",
    "torch",
    "numpy",
    "torchdiffeq",
    "scikit-learn",
    "device",
    "dtype",
    "threads",
}


def test_provenance_is_flat_and_names_this_function_and_the_checkout():
    prov = provenance.provenance(dtype=torch.float32)
    assert set(prov) == KEYS and all(isinstance(v, (str, int)) for v in prov.values())
    assert prov["caller"] == "test_provenance.py:test_provenance_is_flat_and_names_this_function_and_the_checkout"
    assert prov["dtype"] == "float32" and prov["threads"] == torch.get_num_threads()
    root = Path(nf.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["commit"].removesuffix("-dirty") == head.stdout.strip()


def test_outside_a_git_checkout_the_commit_is_unknown_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", tmp_path / "neuralflow")
    provenance.commit.cache_clear()
    try:
        assert provenance.provenance()["commit"] == "unknown"
    finally:
        provenance.commit.cache_clear()


def test_a_command_line_file_records_the_command_device_and_dtype(tmp_path):
    out = tmp_path / "run.nft"
    assert (
        main(
            [
                "run-gd",
                "--problem",
                "scalar-factorization",
                "--lr",
                "0.02",
                "--steps",
                "5",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _, header = _io.read(out, "trajectory")
    prov = header["provenance"]
    assert prov["command"].startswith("neuralflow run-gd --problem scalar-factorization") and prov["caller"] == "cli"
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert "# command: neuralflow run-gd" in (tmp_path / "run.nft.toml").read_text()
    assert provenance.provenance()["caller"] != "cli"  # the command is forgotten after the run


def test_a_file_written_before_provenance_still_loads(tmp_path):
    from safetensors.torch import save

    traj = nf.run_gd(nf.problems.zhu_quartic(), 0.1, 3, progress=False)
    path = traj.save(tmp_path / "new.nft")
    tensors, header = _io.read(path, "trajectory")
    del header["provenance"], header["sha256"]
    header["sha256"] = _io.digest(header, tensors)  # a valid file of the format, as written before provenance
    old = tmp_path / "old.nft"
    old.write_bytes(save(tensors, metadata={"neuralflow": json.dumps(header)}))
    assert torch.equal(nf.Trajectory.load(old).iterates, traj.iterates)


def test_json_results_carry_provenance(tmp_path):
    path = provenance.write_json(tmp_path / "r.json", {"x": 1})
    data = json.loads(path.read_text())
    assert data["x"] == 1 and set(data["provenance"]) == KEYS


def _unstamped_json_writes(source: str) -> list[int]:
    """Lines that write JSON past :func:`provenance.write_json`: ``json.dump``, ``.write_text(json.dumps(...))``."""

    def is_json(node: ast.AST, name: str) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == name
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "json"
        )

    lines = []
    for node in ast.walk(ast.parse(source)):
        if is_json(node, "dump"):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "write_text"
            and node.args
            and is_json(node.args[0], "dumps")
        ):
            lines.append(node.lineno)
    return lines


def test_every_benchmark_stamps_its_json_results():
    benchmarks = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    assert benchmarks
    unstamped = {path.name: lines for path in benchmarks if (lines := _unstamped_json_writes(path.read_text()))}
    assert not unstamped, f"JSON written without provenance.write_json (commit, versions, threads): {unstamped}"
    assert _unstamped_json_writes("import json\nout.write_text(json.dumps({}))\n") == [2]  # the check sees one
