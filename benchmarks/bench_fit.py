"""Benchmark of the fit: time to recover the modified equation, and adjoint vs direct memory.

1. Recovery: exact GD data of a tanh net (5 inputs, 8 hidden, 50 examples, sin target; 57 parameters),
   lr = 0.02, 500 steps, recorded every step and every 10 steps; GradientFlow + [Hg, H2g, D3gg],
   windows of 50 steps. Reports the derivative-regression baseline and the ODE fit (Gauss-Newton),
   their coefficients against theory (-1/2, -1/3, -1/12), wall time and right-hand-side evaluations.
2. Memory: peak resident memory of one loss-and-gradient evaluation with the adjoint method and with
   backpropagation through the solver, as the window grows 1x, 4x, 16x. Each measurement runs in a
   fresh process (peak RSS minus the RSS just before the evaluation).

Plain script: prints a table and writes JSON (default benchmarks/results/fit.json).

    python benchmarks/bench_fit.py [--threads 1] [--base-window 10] [--out benchmarks/results/fit.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow.corrections import Hybrid, TermLibrary
from neuralflow.fit import fit_loss
from neuralflow.flows import GradientFlow
from neuralflow.provenance import write_json

THEORY = {"Hg": -1 / 2, "H2g": -1 / 3, "D3gg": -1 / 12}
LR = 0.02


def tanh_net() -> nf.Problem:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(50, 5, dtype=torch.float64)
    return nf.problems.from_module(net, x, torch.sin(x.sum(1, keepdim=True)))


def model(problem: nf.Problem) -> Hybrid:
    return Hybrid(GradientFlow(problem, LR), TermLibrary(problem, LR, list(THEORY)))


def every(traj: nf.Trajectory, k: int) -> nf.Trajectory:
    keep = slice(None, None, k)
    return replace(
        traj,
        steps=traj.steps[keep],
        iterates=traj.iterates[keep],
        loss=traj.loss[keep],
        grad_norm=traj.grad_norm[keep],
        sharpness=traj.sharpness[keep],
        update_u=traj.update_u[keep],
    )


def recovery() -> list[dict]:
    problem = tanh_net()
    traj = nf.run_gd(problem, LR, 500, eig_every=100, progress=False)
    rows = []
    for label, data in (("every step", traj), ("every 10 steps", every(traj, 10))):
        for method in ("regression", "adjoint"):
            t0 = time.perf_counter()
            res = nf.fit(model(problem), data, window=50, method=method, progress=False)
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "data": label,
                    "method": method if method == "regression" else "ode fit (gauss-newton)",
                    "coefficients": res.coefficients,
                    "uncertainty": res.uncertainty,
                    "relative_error": {k: abs(res.coefficients[k] - v) / abs(v) for k, v in THEORY.items()},
                    "iterations": len(res.history) - 1,
                    "n_function_evals": res.n_function_evals,
                    "seconds": wall,
                    "physics_error": res.physics_error,
                    "hybrid_error": res.hybrid_error,
                }
            )
    return rows


def _memory_worker(window: int, method: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    problem = tanh_net()
    traj = nf.run_gd(problem, LR, 2 * window, eig_every=0, progress=False)
    m = model(problem)
    with torch.no_grad():
        for k, v in THEORY.items():
            m.correction.constants[k].fill_(v)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fit_loss(m, traj, window=window, method=method, val_fraction=0.0, step_size=1.0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"window": window, "method": method, "peak_mb": (peak - before) / 1024, "seconds": seconds})


def memory(base_window: int, threads: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for factor in (1, 4, 16):
        for method in ("adjoint", "direct"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_worker, args=(base_window * factor, method, threads, queue))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append({**row, "factor": factor})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-window", type=int, default=10)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/fit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rec = recovery()
    print("recovery of the modified equation (57-parameter tanh net, lr = 0.02, 500 steps, windows of 50 steps)")
    print(f"{'data':<16}{'method':<24}{'Hg':>9}{'H2g':>9}{'D3gg':>9}{'max err':>9}{'iters':>6}{'evals':>7}{'s':>7}")
    for r in rec:
        c = r["coefficients"]
        print(
            f"{r['data']:<16}{r['method']:<24}{c['Hg']:>9.4f}{c['H2g']:>9.4f}{c['D3gg']:>9.4f}"
            f"{max(r['relative_error'].values()):>9.1%}{r['iterations']:>6}{r['n_function_evals']:>7}"
            f"{r['seconds']:>7.1f}"
        )
    mem = [] if args.skip_memory else memory(args.base_window, args.threads)
    if mem:
        print("\npeak memory of one loss + gradient evaluation (2 windows, RK4 step 1)")
        print(f"{'window':>8}{'factor':>8}{'method':>10}{'peak MB':>10}{'s':>8}")
        for r in mem:
            print(f"{r['window']:>8}{r['factor']:>8}{r['method']:>10}{r['peak_mb']:>10.1f}{r['seconds']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"threads": args.threads, "recovery": rec, "memory": mem})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
