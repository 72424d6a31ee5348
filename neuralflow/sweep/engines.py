"""Where a sweep's tasks run: the :class:`Engine` interface, a local process pool and a Ray cluster
(:data:`ENGINES`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from ..errors import EngineError
from ..problems import check_positive_int


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
        check_positive_int(workers, "sweep: workers")
        self.workers, self.threads, self.retries = workers, threads, retries

    def _pool(self, n: int) -> ProcessPoolExecutor:
        ctx: mp.context.BaseContext
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            # imported once in the fork server instead of once per worker (torch, the pipeline, the digits' loader)
            ctx.set_forkserver_preload(["neuralflow", "neuralflow.sweep", "sklearn.datasets"])
        else:
            ctx = mp.get_context("spawn")
        return ProcessPoolExecutor(
            min(self.workers, n), mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)
        )

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

    def __init__(
        self,
        address: str | None = None,
        cpus_per_task: int = 1,
        retries: int = 3,
        gpu: Callable[[Any], bool] = lambda item: False,
    ) -> None:
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
                hint = (
                    " ray.init() joins the cluster named by RAY_ADDRESS or left behind by an earlier Ray; if that "
                    "one is gone, `ray stop` clears it, or pass address='local' to start a fresh local Ray."
                    if address is None
                    else ""
                )
                raise EngineError(
                    f"sweep: could not connect to Ray at {address!r} ({err}).{hint} Nothing was run."
                ) from None

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        remote = self.ray.remote(fn)
        refs = {
            remote.options(
                num_cpus=self.cpus,
                num_gpus=1 if self.gpu(item) else 0,
                max_retries=self.retries,
                retry_exceptions=False,
            ).remote(item): i
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
                    raise EngineError(
                        f"sweep: a Ray task failed beyond its {self.retries} retries ({err}); the "
                        "finished runs are saved, run the sweep again to resume."
                    ) from None
                yield refs[ref], result

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


ENGINES: dict[str, type[Engine]] = {"local": LocalEngine, "ray": RayEngine}
"""Registered engines by name (the docstring of neuralflow.sweep says how to add one)."""
