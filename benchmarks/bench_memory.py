"""Memory of a GD recording at scale: a 1e6-parameter problem, iterates kept every ``store_every`` steps.

The problem is ``from_function``: ``L(theta) = 1/2 sum_i a_i theta_i^2 + 1/4 sum_i theta_i^4 / d`` over
``d = 10^6`` parameters (a loss whose gradient costs a few passes over the vector, so memory, not compute,
is what the benchmark sees), GD with ``lr = 0.1`` for ``--steps`` steps, sharpness by LOBPCG every
``--eig-every`` steps. Each setting runs in a fresh process; the figure is the peak resident memory
during ``run_gd`` minus the resident memory just before it. Expected: ``8 d`` bytes per stored iterate
(float64) plus a constant; the scalar series (loss, sharpness, ...) at every step are negligible.

Plain script: prints a table and writes JSON (default benchmarks/results/memory.json).

    python benchmarks/bench_memory.py [--dim 1000000] [--steps 50] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from neuralflow.provenance import write_json


def _worker(dim: int, steps: int, store_every: int, eig_every: int, queue) -> None:
    torch.set_num_threads(1)
    import neuralflow as nf

    a = torch.linspace(0.1, 10.0, dim, dtype=torch.float64)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (a * theta**2).sum() + 0.25 * (theta**4).sum() / dim

    problem = nf.problems.from_function(loss, torch.ones(dim, dtype=torch.float64), name="wide-quartic")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = (
        int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1024
        if Path("/proc/self/statm").exists()
        else before
    )
    t0 = time.perf_counter()
    traj = nf.run_gd(problem, 0.1, steps, eig_every=eig_every, store_every=store_every, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "dim": dim,
            "steps": steps,
            "store_every": store_every,
            "eig_every": eig_every,
            "stored": len(traj),
            "peak_mb": (peak - max(before, rss_now)) / 1024,
            "stored_mb": traj.iterates.numel() * 8 / 2**20,
            "seconds": seconds,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eig-every", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for store_every in (1, 10, args.steps):
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(args.dim, args.steps, store_every, args.eig_every, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(
        f"run_gd memory, d = {args.dim:.3g} parameters (float64), {args.steps} steps, sharpness every "
        f"{args.eig_every} steps"
    )
    print(f"{'store_every':>12}{'stored':>8}{'iterates MB':>13}{'peak MB':>10}{'peak / stored':>15}{'s':>7}")
    for r in rows:
        ratio = r["peak_mb"] / r["stored_mb"] if r["stored_mb"] else float("nan")
        print(
            f"{r['store_every']:>12}{r['stored']:>8}{r['stored_mb']:>13.1f}{r['peak_mb']:>10.1f}{ratio:>15.2f}"
            f"{r['seconds']:>7.1f}"
        )
    per_iterate = (rows[0]["peak_mb"] - rows[-1]["peak_mb"]) / (rows[0]["stored"] - rows[-1]["stored"])
    print(f"marginal cost of one stored iterate: {per_iterate:.2f} MB (8 d bytes = {8 * args.dim / 2**20:.2f} MB)")
    out = write_json(
        args.out, {"rows": rows, "marginal_mb_per_stored_iterate": per_iterate}, dtype=torch.float64, indent=1
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
