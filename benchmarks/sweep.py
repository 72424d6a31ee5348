"""Benchmark of nf.sweep: the 12-run edge-of-stability sweep serial against 2 workers (and on a local Ray).

The sweep: ``mlp_digits`` (n 500, widths (32, 32)), lr in {0.05, 0.1, 0.15, 0.2} x seeds {0, 1, 2}, 700 GD
steps with the sharpness at every step. It runs in fresh results folders, first serially (``workers=1``,
in this process), then on the local engine with 2 worker processes (one torch thread each, start-up
included), then, if Ray is installed and ``--no-ray`` is not given, on a local Ray with 2 CPUs. Reports wall
times, the speed-up, whether the tables agree (all columns but the timings), and the edge-of-stability law
(EoS onset and plateau / (2/lr) against lr, figure ``sweep_law.png``). The target: at least 1.7x with 2
workers on 2 idle cores.

Plain script: prints a table and writes JSON (default benchmarks/results/sweep.json).

    python benchmarks/sweep.py [--steps 700] [--no-ray] [--out benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from neuralflow.provenance import write_json
from neuralflow.sweep import TIMING_COLUMNS, grid, law_figure, sweep


def configs(steps: int) -> list[dict]:
    base = {"problem": {"name": "mlp-digits", "n": 500, "widths": [32, 32]}, "steps": steps, "eig_every": 1}
    return grid(base, {"lr": [0.05, 0.1, 0.15, 0.2], "problem.seed": [0, 1, 2]})


def timed(folder: Path, steps: int, **engine) -> tuple[float, object]:
    t0 = time.perf_counter()
    table = sweep(configs(steps), out=folder, progress=False, **engine)
    return time.perf_counter() - t0, table


def same(a, b) -> bool:
    drop = [c for c in TIMING_COLUMNS if c in a]
    return bool(a.drop(columns=drop).equals(b.drop(columns=drop)))


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        serial_s, serial = timed(Path(tmp) / "serial", args.steps, workers=1)
        results["serial"] = {"seconds": serial_s, "run_median": float(serial["wall_s"].median())}
        pool_s, pool = timed(Path(tmp) / "pool", args.steps, workers=2)
        results["local, 2 workers"] = {
            "seconds": pool_s,
            "speedup": serial_s / pool_s,
            "same_table": same(serial, pool),
            "run_median": float(pool["wall_s"].median()),
        }
        if args.ray:
            try:
                import ray
            except ImportError:
                print("Ray is not installed: no Ray measurement (pip install -e '.[cluster]')")
            else:
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
                try:
                    ray_s, on_ray = timed(Path(tmp) / "ray", args.steps, engine="ray")
                finally:
                    ray.shutdown()
                results["ray, 2 CPUs"] = {
                    "seconds": ray_s,
                    "speedup": serial_s / ray_s,
                    "same_table": same(serial, on_ray),
                    "run_median": float(on_ray["wall_s"].median()),
                }
    print(
        f"sweep of {len(serial)} runs: mlp_digits n 500 widths (32, 32), lr x seed, {args.steps} steps, sharpness "
        "every step"
    )
    # a run's median wall time shows contention: on 2 idle cores it is the same serial and with 2 workers
    print(f"{'engine':<20}{'wall s':>9}{'speed-up':>10}{'same table':>12}{'run median s':>14}")
    for name, r in results.items():
        print(
            f"{name:<20}{r['seconds']:>9.1f}{r.get('speedup', 1.0):>10.2f}{str(r.get('same_table', '-')):>12}"
            f"{r['run_median']:>14.2f}"
        )
    per_run = serial["wall_s"]
    law = serial.groupby("lr")[["eos_onset", "plateau_ratio", "quiet_steps"]].agg(["mean", "std"])
    print("edge-of-stability law (mean, std over seeds):")
    print(law.to_string())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    law_figure(serial).savefig(out.with_name("sweep_law.png"), dpi=120)
    serial.to_csv(out.with_name("sweep_table.csv"), index=False)
    write_json(
        out,
        {
            "runs": len(serial),
            "steps": args.steps,
            "engines": results,
            "per_run_seconds": {
                "median": float(per_run.median()),
                "min": float(per_run.min()),
                "max": float(per_run.max()),
            },
            "law": {
                str(lr): {
                    "eos_onset": float(g["eos_onset"].mean()),
                    "plateau_ratio": float(g["plateau_ratio"].mean()),
                    "plateau_ratio_std": float(g["plateau_ratio"].std()),
                }
                for lr, g in serial.groupby("lr")
            },
        },
        indent=1,
    )
    print(f"wrote {out}, {out.with_name('sweep_law.png')}, {out.with_name('sweep_table.csv')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray measurement")
    parser.add_argument("--out", default="benchmarks/results/sweep.json")
    main(parser.parse_args())
