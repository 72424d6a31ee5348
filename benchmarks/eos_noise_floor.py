"""How far GD at the edge of stability is from itself: the noise floor of the whole-run rollout distance.

The EoS benchmarks compare a model's rollout with one GD run: ``noise = 1e-10`` per coordinate per step, noise seed 0
(``eos_hidden_fit.py``, whose fits use that run). Past the first catapult, the time of each next catapult is set by how
far the oscillation decayed and by the noise that seeds its regrowth, so GD's path depends on the noise realisation.
This benchmark measures how much, and scores the models against what a deterministic flow can predict:

- **GD against GD.** GD is run again with noise seeds ``1..K`` (the same ``nu``; the eigen-solves, which do not touch
  the iterates, only at the first and last step). Each run's smoothed iterates (midpoint process) are compared with
  the reference run's: the mean distance over the whole run and from step 0 to the end of each quarter of it, the
  median, quartiles and range over the seeds. A deterministic model cannot be expected to follow one realisation
  closer than another realisation does.
- **The oscillation's seed.** Along the top eigenvector the period-two component is one Gaussian number (the noise's
  kicks, each amplified by the linearised map), so its square is ``chi^2`` with one degree of freedom times its
  expectation, which is what the oscillation flow carries. Each run's variance 40 steps before the reference run's
  first passes 1e-3 is divided by that expectation, the linearised map ``v_{k+1} = (1 - lr lambda_k)^2 v_k + nu^2``
  along the reference run's recorded sharpness (the runs share their path until the first catapult).
- **The noise-averaged path.** The mean of the ``K`` runs' midpoint processes estimates ``E[m_k]``, the deterministic
  quantity that an effective flow predicts. Each seed's distance to the mean of the others (leave-one-out) is what a
  model as good as GD itself scores against it.
- **The models against both.** The unfitted oscillation flow of order 1, the central flow, and the fitted hybrid
  rebuilt from an ``eos_hidden_fit.py`` result file (``--hybrid``: its fitted coefficients and order) are rolled out
  from step 0 and scored against the reference run and against the noise-averaged path, each with the central flow's
  distance over it.

    python benchmarks/eos_noise_floor.py --setup large --cache DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from eos_hidden_fit import NOISE, SETUPS, distances, gd_run, roll_out
from torch import Tensor

import neuralflow as nf
from neuralflow.corrections import HiddenStateLibrary, Hybrid
from neuralflow.flows import CentralFlow, OscillationFlow
from neuralflow.oscillation import period_two
from neuralflow.provenance import write_json


def seed_runs(problem: nf.Problem, setup: dict, seeds: list[int], probe: int) -> tuple[dict[int, Tensor], dict]:
    """Smoothed GD iterates (steps 1 .. T-1) of a run per noise seed (the set-up's ``lr``, steps and ``nu``), and each
    run's period-two variance ``||d_k||^2`` at step ``probe``."""
    out, probed = {}, {}
    for seed in seeds:
        traj = nf.run_gd(problem, setup["lr"], setup["steps"], eig_every=setup["steps"], noise=NOISE, noise_seed=seed)
        out[seed] = traj.smoothed().iterates
        probed[seed] = variance_at(traj, probe)
    return out, probed


def variance_at(traj: nf.Trajectory, step: int) -> float:
    """GD's period-two variance ``||d_k||^2`` at ``step`` (the demodulation of the five iterates around it)."""
    return float(period_two(traj.iterates[step - 2 : step + 3])[0].pow(2).sum())


def linear_seed(traj: nf.Trajectory) -> tuple[int, float]:
    """Where the oscillation is probed, and its expected size there: the step 40 steps before the reference
    run's variance first passes 1e-3, and the variance the linearised map gives there from GD's recorded sharpness,
    ``v_{k+1} = (1 - lr lambda_k)^2 v_k + nu^2`` from ``v_0 = 0`` (the expectation over the noise: along the top
    eigenvector the period-two component is one Gaussian, a sum of the kicks, so its square is ``chi^2`` with one
    degree of freedom times this)."""
    osc = traj.oscillation
    large = torch.nonzero(osc.variance > 1e-3).flatten()
    if len(large) == 0:
        raise SystemExit("the reference run's oscillation never reaches a variance of 1e-3: no catapult to probe")
    probe = int(osc.steps[large[0]]) - 40
    v = 0.0
    for lam in traj.sharpness[:probe, 0].tolist():
        v = (1 - traj.lr * lam) ** 2 * v + NOISE**2
    return probe, v


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of ``values``."""
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def hybrid_from_result(path: str, problem: nf.Problem, traj: nf.Trajectory) -> tuple[Hybrid, dict]:
    """The fitted hybrid of an ``eos_hidden_fit.py`` result file (its coefficients, the flow's order); the file."""
    saved = json.loads(Path(path).read_text())
    coefficients = saved["coefficients"]
    setup = saved["setup"]
    flow = OscillationFlow.from_trajectory(problem, traj, n_track=4, order=setup["order"], lag=setup.get("lag", 0.0))
    lib = HiddenStateLibrary(problem, traj.lr, terms=list(coefficients), init=coefficients)
    return Hybrid(flow, lib), saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="small")
    ap.add_argument("--seeds", type=int, default=11, help="GD runs with noise seeds 1..K beside the reference (seed 0)")
    ap.add_argument(
        "--hybrid",
        default=None,
        help="eos_hidden_fit.py result whose fitted hybrid is scored "
        "(default: benchmarks/results/eos_hidden_fit_<setup>_noamp.json for large, _noamp_w5.json for small)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--cache", default=None, help="folder to keep the reference GD run in (reused when present)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error("--seeds: at least 2 runs are needed for quartiles and a leave-one-out mean")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = SETUPS[args.setup]
    load_start = os.getloadavg()
    hybrid_path = (
        args.hybrid
        or f"benchmarks/results/eos_hidden_fit_{args.setup}_{'noamp' if args.setup == 'large' else 'noamp_w5'}.json"
    )
    problem, traj = gd_run(setup, args.cache)
    ref = traj.smoothed()
    steps = ref.steps

    t0 = time.perf_counter()
    probe, expected = linear_seed(traj)
    runs, probed = seed_runs(problem, setup, list(range(1, args.seeds + 1)), probe)
    gd_seconds = time.perf_counter() - t0
    reference_draw = variance_at(traj, probe) / expected
    draws = [v / expected for v in probed.values()]
    stack = torch.stack(list(runs.values()))
    average, total = stack.mean(dim=0), stack.sum(dim=0)
    own = {s: distances(x, steps, ref.iterates) for s, x in runs.items()}
    others = {s: distances(x, steps, (total - x) / (len(runs) - 1)) for s, x in runs.items()}  # against the rest
    quarters = list(own[1]["mean_distance_until"])
    out: dict = {
        "setup": {
            **setup,
            "noise": NOISE,
            "seeds": args.seeds,
            "hybrid": hybrid_path,
            "load_average_start": load_start,
        },
        "gd_seconds": gd_seconds,
        "gd_vs_reference": {
            "per_seed": {str(s): d for s, d in own.items()},
            "mean_distance": spread([d["mean_distance"] for d in own.values()]),
            "mean_distance_until": {q: spread([d["mean_distance_until"][q] for d in own.values()]) for q in quarters},
        },
        "seed": {
            "step": probe,
            "linear_expectation": expected,
            "per_seed_over_expectation": {str(sd): v / expected for sd, v in probed.items()},
            "over_expectation": {**spread(draws), "mean": statistics.fmean(draws)},
            "reference_over_expectation": reference_draw,
        },
        "gd_vs_average_of_others": {
            "mean_distance": spread([d["mean_distance"] for d in others.values()]),
            "mean_distance_until": {
                q: spread([d["mean_distance_until"][q] for d in others.values()]) for q in quarters
            },
        },
    }
    floor = out["gd_vs_reference"]["mean_distance"]
    print(
        f"GD with noise seeds 1..{args.seeds} against seed 0 ({gd_seconds:.0f} s): mean distance median "
        f"{floor['median']:.4g} (quartiles {floor['q1']:.4g}-{floor['q3']:.4g}, range {floor['min']:.4g}-"
        f"{floor['max']:.4g}); against the mean of the others: median "
        f"{out['gd_vs_average_of_others']['mean_distance']['median']:.4g}"
    )

    draw = out["seed"]["over_expectation"]
    print(
        f"the oscillation at step {probe} over the linearised map's expectation {expected:.3g}: seed 0 "
        f"{reference_draw:.3g}; seeds 1..{args.seeds} median {draw['median']:.3g} (chi^2 with one degree of freedom: "
        f"0.455), mean {draw['mean']:.3g}, range {draw['min']:.3g}-{draw['max']:.3g}"
    )

    hybrid, saved = hybrid_from_result(hybrid_path, problem, traj)
    models = {
        "order1": lambda: Hybrid(OscillationFlow.from_trajectory(problem, traj, n_track=4, order=1), None),
        "central": lambda: CentralFlow(problem, traj.lr),
        "hybrid": lambda: hybrid,
    }
    out["models"] = {}
    for name, build in models.items():
        t0 = time.perf_counter()
        try:
            states = roll_out(build(), traj)[steps - traj.steps[0]]
        except nf.DivergenceError as exc:
            out["models"][name] = {"diverged": str(exc), "seconds": time.perf_counter() - t0}
            print(f"{name:8s}: diverged ({exc})")
            continue
        out["models"][name] = {
            "vs_reference": distances(states, steps, ref.iterates),
            "vs_average": distances(states, steps, average),
            "seconds": time.perf_counter() - t0,
        }
    fitted = saved.get("rollout", {}).get("hybrid", {}).get("mean_distance")
    out["models"]["hybrid"]["fit_file_mean_distance"] = fitted
    central = out["models"]["central"]
    for name, r in out["models"].items():
        if "diverged" in r:
            continue
        for against in ("vs_reference", "vs_average"):
            if "diverged" not in central:
                r[against]["central_over_model"] = central[against]["mean_distance"] / r[against]["mean_distance"]
        ratio = {a: r[a].get("central_over_model", math.nan) for a in ("vs_reference", "vs_average")}
        print(
            f"{name:8s}: against seed 0 {r['vs_reference']['mean_distance']:.4g} "
            f"(central/model {ratio['vs_reference']:.2f}x), against the noise average "
            f"{r['vs_average']['mean_distance']:.4g} ({ratio['vs_average']:.2f}x); "
            f"until {', '.join(f'{q} {d:.4g}' for q, d in r['vs_average']['mean_distance_until'].items())} "
            f"({r['seconds']:.0f} s)"
        )
    if fitted is not None and "diverged" not in out["models"]["hybrid"]:
        print(
            f"the rebuilt hybrid against seed 0: {out['models']['hybrid']['vs_reference']['mean_distance']:.6g}; "
            f"its fit's own rollout: {fitted:.6g}"
        )
    out["load_average_end"] = os.getloadavg()
    path = Path(args.out or f"benchmarks/results/eos_noise_floor_{args.setup}.json")
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
