""":func:`sweep`: normalise the configurations, read back the finished runs, run the others on an engine,
save each as it finishes, and return the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import InputError
from .configs import config_key, normalise
from .engines import ENGINES, Engine, LocalEngine, RayEngine
from .folder import _open_folder, _read_row, _save_run, _save_table
from .task import run_task


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


def sweep(
    configs: Sequence[dict[str, Any]],
    out: str | os.PathLike = "sweep",
    engine: str | Engine = "local",
    workers: int | None = None,
    address: str | None = None,
    threads: int = 1,
    progress: bool = False,
) -> Any:
    """Run every configuration (see the docstring of neuralflow.sweep) as an independent task; return the table.

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
