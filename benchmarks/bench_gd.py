"""Cost of tracking sharpness during GD on mlp_digits (issue: foundation).

Runs GD (n = 1000, widths (64, 64), lr = 0.1) into the edge of stability, then, over the next
``--steps`` GD steps, measures one sharpness update per step three ways, all to the same relative
residual tolerance ``||H u - S u|| <= tol * S``:

* warm-started LOBPCG (neuralflow's default: the previous step's vector starts the solve);
* cold-started LOBPCG (a random start every step);
* cold-started Lanczos (scipy's ``eigsh``, ``which="LA"``, on the same Hessian-vector products).

Costs are quoted in gradient-equivalents: the wall time of the update divided by the wall time
of one full-batch gradient, both measured interleaved in the same loop (the machine is shared,
so ratios are more stable than seconds); medians over the steps. Also reports GD steps per
second with ``eig_every=1``. Prints a table and writes ``results/gd.json``.

    python benchmarks/bench_gd.py [--steps 60] [--start 1500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

import neuralflow as nf
from neuralflow.autodiff import Curvature, top_eigenpairs, value_and_gradient
from neuralflow.provenance import write_json


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def lanczos(problem, theta, tol):
    curv = Curvature(problem, theta)
    op = LinearOperator(
        (problem.dim, problem.dim),
        matvec=lambda v: curv.hvp(torch.as_tensor(np.ravel(v), dtype=theta.dtype)).numpy(),
        dtype=np.float64,
    )
    vals = eigsh(op, k=1, which="LA", tol=tol, return_eigenvectors=False)
    return float(vals[0]), curv.n_hvp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=1500, help="GD steps before measuring (past EoS onset)")
    ap.add_argument("--steps", type=int, default=60, help="GD steps measured")
    ap.add_argument("--tol", type=float, default=5e-3, help="relative residual tolerance (run_gd's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gd.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    problem = nf.problems.mlp_digits(n=1000, widths=(64, 64), seed=0)
    lr = 0.1
    warmup = nf.run_gd(problem, lr, args.start, eig_every=0, store_every=args.start, progress=False)
    theta = warmup.iterates[-1].clone()

    rows: dict[str, list[float]] = {k: [] for k in ("grad", "warm", "cold", "lanczos")}
    hvps: dict[str, list[int]] = {k: [] for k in ("warm", "cold", "lanczos")}
    sharp: dict[str, list[float]] = {k: [] for k in ("warm", "cold", "lanczos")}
    block = top_eigenpairs(problem, theta, k=1, tol=args.tol).block
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        (_, g), t_grad = timed(value_and_gradient, problem, theta)
        rows["grad"].append(t_grad)
        warm, t = timed(top_eigenpairs, problem, theta, k=1, v0=block, tol=args.tol)
        rows["warm"].append(t)
        hvps["warm"].append(warm.n_hvp)
        sharp["warm"].append(float(warm.values[0]))
        block = warm.block
        cold, t = timed(top_eigenpairs, problem, theta, k=1, tol=args.tol, generator=gen)
        rows["cold"].append(t)
        hvps["cold"].append(cold.n_hvp)
        sharp["cold"].append(float(cold.values[0]))
        (s, n), t = timed(lanczos, problem, theta, args.tol)
        rows["lanczos"].append(t)
        hvps["lanczos"].append(n)
        sharp["lanczos"].append(s)
        theta = theta - lr * g

    grad = statistics.median(rows["grad"])
    result = {
        "problem": problem.description,
        "lr": lr,
        "start_step": args.start,
        "steps_measured": args.steps,
        "tol": args.tol,
        "gradient_seconds_median": grad,
        "methods": {},
    }
    print(
        f"mlp_digits d={problem.dim}, steps {args.start}..{args.start + args.steps} (past EoS onset), "
        f"tol {args.tol:g}; one gradient = {grad * 1e3:.1f} ms (median)"
    )
    print(f"{'sharpness update':<22}{'grad-equiv (median)':>20}{'HVPs (mean)':>13}{'median S':>10}")
    labels = {"warm": "LOBPCG warm start", "cold": "LOBPCG cold start", "lanczos": "Lanczos cold start"}
    for name, label in labels.items():
        ratio = statistics.median(t / g for t, g in zip(rows[name], rows["grad"], strict=True))
        result["methods"][name] = {
            "gradient_equivalents_median": ratio,
            "hvp_mean": float(np.mean(hvps[name])),
            "sharpness_median": statistics.median(sharp[name]),
        }
        print(f"{label:<22}{ratio:>20.1f}{np.mean(hvps[name]):>13.1f}{statistics.median(sharp[name]):>10.4f}")
    cost = {name: m["gradient_equivalents_median"] for name, m in result["methods"].items()}
    result["speedup_vs_lanczos"] = cost["lanczos"] / cost["warm"]
    result["speedup_vs_cold_lobpcg"] = cost["cold"] / cost["warm"]
    print(
        f"warm start is {result['speedup_vs_lanczos']:.1f}x cheaper than cold Lanczos, "
        f"{result['speedup_vs_cold_lobpcg']:.1f}x cheaper than cold LOBPCG"
    )

    _, t_run = timed(nf.run_gd, problem, lr, 200, eig_every=1, theta0=theta, progress=False)
    _, t_plain = timed(nf.run_gd, problem, lr, 200, eig_every=0, theta0=theta, progress=False)
    result["gd_steps_per_second_eig_every_1"] = 200 / t_run
    result["gd_steps_per_second_no_eigs"] = 200 / t_plain
    print(f"GD steps/s at EoS: {200 / t_run:.1f} with eig_every=1, {200 / t_plain:.1f} without sharpness")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
