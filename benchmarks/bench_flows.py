"""Benchmark the physics flows on the digits MLP (Cohen et al., ICLR 2021 and ICLR 2025).

1. Cost of one ``forward`` of each flow in gradient-equivalents (median wall time of a forward
   divided by the median wall time of one full-batch gradient), at an iterate inside the edge of
   stability so that the central flow has critical eigenvalues.
2. The central flow against GD on the EoS run: distance to the smoothed GD iterates (midpoint
   process) averaged over steps 1..steps-1, against gradient flow's; its sharpness after the EoS
   onset; its predicted time-averaged loss against GD's loss averaged over +-10 steps; wall time
   per GD step of simulating it (explicit Euler, 2 substeps per step).

Prints a table and writes ``benchmarks/results/flows.json`` (``--out``). Timings are medians on
whatever machine runs it; on a shared machine they vary with the load. Usage::

    python benchmarks/bench_flows.py                       # n=1000, widths 64 64, lr=0.1, 2000 steps
    python benchmarks/bench_flows.py --n 500 --widths 32 32 --lr 0.15 --steps 800
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow.autodiff import gradient
from neuralflow.compare import compare
from neuralflow.flows import CentralFlow, GradientFlow, ModifiedFlow, PrincipalFlow
from neuralflow.provenance import write_json


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 64])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gf-step", type=float, default=0.5, help="rk4 step of the gradient-flow reference")
    ap.add_argument("--cost-only", action="store_true", help="only part 1 (forward costs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flows.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = nf.problems.mlp_digits(n=args.n, widths=tuple(args.widths))
    lr = args.lr
    result: dict = {
        "problem": problem.description,
        "dim": problem.dim,
        "lr": lr,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }

    start = time.perf_counter()
    traj = nf.run_gd(problem, lr, args.steps, eig_every=10, n_eigs=4, progress=True)
    result["gd_seconds"] = time.perf_counter() - start
    onset = traj.eos_onset
    result["eos_onset"] = onset
    print(f"GD: {args.steps} steps in {result['gd_seconds']:.1f} s, EoS onset at step {onset}")

    # 1. forward cost in gradient-equivalents, at an iterate inside EoS (or the last one).
    k = min(args.steps, (onset or args.steps) + 200)
    theta = traj.iterates[k]
    t0 = torch.zeros((), dtype=theta.dtype)
    grad_s = median_seconds(lambda: gradient(problem, theta), args.repeats)
    central = CentralFlow(problem, lr)
    central.solve(traj.iterates[max(0, (onset or k) - 300)])  # a start below 2/lr, then warm starts
    flows = {
        "gradient": GradientFlow(problem, lr),
        "modified1": ModifiedFlow(problem, lr, order=1),
        "modified2": ModifiedFlow(problem, lr, order=2),
        "principal(k=4)": PrincipalFlow(problem, lr, k=4, eig_tol=1e-3),
        "central": central,
    }
    cost = {}
    for name, flow in flows.items():
        flow(t0, theta)  # warm start
        cost[name] = median_seconds(lambda f=flow: f(t0, theta), args.repeats) / grad_s
    result["gradient_seconds"] = grad_s
    result["forward_gradient_equivalents"] = cost
    result["cost_state_step"] = k
    result["central_n_critical_at_cost_state"] = central.last.n_critical

    print(
        f"\nforward cost at step {k} (gradient-equivalents; gradient = {1e3 * grad_s:.1f} ms, median of "
        f"{args.repeats}; central flow with {central.last.n_critical} critical eigenvalues)"
    )
    for name, c in cost.items():
        print(f"  {name:16s} {c:8.2f}")
    if args.cost_only:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
        return

    # 2. central flow vs gradient flow against GD.
    gf = GradientFlow(problem, lr)
    gf.solver = {"method": "rk4", "options": {"step_size": args.gf_step}}  # stable while lr lambda step < 2.78
    central = CentralFlow(problem, lr)
    cmp = compare(traj, gf, central, problem=problem, n_probe=100, progress=True)
    print(cmp)
    rows = {r["flow"]: r for r in cmp.rows}
    rec = {r.name: r for r in cmp.records}["central"]
    probe_steps = traj.steps[rec.probe]
    after = probe_steps >= (onset if onset is not None else args.steps + 1)
    dev = ((rec.sharpness[after] - 2 / lr).abs() / (2 / lr)) if bool(after.any()) else torch.zeros(1)
    result["comparison"] = cmp.to_dict()
    result["central"] = {
        "distance_smoothed": rows["central"]["distance_smoothed"],
        "gradient_distance_smoothed": rows["gradient"]["distance_smoothed"],
        "ratio": rows["gradient"]["distance_smoothed"] / rows["central"]["distance_smoothed"],
        "avg_loss_error": rows["central"]["avg_loss_error"],
        "gradient_avg_loss_error": rows["gradient"]["avg_loss_error"],
        "sharpness_max_rel_deviation_after_onset": float(dev.max()),
        "sharpness_median_rel_deviation_after_onset": float(dev.median()),
        "n_critical_max": central.n_critical_max,
        "seconds_per_gd_step": rows["central"]["seconds"] / args.steps,
    }
    fig = cmp.figure()
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)

    c = result["central"]
    print("\ncentral flow on the EoS run")
    for key, value in c.items():
        print(f"  {key:42s} {value:.4g}")
    write_json(args.out, result)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
