"""One run of a sweep: GD with sharpness, then the comparison and the fit its configuration asks for
(:func:`run_task`), as one table row and the run's files.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save as save_fit
from ..compare import compare
from ..corrections import Hybrid, TermLibrary
from ..errors import DivergenceError, NeuralflowError
from ..fit import fit
from ..flows import for_run
from ..gd import run_gd
from ..problems import make
from ..provenance import __version__
from ..trajectory import Trajectory
from .configs import config_key

TIMING_COLUMNS = ("wall_s", "gd_s", "compare_s", "fit_s")
"""Columns that measure the machine rather than the run: they differ between two runs of one configuration."""


def _versions() -> dict[str, str]:
    return {
        "neuralflow_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def _flatten(prefix: str, value: Any, row: dict[str, Any]) -> None:
    """Configuration entries as table cells: nested dicts as dotted columns, lists as JSON text."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, row)
    elif isinstance(value, (list, tuple)):
        row[prefix] = json.dumps(list(value))
    else:
        row[prefix] = value


def _eos_measurements(traj: Any, quiet_ratio: float) -> dict[str, Any]:
    """EoS onset, the sharpness plateau and the quiet stretches (:meth:`Trajectory.eos_transients`)."""
    steps = traj.history["step"]
    s = traj.history["sharpness"][:, 0]
    late = (steps >= 3 * int(steps[-1]) // 4) & torch.isfinite(s)
    plateau = float(s[late].median()) if bool(late.any()) else math.nan
    onset = traj.eos_onset
    row: dict[str, Any] = {
        "final_loss": float(traj.history["loss"][-1]),
        "eos_onset": math.nan if onset is None else float(onset),
        "plateau": plateau,
        "plateau_ratio": plateau * traj.lr / 2,
    }
    # the quiet stretches need the sharpness at every step; run_gd records the oscillation at every step whatever
    # it stores
    every_step = "oscillation" in traj.history and bool(torch.isfinite(traj.history["sharpness"][:, 0]).all())
    quiet = traj.eos_transients(quiet_ratio) if every_step else None
    row["quiet_stretches"] = None if quiet is None else json.dumps([list(q) for q in quiet])
    row["quiet_steps"] = math.nan if quiet is None else float(sum(b - a for a, b in quiet))
    row["quiet_first"] = math.nan if quiet is None else (float(quiet[0][1] - quiet[0][0]) if quiet else 0.0)
    return row


def _file_bytes(save: Callable[[Path], Any], name: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        save(path)
        return path.read_bytes()


def _analyse(config: dict[str, Any], problem: Any, traj: Any, row: dict[str, Any]) -> dict[str, bytes]:
    """Compare flows with GD and fit a term library, as the configuration asks; fills ``row``, returns files."""
    files = {}
    t0 = time.perf_counter()
    if config["compare"]:
        flows = [for_run(name, problem, traj) for name in config["compare"]]
        for r in compare(traj, *flows, problem=problem).rows:
            row[f"distance.{r['flow']}"] = r["distance"]
            row[f"final_distance.{r['flow']}"] = r["final_distance"]
    row["compare_s"] = time.perf_counter() - t0
    if config["fit"]:
        t0 = time.perf_counter()
        options = dict(config["fit"])
        physics, terms = options.pop("physics"), options.pop("terms")
        if options.pop("exclude_transients"):
            options["exclude"] = traj.eos_transients(config["quiet_ratio"])
        model = Hybrid(for_run(physics, problem, traj), TermLibrary(problem, traj.lr, terms))
        result = fit(model, traj, progress=False, **options)
        for name, value in result.coefficients.items():
            row[f"coef.{name}"] = value
            row[f"se.{name}"] = result.uncertainty[name]
        row["fit.physics_error"], row["fit.hybrid_error"] = result.physics_error, result.hybrid_error
        files["fit.nff"] = _file_bytes(lambda p: save_fit(result, p, report=False), "fit.nff")
        row["fit_s"] = time.perf_counter() - t0
    return files


def run_task(config: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Run one normalised configuration; returns ``{"row": table row, "files": {name: bytes}}``.

    Runs anywhere (a pool worker, a Ray worker): it reads and writes no file of the sweep; the driver
    writes what it returns. GD that diverges is a result (``status="diverged"``, the partial trajectory
    kept), not a failure. Tensors stay on ``config["device"]``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t_start = time.perf_counter()
        row: dict[str, Any] = {"key": config_key(config)}
        _flatten("", {k: v for k, v in config.items() if k != "fit"}, row)
        if config["fit"]:
            _flatten("fit", config["fit"], row)
        problem = make(config["problem"], device=config["device"])
        files: dict[str, bytes] = {}
        traj: Trajectory | None
        try:
            traj = run_gd(
                problem,
                config["lr"],
                config["steps"],
                eig_every=config["eig_every"],
                n_eigs=config["n_eigs"],
                store_every=config["store_every"],
                noise=config["noise"],
                noise_seed=config["noise_seed"],
                progress=False,
            )
            row["status"], row["error"] = "ok", None
        except DivergenceError as err:
            traj = err.partial if isinstance(err.partial, Trajectory) else None  # None: diverged at once
            row["status"], row["error"] = "diverged", str(err)
        row["gd_s"] = time.perf_counter() - t_start
        if traj is not None:
            files["trajectory.nft"] = _file_bytes(traj.save, "trajectory.nft")
            row.update(_eos_measurements(traj, config["quiet_ratio"]))
        if traj is not None and row["status"] == "ok":
            try:
                files.update(_analyse(config, problem, traj, row))
            except NeuralflowError as err:  # GD's measurements stand; the analysis' failure is a result too
                row["status"], row["error"] = "analysis-failed", f"{type(err).__name__}: {err}"
        row["wall_s"] = time.perf_counter() - t_start
        row.update(_versions())
        return {"row": row, "files": files}
    finally:
        torch.set_num_threads(before)
