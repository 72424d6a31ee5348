"""Sweeps: the table, resume after a kill, engines (local pool, a real Ray head with a killed worker), bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from neuralflow.errors import EngineError, FileFormatError, InputError
from neuralflow.sweep import TIMING_COLUMNS, LocalEngine, config_key, grid, normalise, sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = {"problem": {"name": "zhu-quartic"}, "steps": 60, "fit": {"terms": ["Hg"], "window": 10}}
LRS = [0.1, 0.13, 0.16, 0.2]


class Counting(LocalEngine):
    """The in-process engine, recording which configurations it was asked to run."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.ran: list[float] = []

    def map_unordered(self, fn, items):
        self.ran += [item[0]["lr"] for item in items]
        yield from super().map_unordered(fn, items)


def configs(lrs=LRS) -> list[dict]:
    return grid(BASE, {"lr": lrs})


def results(table: pd.DataFrame) -> pd.DataFrame:
    """The table without the columns that time the machine."""
    return table.drop(columns=[c for c in TIMING_COLUMNS if c in table])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """The uninterrupted sweep, run in this process."""
    return sweep(configs(), out=tmp_path_factory.mktemp("ref") / "sweep", engine=Counting(), progress=False)


def test_table_has_one_row_per_run_with_the_law_and_the_fit(reference):
    assert list(reference["lr"]) == LRS
    assert (reference["status"] == "ok").all()
    # plateau / (2/lr) and the sharpness it comes from agree; the fit's coefficient comes with its error bar
    for _, row in reference.iterrows():
        assert row["plateau_ratio"] == pytest.approx(row["plateau"] * row["lr"] / 2)
        assert math.isfinite(row["coef.Hg"]) and row["se.Hg"] > 0
        assert row["neuralflow_version"] and row["key"] == config_key(normalise(configs()[LRS.index(row["lr"])]))
    assert {"eos_onset", "quiet_steps", "quiet_stretches", "wall_s", "file.trajectory", "file.fit"} <= set(reference)


def test_table_and_files_are_saved(reference, tmp_path):
    out = tmp_path / "sweep"
    table = sweep(configs(LRS[:2]), out=out, engine=Counting(), progress=False)
    saved = pd.read_csv(out / "table.csv")
    assert list(saved["lr"]) == LRS[:2] and saved["coef.Hg"].tolist() == pytest.approx(table["coef.Hg"].tolist())
    import neuralflow as nf

    traj = nf.Trajectory.load(out / table["file.trajectory"][0])
    assert traj.lr == LRS[0] and len(traj) == BASE["steps"] + 1
    assert nf.load(out / table["file.fit"][0]).coefficients["Hg"] == pytest.approx(table["coef.Hg"][0])


def test_diverging_run_is_a_result_with_its_partial_trajectory(tmp_path):
    import neuralflow as nf

    out = tmp_path / "sweep"
    table = sweep([{**BASE, "lr": 0.25}], out=out, engine=Counting(), progress=False)
    row = table.iloc[0]
    assert row["status"] == "diverged" and "diverged at step" in row["error"]
    partial = nf.Trajectory.load(out / row["file.trajectory"])
    assert 0 < len(partial) < BASE["steps"] + 1 and bool(partial.iterates.isfinite().all())
    again = Counting()
    sweep([{**BASE, "lr": 0.25}], out=out, engine=again, progress=False)
    assert again.ran == []  # a divergence is not retried: it is what this lr does


def test_repeated_sweep_computes_nothing(reference, tmp_path):
    out = tmp_path / "sweep"
    sweep(configs(LRS[:2]), out=out, engine=Counting(), progress=False)
    again = Counting()
    sweep(configs(LRS[:2]), out=out, engine=again, progress=False)
    assert again.ran == []


def test_killed_sweep_resumes_with_only_the_rest_and_the_same_table(reference, tmp_path):
    out = tmp_path / "sweep"
    script = (
        "import json, sys\nfrom neuralflow.sweep import sweep\n"
        "if __name__ == '__main__':\n"
        "    sweep(json.loads(sys.argv[1]), out=sys.argv[2], workers=1, progress=False)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(configs()), str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not list(out.glob("runs/*/row.nfr")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("runs/*/row.nfr")))
    assert 1 <= finished < len(LRS), "the sweep must be killed after some runs and before the last"
    engine = Counting()
    table = sweep(configs(), out=out, engine=engine, progress=False)
    assert len(engine.ran) == len(LRS) - finished
    pd.testing.assert_frame_equal(results(table), results(reference))


def test_local_pool_gives_the_serial_table(reference, tmp_path):
    table = sweep(configs(), out=tmp_path / "sweep", workers=2, progress=False)
    pd.testing.assert_frame_equal(results(table), results(reference))


# ------------------------------------------------------------------------------------------------ bad input
def test_invalid_grid_value_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match=r"run 1 .*lr must be a positive"):
        sweep(grid(BASE, {"lr": [0.1, -0.1]}), out=tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(InputError, match="lr must be a positive"):
        sweep(grid(BASE, {"lr": [0.0]}), out=tmp_path / "sweep", progress=False)
    with pytest.raises(InputError, match=r"unknown fit options \['windw'\]"):
        sweep([{**BASE, "lr": 0.1, "fit": {"windw": 10}}], out=tmp_path / "sweep", progress=False)
    with pytest.raises(InputError, match="flow names"):
        sweep([{**BASE, "lr": 0.1, "compare": ["nonsense"]}], out=tmp_path / "sweep", progress=False)


@pytest.fixture
def finished(tmp_path) -> Path:
    """A results folder holding finished runs."""
    out = tmp_path / "sweep"
    sweep(configs(LRS[:1]), out=out, engine=Counting(), progress=False)
    return out


def test_unknown_engine_is_refused_and_nothing_is_lost(finished):
    before = snapshot(finished)
    with pytest.raises(InputError, match="unknown engine 'dask'"):
        sweep(configs(LRS[:2]), out=finished, engine="dask", progress=False)
    assert snapshot(finished) == before


def test_unreachable_ray_address_is_refused_and_nothing_is_lost(finished):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(finished)
    with pytest.raises(EngineError, match="Ray"):
        sweep(configs(LRS[:2]), out=finished, engine="ray", address=f"127.0.0.1:{port}", progress=False)
    assert snapshot(finished) == before


def test_folder_from_another_version_is_refused_and_left_alone(finished):
    manifest = finished / "sweep.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "neuralflow_version": "0.0.1"}))
    before = snapshot(finished)
    with pytest.raises(FileFormatError, match="written by neuralflow '0.0.1'"):
        sweep(configs(LRS[:2]), out=finished, engine=Counting(), progress=False)
    assert snapshot(finished) == before


def test_folder_that_is_not_a_sweep_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileFormatError, match="not a neuralflow sweep folder"):
        sweep(configs(LRS[:1]), out=tmp_path, engine=Counting(), progress=False)
    assert (tmp_path / "mine.txt").read_text() == "user data"


# ------------------------------------------------------------------------------------------------ Ray
def _ray_task_pids() -> list[int]:
    """Ray workers running a sweep task (Ray titles them ``ray::_task``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::_task"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with two worker CPUs, stopped (its process group) afterwards."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
    if not Path("/proc").is_dir():
        pytest.skip("the worker-kill test finds Ray workers through /proc (Linux)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a private head on the loopback address: without token authentication, which a head started after any
    # ray.init() on this machine would otherwise require of drivers that do not set RAY_AUTH_MODE themselves
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not start within 90 s")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # a head stopped by a signal leaves its address behind, where a later ray.init() would look for it
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker_and_gives_the_local_table(ray_head, reference, tmp_path):
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = _ray_task_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    table = sweep(configs(), out=tmp_path / "sweep", engine="ray", address=ray_head, progress=False)
    killer.join()
    assert killed, "no Ray worker was running a task to kill"
    assert len(list((tmp_path / "sweep").glob("runs/*/row.nfr"))) == len(LRS)
    pd.testing.assert_frame_equal(results(table), results(reference))


def test_command_line_sweep_writes_the_table_and_the_figures(tmp_path, capsys):
    from neuralflow.cli import main

    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"base": BASE, "grid": {"lr": LRS[:2]}}))
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1"]) == 0
    assert len(pd.read_csv(out / "table.csv")) == 2
    assert (out / "law.png").exists() and (out / "coef_Hg.png").exists()
    spec.write_text(json.dumps({"base": BASE, "grid": {"lr": [-1.0]}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "bad")]) == 2
    assert "lr must be a positive" in capsys.readouterr().err


def _dies_once(item: tuple[str, int]) -> int:
    """A task whose first attempt kills its worker process (as the out-of-memory killer would)."""
    marker, value = item
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return 2 * value


def test_local_pool_replaces_a_dead_worker_and_loses_no_task(tmp_path):
    items = [(str(tmp_path / "died"), v) for v in range(4)]
    with LocalEngine(workers=2) as engine:
        results = dict(engine.map_unordered(_dies_once, items))
    assert (tmp_path / "died").exists()
    assert results == {i: 2 * v for i, (_, v) in enumerate(items)}


def test_quiet_stretches_are_measured_whatever_the_run_stores(tmp_path):
    """run_gd records the sharpness and the oscillation at every step, so a sparse store still gives the stretches."""
    config = {"problem": {"name": "zhu-quartic"}, "lr": 0.2, "steps": 200, "store_every": 7, "compare": []}
    table = sweep([config], out=tmp_path / "s", workers=1, progress=False)
    assert table["quiet_steps"].iloc[0] == 0.0 and table["quiet_stretches"].iloc[0] == "[]"
    sparse_sharpness = {**config, "eig_every": 2}
    table = sweep([sparse_sharpness], out=tmp_path / "t", workers=1, progress=False)
    assert math.isnan(table["quiet_steps"].iloc[0])  # the sharpness is not known at every step


def test_noise_is_part_of_a_configuration_its_key_and_its_table(tmp_path):
    """run_gd's injected noise goes through a sweep: the run is run_gd's with that noise and seed, the table has both
    columns, each seed is a run of its own, and without noise the seed changes nothing (one run, the key it had)."""
    import torch

    import neuralflow as nf
    from neuralflow.problems import make

    plain = {"problem": {"name": "zhu-quartic"}, "lr": 0.1, "steps": 30}
    noisy = [{**plain, "noise": 1e-3, "noise_seed": s} for s in (0, 1)]
    table = sweep([plain, *noisy], out=tmp_path / "s", workers=1, progress=False)
    assert table["noise"].tolist() == [0.0, 1e-3, 1e-3] and table["noise_seed"].tolist() == [0, 0, 1]
    assert len(set(table["key"])) == 3
    runs = [nf.Trajectory.load(tmp_path / "s" / f) for f in table["file.trajectory"]]
    for config, traj in zip([plain, *noisy], runs, strict=True):
        again = nf.run_gd(
            make(config["problem"]),
            0.1,
            30,
            noise=config.get("noise", 0.0),
            noise_seed=config.get("noise_seed", 0),
            progress=False,
        )
        assert torch.equal(traj.iterates, again.iterates)
    assert not torch.equal(runs[1].iterates, runs[2].iterates)
    assert not torch.equal(runs[0].iterates, runs[1].iterates)
    quiet_seed = {**plain, "noise": 0, "noise_seed": 7}
    assert normalise(quiet_seed)["noise_seed"] == 0
    assert config_key(normalise(quiet_seed)) == config_key(normalise(plain)) == table["key"][0]
    before = {k: v for k, v in normalise(plain).items() if k not in ("noise", "noise_seed")}
    assert config_key(normalise(plain)) == config_key(before)  # the key it had before noise was an option
    for bad, match in (
        ({"noise": -1e-3}, "noise must be a finite non-negative"),
        ({"noise": True}, "noise must be a finite non-negative"),
        ({"noise_seed": -1}, "noise_seed must be a non-negative int"),
        ({"noise": 0.0, "noise_seed": "one"}, "noise_seed must be a non-negative int"),
    ):
        with pytest.raises(InputError, match=f"run 0 .*{match}"):
            sweep([{**plain, **bad}], out=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
