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

from .configs import config_key, grid, normalise
from .driver import sweep
from .engines import ENGINES, Engine, LocalEngine, RayEngine
from .figures import coefficient_figure, law_figure
from .folder import SWEEP_FORMAT as SWEEP_FORMAT
from .task import TIMING_COLUMNS, run_task

__all__ = [
    "sweep",
    "grid",
    "normalise",
    "config_key",
    "run_task",
    "law_figure",
    "coefficient_figure",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "ENGINES",
    "TIMING_COLUMNS",
]
