"""Sweeps: many independent GD runs (a grid of configurations) -> one tidy table, files per run, resumable.

A physics-style claim is a law across conditions: the plateau of the sharpness sits at ``2/lr`` for
every width and seed (Cohen et al., ICLR 2021), the modified-equation coefficients are the same pure
numbers at every ``lr`` (Hairer, Lubich and Wanner, ch. IX). :func:`sweep` runs one task per
configuration (GD with sharpness, then optionally a comparison with physics flows and a fit of a
term library) and returns a pandas DataFrame, one row per run; :func:`law_figure` and
:func:`coefficient_figure` draw the laws it tests.

A configuration is a JSON-able dict::

    {"problem": {"name": "mlp-digits", "n": 500, "widths": [32, 32], "seed": 0},   # problems.make
     "lr": 0.1, "steps": 700, "eig_every": 1, "n_eigs": 1, "store_every": 1, "device": "cpu",
     "noise": 1e-10, "noise_seed": 0,                                                   # run_gd's injected noise
     "compare": ["gradient", "central"],                                               # flows.FLOWS names
     "fit": {"physics": "gradient", "terms": ["Hg"], "window": 20, "method": "regression",
             "exclude_transients": False, ...}}                                        # further fit() options

:func:`grid` builds the Cartesian product of a base configuration and axes (``"problem.seed"``
addresses a nested key). Every configuration is checked before anything runs.

Files (in ``out``): ``sweep.json`` (the neuralflow version and format that wrote the folder),
``runs/<key>/trajectory.nft``, ``runs/<key>/fit.nff`` and ``runs/<key>/row.nfr`` (the table row),
``table.csv`` and, with pyarrow installed, ``table.parquet``. ``<key>`` is a hash of the run's
normalised configuration (without ``noise`` and ``noise_seed`` when ``noise`` is 0: a run without noise keeps the
key it had before noise was an option, and its ``noise_seed``, which changes nothing, is normalised to 0). Each
run's files are written by the driver, atomically, the row last, as soon as the run finishes: a sweep that is
interrupted resumes where it stopped, and a repeated one computes nothing. A folder written by another neuralflow
version is refused (the rows would not be comparable), with nothing in it changed.

Engines
-------
Tasks run on an :class:`Engine`, one small interface: ``map_unordered(fn, items)`` yields
``(index, fn(item))`` as tasks finish, ``close()`` releases what the engine started. Two are registered
in :data:`ENGINES`:

* ``"local"`` (default): a process pool on this machine, ``workers`` processes (default: the CPU
  count), one torch thread each; ``workers=1`` runs the tasks in this process, one after another.
  A worker that dies is replaced and its task run again.
* ``"ray"``: a Ray cluster (``pip install -e ".[cluster]"``) at ``address`` (``"host:port"`` of a
  head started with ``ray start --head``; none: ``ray.init()`` starts or joins a local one). Each
  task asks Ray for ``cpus_per_task`` CPUs and, when its problem is on CUDA, one GPU; Ray runs a task
  again when its worker dies. The results folder lives on the driver: workers need no shared
  file system, only neuralflow installed.

To add an executor (Dask, Slurm through submitit), subclass :class:`Engine` and implement
``map_unordered`` with that library's futures: submit ``fn(item)`` for every item
(``client.submit`` for Dask, ``executor.submit`` for submitit), then yield ``(index, future.result())``
in completion order (``dask.distributed.as_completed``; for submitit poll ``job.done()``); give each
job one CPU and ``torch.set_num_threads(1)`` is already done by the task itself. Register the class in
:data:`ENGINES` under its name; :func:`sweep` and ``neuralflow sweep --engine NAME`` then take it.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import _io
from .checkpoint import save as save_fit
from .compare import compare
from .corrections import TERMS, Hybrid, TermLibrary
from .errors import DivergenceError, EngineError, FileFormatError, InputError, NeuralflowError
from .fit import fit
from .flows import FLOWS, for_run
from .gd import check_noise, run_gd
from .problems import PROBLEMS, check_lr, check_nonnegative_int, check_positive_int, make
from .provenance import __version__
from .trajectory import Trajectory

__all__ = ["sweep", "grid", "normalise", "config_key", "run_task", "law_figure", "coefficient_figure", "Engine",
           "LocalEngine", "RayEngine", "ENGINES", "TIMING_COLUMNS"]

SWEEP_FORMAT = 1
_ROW_KIND = "sweep-row"
TIMING_COLUMNS = ("wall_s", "gd_s", "compare_s", "fit_s")
"""Columns that measure the machine rather than the run: they differ between two runs of one configuration."""

_RUN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "eig_every": 1, "n_eigs": 1, "store_every": 1, "device": "cpu", "compare": [], "fit": None,
    "quiet_ratio": 0.1, "noise": 0.0, "noise_seed": 0,
}
_FIT_DEFAULTS: dict[str, Any] = {
    "physics": "gradient", "terms": ["Hg"], "window": 20, "method": "regression", "exclude_transients": False,
}


# ----------------------------------------------------------------------------------------- configurations
def grid(base: dict[str, Any], axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The configurations of ``base`` with every combination of the ``axes`` values (last axis fastest).

    Axis names are configuration keys; a dotted name sets a nested one (``"problem.seed"``,
    ``"fit.window"``). Example: ``grid({"problem": {...}, "steps": 700}, {"lr": [0.05, 0.1], "problem.seed":
    [0, 1, 2]})`` gives 6 configurations.
    """
    if not isinstance(base, dict):
        raise InputError(f"grid: base must be a configuration dict, got {type(base).__name__}.")
    names = list(axes)
    for name in names:
        values = axes[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or not list(values):
            raise InputError(f"grid: axis {name!r} must be a non-empty list of values, got {values!r}.")
    configs = []
    for combo in itertools.product(*(list(axes[n]) for n in names)):
        config = copy.deepcopy(base)
        for name, value in zip(names, combo, strict=True):
            *path, leaf = name.split(".")
            node = config
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise InputError(f"grid: axis {name!r} goes through {part!r}, which is not a dict in the base.")
            node[leaf] = copy.deepcopy(value)
        configs.append(config)
    return configs


def normalise(config: dict[str, Any], where: str = "run") -> dict[str, Any]:
    """``config`` with defaults filled in and every value checked; raise :class:`InputError` naming ``where``."""
    def bad(why: str) -> InputError:
        return InputError(f"sweep: {where} ({json.dumps(config, default=str)[:200]}): {why}")

    if not isinstance(config, dict):
        raise InputError(f"sweep: {where} must be a configuration dict, got {type(config).__name__}.")
    unknown = sorted(set(config) - set(_RUN_DEFAULTS) - {"problem", "lr"})
    if unknown:
        raise bad(f"unknown keys {unknown}; a configuration has problem, lr and {sorted(_RUN_DEFAULTS)}.")
    out = {**copy.deepcopy(_RUN_DEFAULTS), **copy.deepcopy(config)}
    problem = out.get("problem")
    buildable = sorted(set(PROBLEMS) - {"module"})  # a sweep's worker does not run a user's file named in a config
    if not isinstance(problem, dict) or problem.get("name") not in buildable:
        raise bad(f"'problem' must be a dict whose 'name' is one of {buildable}, got {problem!r}.")
    if "lr" not in config:
        raise bad("no 'lr' given.")
    try:
        out["lr"] = check_lr(out["lr"])
        for name in ("steps", "n_eigs", "store_every"):
            check_positive_int(out[name], name)
        check_nonnegative_int(out["eig_every"], "eig_every", "never")
        out["noise"] = check_noise(out["noise"])
        check_nonnegative_int(out["noise_seed"], "noise_seed")
        if not out["noise"]:  # GD without noise draws nothing: every seed is the same run
            out["noise_seed"] = 0
    except InputError as err:
        raise bad(str(err)) from None
    if not isinstance(out["device"], str):
        raise bad(f"device must be a string such as 'cpu' or 'cuda', got {out['device']!r}.")
    if isinstance(out["compare"], str) or not all(f in FLOWS for f in out["compare"]):
        raise bad(f"'compare' must be a list of flow names from {sorted(FLOWS)}, got {out['compare']!r}.")
    out["compare"] = list(out["compare"])
    if out["fit"] is not None:
        if not isinstance(out["fit"], dict):
            raise bad(f"'fit' must be a dict of fit options (or None), got {out['fit']!r}.")
        options = out["fit"] = {**_FIT_DEFAULTS, **out["fit"]}
        allowed = set(inspect.signature(fit).parameters) - {"model", "trajectory", "progress"}
        unknown = sorted(set(options) - allowed - set(_FIT_DEFAULTS))
        if unknown:
            raise bad(f"unknown fit options {unknown}; fit takes {sorted(allowed | set(_FIT_DEFAULTS))}.")
        if options["physics"] not in FLOWS:
            raise bad(f"fit physics {options['physics']!r} is not a flow; choose from {sorted(FLOWS)}.")
        if isinstance(options["terms"], str) or not options["terms"] or not all(t in TERMS for t in options["terms"]):
            raise bad(f"fit terms must be a non-empty list from {sorted(TERMS)}, got {options['terms']!r}.")
        options["terms"] = list(options["terms"])
    return out


def config_key(config: dict[str, Any]) -> str:
    """A short hash of a normalised configuration: the name of the run's folder (see the module docstring)."""
    if not config.get("noise"):
        config = {k: v for k, v in config.items() if k not in ("noise", "noise_seed")}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ one run
def _versions() -> dict[str, str]:
    return {"neuralflow_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version()}


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
            traj = run_gd(problem, config["lr"], config["steps"], eig_every=config["eig_every"],
                          n_eigs=config["n_eigs"], store_every=config["store_every"], noise=config["noise"],
                          noise_seed=config["noise_seed"], progress=False)
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


# ------------------------------------------------------------------------------------------------ engines
class Engine:
    """Where tasks run. ``map_unordered(fn, items)`` yields ``(index, fn(item))`` as tasks finish."""

    name = "engine"

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine started (processes, a Ray connection)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class LocalEngine(Engine):
    """A process pool on this machine: ``workers`` processes, ``threads`` torch threads each.

    ``workers=1`` runs the tasks in the calling process. Processes start from a fork server that has
    imported neuralflow once (Linux; elsewhere spawned). A worker that dies (killed, out of memory)
    breaks the pool: the pool is rebuilt and the unfinished tasks run again, at most ``retries`` times.
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads: int = 1, retries: int = 2) -> None:
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"sweep: workers must be a positive int, got {workers!r}.")
        self.workers, self.threads, self.retries = workers, threads, retries

    def _pool(self, n: int) -> ProcessPoolExecutor:
        ctx: mp.context.BaseContext
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            # imported once in the fork server instead of once per worker (torch, the pipeline, the digits' loader)
            ctx.set_forkserver_preload(["neuralflow", "neuralflow.sweep", "sklearn.datasets"])
        else:
            ctx = mp.get_context("spawn")
        return ProcessPoolExecutor(min(self.workers, n), mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.threads,))

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if self.workers == 1:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        left = set(range(len(items)))
        for attempt in range(self.retries + 1):
            pool = self._pool(len(left))
            try:
                futures = {pool.submit(fn, items[i]): i for i in sorted(left)}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        result = fut.result()  # a broken pool raises here; a task's own error propagates
                        left.discard(futures[fut])
                        yield futures[fut], result
                return
            except BrokenProcessPool:
                if attempt == self.retries:
                    raise EngineError(
                        f"sweep: local workers died {self.retries + 1} times (killed, out of memory, or a script "
                        "that calls sweep outside `if __name__ == '__main__':`, which worker processes re-run); "
                        f"{len(left)} runs did not finish. The finished runs are saved: run the sweep again to resume."
                    ) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


def _reachable(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class RayEngine(Engine):
    """Tasks on a Ray cluster (``pip install -e ".[cluster]"``).

    ``address``: ``"host:port"`` of a running head (``ray start --head``) or ``"ray://host:10001"``
    (Ray client); ``None`` lets ``ray.init()`` start or join a local one. Each task asks for
    ``cpus_per_task`` CPUs and one GPU when ``gpu(item)`` says so; Ray runs a task again (up to
    ``retries`` times) when its worker dies.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: int = 1, retries: int = 3,
                 gpu: Callable[[Any], bool] = lambda item: False) -> None:
        try:
            import ray
        except ImportError:
            raise EngineError(
                "sweep: engine='ray' needs Ray, which is not installed; pip install -e \".[cluster]\" "
                "(or pip install ray), or use engine='local'."
            ) from None
        if address is not None and address not in ("auto", "local") and not _reachable(address):
            raise EngineError(
                f"sweep: no Ray head answers at {address!r}. Start one with `ray start --head --port PORT` and pass "
                "its address (host:port), or pass no address to start a local Ray. Nothing was run."
            )
        self.ray = ray
        self.cpus, self.retries, self.gpu = cpus_per_task, retries, gpu
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                hint = (" ray.init() joins the cluster named by RAY_ADDRESS or left behind by an earlier Ray; if that "
                        "one is gone, `ray stop` clears it, or pass address='local' to start a fresh local Ray."
                        if address is None else "")
                raise EngineError(f"sweep: could not connect to Ray at {address!r} ({err}).{hint} Nothing was run.") \
                    from None

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        remote = self.ray.remote(fn)
        refs = {
            remote.options(num_cpus=self.cpus, num_gpus=1 if self.gpu(item) else 0, max_retries=self.retries,
                           retry_exceptions=False).remote(item): i
            for i, item in enumerate(items)
        }
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as err:  # the task's own exception, re-raised as itself
                    raise err.as_instanceof_cause() from None
                except self.ray.exceptions.RayError as err:
                    raise EngineError(f"sweep: a Ray task failed beyond its {self.retries} retries ({err}); the "
                                      "finished runs are saved, run the sweep again to resume.") from None
                yield refs[ref], result

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


ENGINES: dict[str, type[Engine]] = {"local": LocalEngine, "ray": RayEngine}
"""Registered engines by name (see the module docstring to add one)."""


def _task(item: tuple[dict[str, Any], int]) -> dict[str, Any]:
    config, threads = item
    return run_task(config, threads)


def _make_engine(engine: str | Engine, workers: int | None, address: str | None, threads: int) -> Engine:
    if isinstance(engine, Engine):
        return engine
    if engine == "ray":
        return RayEngine(address, cpus_per_task=threads, gpu=lambda item: str(item[0]["device"]).startswith("cuda"))
    if address is not None:
        raise InputError("sweep: address is for engine='ray'; the local engine runs on this machine.")
    return LocalEngine(workers, threads)


# -------------------------------------------------------------------------------------------------- files
def _open_folder(out: Path) -> None:
    """Create ``out`` or check that this neuralflow wrote it; never changes a foreign folder."""
    manifest = out / "sweep.json"
    mine = {"format": SWEEP_FORMAT, "neuralflow_version": _versions()["neuralflow_version"]}
    if manifest.exists():
        try:
            theirs = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise FileFormatError(f"{manifest}: not a neuralflow sweep manifest ({err}); use another folder.") from None
        if not isinstance(theirs, dict) or {k: theirs.get(k) for k in mine} != mine:
            raise FileFormatError(
                f"{out} holds a sweep written by neuralflow {theirs.get('neuralflow_version')!r} (sweep format "
                f"{theirs.get('format')!r}); this is neuralflow {mine['neuralflow_version']} (format {SWEEP_FORMAT}), "
                "whose rows would not be comparable. Pass another output folder; nothing in this one was changed."
            )
    elif out.exists() and any(out.iterdir()):
        raise FileFormatError(f"{out} exists and is not a neuralflow sweep folder; pass a new or empty folder.")
    else:
        _io.write_atomic(manifest, json.dumps(mine, indent=1).encode())


def _row_path(out: Path, key: str) -> Path:
    return out / "runs" / key / "row.nfr"


def _read_row(out: Path, key: str) -> dict[str, Any] | None:
    path = _row_path(out, key)
    if not path.exists():
        return None
    _, header = _io.read(path, _ROW_KIND)
    version = _versions()["neuralflow_version"]
    if header.get("neuralflow_version") != version:
        raise FileFormatError(f"{path}: written by neuralflow {header.get('neuralflow_version')!r}, this is {version}; "
                              "pass another output folder.")
    return header["meta"]["row"]


def _save_run(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    row = dict(result["row"])
    folder = out / "runs" / row["key"]
    for name, blob in result["files"].items():
        _io.write_atomic(folder / name, blob)
        row[f"file.{name.split('.')[0]}"] = str(Path("runs") / row["key"] / name)
    _io.write(_row_path(out, row["key"]), _ROW_KIND, {}, {"row": row})  # last: the run counts as done
    return row


def _save_table(out: Path, table: Any) -> None:
    _io.write_atomic(out / "table.csv", table.to_csv(index=False).encode())
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    _io.write_atomic(out / "table.parquet", buffer.getvalue())


# ------------------------------------------------------------------------------------------------ sweep
def sweep(
    configs: Sequence[dict[str, Any]],
    out: str | os.PathLike = "sweep",
    engine: str | Engine = "local",
    workers: int | None = None,
    address: str | None = None,
    threads: int = 1,
    progress: bool = False,
) -> Any:
    """Run every configuration (see the module docstring) as an independent task; return the table.

    Runs already in ``out`` are read back, not run again; a configuration listed twice runs once.

    Parameters
    ----------
    configs : sequence of dict
        The configurations, at least one (:func:`grid` builds a product of axes).
    out : str or PathLike, default "sweep"
        The folder of the runs' files and the table; made if missing, refused if another program wrote it.
    engine : str or Engine, default "local"
        ``"local"`` (``workers`` processes), ``"ray"`` (``address``), or an :class:`Engine`.
    workers : int, optional
        Processes of the local engine; None: its default.
    address : str, optional
        The Ray cluster's address (``engine="ray"`` only); None: a local Ray.
    threads : int, default 1
        Torch threads per task.
    progress : bool, default False
        Show a bar over the runs.

    Returns
    -------
    pandas.DataFrame
        One row per configuration, in the order given: the configuration (nested keys dotted, lists as JSON),
        ``status``, ``eos_onset`` (first step with ``S >= 2/lr``), ``plateau`` (median sharpness over the last
        quarter of the run) and ``plateau_ratio`` (``plateau / (2/lr)``), ``quiet_stretches`` / ``quiet_steps``
        / ``quiet_first`` (the stretches past ``2/lr`` without oscillation, :meth:`Trajectory.eos_transients`),
        ``distance.<flow>`` and ``final_distance.<flow>`` for compared flows, ``coef.<term>`` and ``se.<term>``
        for a fit, wall times (:data:`TIMING_COLUMNS`), versions and the run's files (relative to ``out``).

    Raises
    ------
    InputError
        Without pandas, on an unknown engine, empty or invalid configurations, or ``address`` without Ray.
    FileFormatError
        When ``out`` holds files another program or another sweep format wrote.
    """
    try:
        import pandas as pd
    except ImportError:
        raise InputError('sweep: the results table needs pandas; pip install -e ".[frames]" (or pandas)') from None
    if isinstance(engine, str) and engine not in ENGINES:
        raise InputError(f"sweep: unknown engine {engine!r}; choose from {sorted(ENGINES)} (or pass an Engine).")
    if isinstance(configs, dict) or not isinstance(configs, Sequence) or not configs:
        raise InputError("sweep: configs must be a non-empty list of configuration dicts (see neuralflow.sweep.grid).")
    normalised = [normalise(c, f"run {i}") for i, c in enumerate(configs)]
    keys = [config_key(c) for c in normalised]
    out = Path(out)
    _open_folder(out)
    rows = {k: _read_row(out, k) for k in dict.fromkeys(keys)}
    todo = [(c, threads) for c, k in zip(normalised, keys, strict=True) if rows[k] is None]
    todo = list({config_key(c): (c, t) for c, t in todo}.values())  # a configuration listed twice runs once
    if todo:
        with _make_engine(engine, workers, address, threads) as eng:
            bar = tqdm(total=len(todo), desc=f"sweep ({eng.name})", disable=not progress, unit="run")
            for _, result in eng.map_unordered(_task, todo):
                rows[result["row"]["key"]] = _save_run(out, result)
                bar.update(1)
            bar.close()
    table = pd.DataFrame([rows[k] for k in keys])
    _save_table(out, table)
    return table


# ------------------------------------------------------------------------------------------------ figures
def law_figure(table: Any, lr: str = "lr") -> Any:
    """The edge-of-stability law across a sweep: EoS onset step and ``plateau / (2/lr)`` against ``lr``.

    One point per run, the mean over runs at each ``lr`` joined by a line; the second panel has the
    law's value 1 (Cohen et al. 2021: the sharpness rises to ``2/lr`` and hovers there). Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, (ax_on, ax_pl) = plt.subplots(1, 2, figsize=(9, 3.6))
    ok = table[table["status"] == "ok"] if "status" in table else table
    for ax, column, label in ((ax_on, "eos_onset", "EoS onset (step)"), (ax_pl, "plateau_ratio", "plateau / (2/lr)")):
        ax.plot(ok[lr], ok[column], "o", alpha=0.5, ms=4)
        mean = ok.groupby(lr)[column].mean()
        ax.plot(mean.index, mean.values, "-", color="C0")
        ax.set_xlabel("lr")
        ax.set_ylabel(label)
    reached = ok["eos_onset"].notna()
    ax_on.set_title(f"{int(reached.sum())} of {len(ok)} runs reach 2/lr", fontsize="small")
    ax_on.set_xlim(ax_pl.get_xlim())
    ax_pl.axhline(1.0, color="k", ls="--", lw=1, label="2/lr")
    ax_pl.legend(loc="best", fontsize="small")
    fig.suptitle(f"edge of stability across {len(ok)} runs")
    fig.tight_layout()
    return fig


def coefficient_figure(table: Any, term: str, lr: str = "lr") -> Any:
    """A fitted coefficient (``coef.<term>`` with error bars ``se.<term>``) against ``lr``, with theory."""
    import matplotlib.pyplot as plt

    if f"coef.{term}" not in table:
        raise InputError(f"coefficient_figure: the table has no fitted coefficient {term!r} (column coef.{term}).")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(table[lr], table[f"coef.{term}"], yerr=table[f"se.{term}"], fmt="o", ms=4, capsize=3, label="fitted")
    theory = TERMS[term].theory if term in TERMS else None
    if theory is not None:
        ax.axhline(theory, color="k", ls="--", lw=1, label=f"theory {theory:.4g}")
    ax.set_xlabel("lr")
    ax.set_ylabel(f"coefficient of {term}")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig
