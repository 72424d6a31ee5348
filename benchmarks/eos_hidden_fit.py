"""The hidden-state fit at the edge of stability: the oscillation flow's coefficients recovered by the adjoint.

GD on the digits MLP (``mlp_digits``, seed 0, tanh) with injected Gaussian noise ``nu = 1e-10`` per coordinate per
step (``run_gd(..., noise=1e-10, noise_seed=0)``, its oscillation measured along 4 tracked eigenvectors). The model
is ``Hybrid(OscillationFlow.from_trajectory(..., order=1), HiddenStateLibrary(floquet, drift, floor, amplitude))``
(``--order``: the flow with GD's first-order backward-error term off the tracked directions; 0 is the
continuous-time flow; ``--terms`` chooses the library) started away from the physics (floquet 1 against 2, drift 1
against 1/2, floor 10 q against q = nu^2 + round-off, amplitude 0), fitted by multiple shooting on the smoothed
iterates (midpoint process) from the EoS onset on (``--first``), windows of 5 steps every 15 (``--window``,
``--stride``), each window starting from GD's measured oscillation, solved by explicit Euler with half-step
substeps, Gauss-Newton with finite differences, the loss with the measured variance in log scale
(``--variance-weight``). Reported: the fitted coefficients against theory (growth
2, drift coupling 1/2, floor nu^2), the wall time with the thread count and the machine's load average, the fit's
report (each term's share of the gap over all windows, the fitted equations), and rollouts from step 0 to the end
(``--rollouts``: no divergence; mean distance to smoothed GD over the whole run and from step 0 to the end of each
quarter of it) of the fitted hybrid beside the unfitted oscillation flows of order 0 and 1 and the central flow
(``--no-fit``: the unfitted ones alone).

Why this set-up (measured, README "The digits fit at the edge of stability"): the growth and the floor act on
``theta`` only through the oscillation's size, which is negligible in the quiet stretch, so ``theta`` alone
identifies them only in the oscillating windows, where linear Floquet growth is wrong (nothing saturates it) and
the fit bends the growth coefficient to stand in for the missing saturation. The amplitude-dependent rate
(``amplitude``, ``s^2``) is that saturation; the variance part with weight 1 reads the growth from the quiet
stretch's measured variance (a factor 300 over the window at steps 320-340) and the floor from the windows at the
onset, where the variance sits at its equilibrium ``q / (2 |r|)``. Windows end before ``--last`` (step 600 on the
small set-up): the oscillating regime after it has several critical directions, and fitted there the drift
coupling went to 0.91 over steps 200-1000 (before the floor in log scale), at twice the cost. Why windows of 5
steps: GD's own drift coupling, read step by step from its iterates, is 0.500 on both runs
(``benchmarks/eos_gd_couplings.py``), but over a window the model's variance parts from GD's (what linear Floquet
growth leaves out: the catapult's saturation) and the drift coupling absorbs it the more, the longer the window
(n 500, floquet, drift and floor fitted: 0.67 over 40 steps, 0.61 over 20, 0.53 over 10, 0.46 over 5; README).

The couplings' lag (the term ``lag``, GD's half step less the Euler substep's own: 1/4) sets a catapult's depth and
shows only across one: ``--catapults BEFORE`` replaces the regular windows by one window starting ``BEFORE`` steps
ahead of each of GD's catapults (the peaks of its measured variance) in ``[--first, --last)``, e.g. ``--catapults 20
--window 35 --terms lag,amplitude --val-fraction 0`` on oscillation-flow physics.

    python benchmarks/eos_hidden_fit.py --setup small [--threads 1] [--cache DIR]
    python benchmarks/eos_hidden_fit.py --setup large --no-fit --rollouts order1,central
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor

import neuralflow as nf
from neuralflow.corrections import HiddenStateLibrary, Hybrid, lag_theory
from neuralflow.flows import CentralFlow, OscillationFlow, simulate
from neuralflow.provenance import write_json
from neuralflow.solvers import Solver

SETUPS = {
    "small": {"n": 500, "widths": (32, 32), "lr": 0.15, "steps": 1000, "first": 200, "last": 600},
    "large": {"n": 1000, "widths": (64, 64), "lr": 0.1, "steps": 2000, "first": 650, "last": 1400},
}
NOISE = 1e-10
STEP = 0.5  # Euler substep (steps): explicit Euler with a unit step is GD itself, unstable past 2/lr
THEORY = {"floquet": 2.0, "drift": 0.5, "lag": lag_theory(Solver("euler", STEP))}


def gd_run(setup: dict, cache: str | None) -> tuple[nf.Problem, nf.Trajectory]:
    """The set-up's problem and GD run (kept in, and reused from, the folder ``cache`` where one is given)."""
    problem = nf.problems.mlp_digits(n=setup["n"], widths=setup["widths"], seed=0)
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
    path = None if cache is None else Path(cache) / f"gd_{setup['n']}_{setup['lr']}_{NOISE:g}.nft"
    if path is not None and path.exists():
        return problem, nf.Trajectory.load(path)
    traj = nf.run_gd(problem, setup["lr"], setup["steps"], n_eigs=4, noise=NOISE, noise_seed=0, progress=False)
    if path is not None:
        traj.save(path)
    return problem, traj


def catapult_windows(traj: nf.Trajectory, before: int, window: int, first: int, last: int) -> list:
    """``nf.fit``'s ``exclude`` that keeps, of windows at every step, exactly those starting ``before`` steps ahead of
    GD's catapults in ``[first, last)``: the peaks of its measured oscillation variance (local maxima over 8 steps
    either side, above a tenth of the run's largest). A catapult closer than ``window + 7`` steps to the last kept
    window's start is skipped (their windows would overlap and let every window between them through)."""
    if traj.store_every != 1:
        raise SystemExit("--catapults needs a run recorded at every step")
    reach = 3  # the fit drops a window that comes within 3 steps of an excluded range
    var = traj.oscillation.variance
    top = float(var[torch.isfinite(var)].max())
    starts: list[int] = []
    for k in range(8, len(var) - 8):
        near = var[k - 8 : k + 9]
        peak = float(var[k]) > 0.1 * top and float(var[k]) >= float(near[torch.isfinite(near)].max())
        start = int(traj.steps[k]) - before
        apart = not starts or start - starts[-1] > window + 2 * reach + 1
        if peak and first <= start and int(traj.steps[k]) < last and apart:
            starts.append(start)
    if not starts:
        raise SystemExit(f"no catapult of GD between steps {first} and {last}")
    ends = [None] + [s + window + reach + 1 for s in starts]
    return [(lo, hi) for lo, hi in zip(ends, [s - reach for s in starts] + [None], strict=True)]


def roll_out(flow: torch.nn.Module, traj: nf.Trajectory) -> Tensor:
    """The model's states from GD's first iterate at every step of the run (raises :class:`nf.DivergenceError`)."""
    t = traj.steps.to(torch.float64)
    if flow.extra_state is None:
        return simulate(flow, traj.iterates[0], t, solver="euler", step_size=STEP)
    flow.flow.reset()
    extra0 = flow.initial_extra(traj.iterates[0], traj)
    return simulate(flow, traj.iterates[0], t, solver="euler", step_size=STEP, extra0=extra0, reset=False)


def distances(states: Tensor, steps: Tensor, reference: Tensor) -> dict:
    """Mean and final distance of ``states`` (at ``steps``) to ``reference`` (the same steps), and the mean from step
    0 to the end of each quarter of the run: how the distance builds up with the catapult cycles."""
    dist = (states - reference).norm(dim=1)
    last = int(steps[-1]) + 1  # the midpoint process lacks the run's last step
    return {
        "mean_distance": float(dist.mean()),
        "final_distance": float(dist[-1]),
        "mean_distance_until": {
            str(end): float(dist[steps <= end].mean()) for end in (last // 4, last // 2, 3 * last // 4, last)
        },
    }


def rollout(flow: torch.nn.Module, problem: nf.Problem, traj: nf.Trajectory, smoothed: nf.Trajectory) -> dict:
    """The model from GD's first iterate over the whole run (:func:`roll_out`), its :func:`distances` to smoothed GD,
    seconds."""
    t0 = time.perf_counter()
    try:
        states = roll_out(flow, traj)
    except nf.DivergenceError as exc:
        return {"diverged": str(exc), "seconds": time.perf_counter() - t0}
    near = distances(states[smoothed.steps - traj.steps[0]], smoothed.steps, smoothed.iterates)
    return {"diverged": None, **near, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="small")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--stride", type=int, default=15)
    ap.add_argument("--first", type=int, default=None, help="first step of the fitted windows (default per setup)")
    ap.add_argument("--last", type=int, default=None, help="no fitted window reaches this step (default per setup)")
    ap.add_argument("--variance-weight", type=float, default=1.0)
    ap.add_argument(
        "--order", type=int, default=1, help="OscillationFlow's backward-error order off the tracked directions (0, 1)"
    )
    ap.add_argument(
        "--lag",
        type=float,
        default=0.0,
        help="OscillationFlow's lag of the couplings in steps (GD's is 1/2; Euler half steps carry 1/4 of it)",
    )
    ap.add_argument(
        "--catapults",
        type=int,
        default=None,
        metavar="BEFORE",
        help="instead of windows every --stride steps: one window starting BEFORE steps ahead of each of GD's "
        "catapults (peaks of its measured oscillation variance) from --first to --last, so that each spans one",
    )
    ap.add_argument("--terms", default="floquet,drift,floor,amplitude", help="hidden-state terms, comma-separated")
    ap.add_argument(
        "--start",
        choices=("away", "physics"),
        default="away",
        help="start floquet, drift and floor away from the physics (1, 1, 10 q) or at it",
    )
    ap.add_argument("--optimizer", default="gauss-newton")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="share of windows held out (0: none)")
    ap.add_argument("--max-iters", type=int, default=6)
    ap.add_argument(
        "--rollouts",
        default="hybrid,order0,order1,central",
        help="models rolled out over the whole run, comma-separated (empty: none): the fitted hybrid, the unfitted "
        "oscillation flow of order 0 and 1, the central flow",
    )
    ap.add_argument(
        "--no-fit",
        dest="fit",
        action="store_false",
        help="skip the fit and its report: roll out the unfitted models (to eos_hidden_fit_<setup>_unfitted.json)",
    )
    ap.add_argument("--cache", default=None, help="folder to keep the GD run in (reused when present)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    chosen = [name for name in args.rollouts.split(",") if name]
    unknown = set(chosen) - {"hybrid", "order0", "order1", "central"}
    if unknown:
        ap.error(f"--rollouts: unknown {sorted(unknown)}; choose from hybrid, order0, order1, central")
    if not args.fit:  # no fitted hybrid to roll out
        chosen = [name for name in chosen if name != "hybrid"]
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = SETUPS[args.setup]
    load_start = os.getloadavg()
    problem, traj = gd_run(setup, args.cache)
    out: dict = {"setup": {**setup, "noise": NOISE, "lag": args.lag, "load_average_start": load_start}}
    model = None
    if args.fit:
        model, out = fit_and_report(args, setup, problem, traj, load_start)
    if chosen:
        out["rollout"] = rollouts(chosen, model, problem, traj, args.lag)
        central = out["rollout"].get("central", {}).get("mean_distance")
        hybrid = out["rollout"].get("hybrid", {}).get("mean_distance")
        if central is not None and hybrid is not None:
            out["rollout_ratio_central_over_hybrid"] = central / hybrid
            print(f"the fitted hybrid is {central / hybrid:.2f}x closer to smoothed GD than the central flow")
    out["load_average_end"] = os.getloadavg()
    path = Path(args.out or f"benchmarks/results/eos_hidden_fit_{args.setup}{'' if args.fit else '_unfitted'}.json")
    write_json(path, out)
    print(f"wrote {path}")


def fit_and_report(
    args: argparse.Namespace, setup: dict, problem: nf.Problem, traj: nf.Trajectory, load_start: tuple
) -> tuple[Hybrid, dict]:
    """The adjoint fit of the hidden-state library and its report; the fitted hybrid and the figures."""
    lr = traj.lr
    flow = OscillationFlow.from_trajectory(problem, traj, n_track=4, order=args.order, lag=args.lag)
    q = flow.q
    terms = args.terms.split(",")
    starts = {"floquet": 1.0, "drift": 1.0, "floor": 10 * q} if args.start == "away" else {}
    lib = HiddenStateLibrary(problem, lr, terms=terms, init={n: v for n, v in starts.items() if n in terms})
    model = Hybrid(flow, lib)
    first = setup["first"] if args.first is None else args.first
    last = setup["last"] if args.last is None else args.last
    exclude, stride = [(None, first), (last, None)], args.stride
    if args.catapults is not None:
        exclude, stride = catapult_windows(traj, args.catapults, args.window, first, last), 1
    t0 = time.perf_counter()
    res = nf.fit(
        model,
        traj,
        window=args.window,
        stride=stride,
        target="smoothed",
        method="adjoint",
        optimizer=args.optimizer,
        max_iters=args.max_iters,
        solver="euler",
        step_size=STEP,
        exclude=exclude,
        val_fraction=args.val_fraction,
        variance_weight=args.variance_weight,
        progress=True,
    )
    fit_seconds = time.perf_counter() - t0
    coefficients = dict(res.coefficients)
    checks = {name: abs(coefficients[name] / theory - 1) for name, theory in THEORY.items() if name in coefficients}
    if "floor" in coefficients:
        checks["floor"] = abs(math.log10(max(coefficients["floor"], 1e-300) / NOISE**2))
    out = {
        "setup": {
            **setup,
            "noise": NOISE,
            "q": q,
            "window": args.window,
            "stride": stride,
            "catapults": args.catapults,
            "window_steps": res.windows["step"].tolist(),
            "first": first,
            "last": last,
            "variance_weight": args.variance_weight,
            "order": args.order,
            "lag": args.lag,
            "val_fraction": args.val_fraction,
            "optimizer": args.optimizer,
            "start": args.start,
            "max_iters": args.max_iters,
            "threads": torch.get_num_threads(),
            "load_average_start": load_start,
        },
        "coefficients": coefficients,
        "uncertainty": res.uncertainty,
        "relative_error": {name: checks[name] for name in THEORY if name in checks},
        "floor_log10_factor_from_nu2": checks.get("floor"),
        "fit_seconds": fit_seconds,
        "timing": res.timing,
        "n_function_evals": res.n_function_evals,
        "iterations": len(res.history),
        "history": res.history,
        "window_error": {"physics": res.physics_error, "hybrid": res.hybrid_error},
    }
    print(
        f"{args.setup}: n {setup['n']}, widths {setup['widths']}, lr {lr}, nu {NOISE:g} (q = {q:.3g}), "
        f"windows of {args.window} steps "
        + (f"every {args.stride} steps from step {first}" if args.catapults is None else "across GD's catapults")
        + ", variance weight "
        f"{args.variance_weight}, {torch.get_num_threads()} thread(s), load average {load_start[0]:.2f}"
    )
    print("windows start at steps", res.windows["step"].tolist())
    print(f"{'term':10s} {'start':>10s} {'fitted':>12s} {'theory':>10s} {'off':>10s}")
    own = flow.hidden_coefficients()
    for name in terms:  # a revision the physics lacks has theory 0 (the amplitude-dependent rate)
        theory = NOISE**2 if name == "floor" else THEORY.get(name, 0.0)
        off = "-" if name not in checks else f"10^{checks[name]:.2f}" if name == "floor" else f"{checks[name]:.1%}"
        start = lib.init.get(name, own[name])
        print(f"{name:10s} {start:10.3g} {coefficients[name]:12.5g} {theory:10.3g} {off:>10s}")
    print(
        f"fit: {fit_seconds:.1f} s, {len(res.history)} iterations, {res.n_function_evals} right-hand sides; "
        f"window error physics {res.physics_error:.4g} -> hybrid {res.hybrid_error:.4g}"
    )
    t0 = time.perf_counter()
    report = res.report()
    out["report"] = report.to_dict()
    out["report_seconds"] = time.perf_counter() - t0
    print(report)
    return model, out


def rollouts(chosen: list[str], model: Hybrid | None, problem: nf.Problem, traj: nf.Trajectory, lag: float) -> dict:
    """The chosen models rolled out over the whole run (:func:`rollout`), the unfitted oscillation flows with the
    couplings' ``lag``, printed with their ratio to the central flow's distance."""
    smoothed = traj.smoothed()
    models = {
        "hybrid": lambda: model,
        "order0": lambda: Hybrid(OscillationFlow.from_trajectory(problem, traj, n_track=4, order=0, lag=lag), None),
        "order1": lambda: Hybrid(OscillationFlow.from_trajectory(problem, traj, n_track=4, order=1, lag=lag), None),
        "central": lambda: CentralFlow(problem, traj.lr),
    }
    out = {name: rollout(models[name](), problem, traj, smoothed) for name in chosen}
    central = out.get("central", {}).get("mean_distance_until")
    for name, r in out.items():
        if r["diverged"]:
            print(f"rollout {name:8s}: diverged ({r['seconds']:.0f} s)")
            continue
        until = ", ".join(f"{end} {d:.4g}" for end, d in r["mean_distance_until"].items())
        ratio = (
            ""
            if central is None or name == "central"
            else "; the central flow's over it until "
            + ", ".join(f"{end} {central[end] / d:.2f}x" for end, d in r["mean_distance_until"].items())
        )
        print(f"rollout {name:8s}: mean distance from step 0 until step {until}{ratio} ({r['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
