"""The oscillation flow against GD and the central flow at the edge of stability (science.md section 7).

Two digits set-ups (``mlp_digits``, seed 0): ``small`` n 500, widths (32, 32), lr 0.15, 1000 steps, flows
started at step 150; ``large`` n 1000, widths (64, 64), lr 0.1, 2000 steps, flows started at step 600
(both before the EoS onset). Per set-up, GD runs with injected Gaussian noise ``nu`` per coordinate per
step (``1e-12``, ``1e-10``, ``1e-8``), plain float64 (round-off only) and plain float32 (small set-up).
The oscillation flow has no fitted parameter: ``q = nu^2`` plus the round-off floor
``(u ||theta|| / sqrt(d))^2`` (``u`` the unit round-off; ``neuralflow.oscillation.roundoff_variance``),
and starts from GD's iterate with ``X`` from GD's measurement there (the equilibrium below the edge).
The float32 run is compared with the float64 flow seeded by float32's round-off floor (third derivatives
in float32 lose the signal). The central flow does not depend on ``nu``; it is computed once per
set-up, from the round-off run's iterate.

Measured per run: GD's EoS onset and the step its oscillation becomes established (the rule of
``neuralflow.oscillation``: demodulated variance along the 4 tracked eigenvectors at least 0.01 times the
squared smoothed step), the flow's predicted step (the same rule on ``tr X`` and the flow's own step);
the quiet stretch's length against ``log(1/nu)``; distance to smoothed GD (midpoint process) over the
transient (onset to onset + 400) and the whole run; the first sharpness peak after the onset; the
predicted time-averaged loss (``L + 1/2 sum_i lambda_i X_ii``) against GD's loss averaged over +-10
steps; cost per GD step in seconds and gradient-equivalents (one run each, one thread).

Prints a table, writes ``benchmarks/results/oscillation_<setup>.json`` and ``oscillation_<setup>.png``.

    python benchmarks/oscillation.py --setups small --noise 1e-12 1e-10 1e-8 f64 f32
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import neuralflow as nf  # noqa: E402
from neuralflow.autodiff import gradient, top_eigenpairs  # noqa: E402
from neuralflow.flows import CentralFlow, OscillationFlow, simulate  # noqa: E402
from neuralflow.oscillation import first_established  # noqa: E402
from neuralflow.provenance import write_json  # noqa: E402

SETUPS = {
    "small": {"n": 500, "widths": (32, 32), "lr": 0.15, "steps": 1000, "start": 150},
    "large": {"n": 1000, "widths": (64, 64), "lr": 0.1, "steps": 2000, "start": 600},
}
N_TRACK = 4
TRANSIENT = 400
WINDOW = 10


def window_average(x: torch.Tensor, w: int) -> torch.Tensor:
    c = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    i = torch.arange(len(x))
    lo, hi = (i - w).clamp(min=0), (i + w + 1).clamp(max=len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def eigen_series(problem: nf.Problem, states: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvalues at every state (warm-started LOBPCG)."""
    out, block = [], None
    for th in states:
        eig = top_eigenpairs(problem, th, k=k, v0=block, tol=1e-4)
        block = eig.block
        out.append(eig.values)
    return torch.stack(out)


def run_central(problem: nf.Problem, lr: float, theta0: torch.Tensor, t: torch.Tensor) -> dict:
    """The central flow from ``theta0`` at times ``t``: states, sharpness, predicted loss every 10 steps, seconds."""
    central = CentralFlow(problem, lr)
    t0 = time.perf_counter()
    states = simulate(central, theta0, t)
    seconds = (time.perf_counter() - t0) / len(t)
    probe = torch.arange(0, len(t), 10)
    return {
        "states": states,
        "seconds": torch.tensor(seconds),
        "sharp": eigen_series(problem, states, 1)[:, 0],
        "probe": probe,
        "pred_loss": torch.stack([central.predicted_loss(states[i]) for i in probe]),
    }


def cost(problem: nf.Problem, lr: float, c_states: torch.Tensor, osc: dict, t: torch.Tensor, n: int = 20) -> dict:
    """Seconds and gradient-equivalents per GD step of both flows, in one process, each over ``n`` steps of its own
    trajectory, in two windows: 150 steps past the start (around the EoS onset; the oscillation flow still quiet)
    and 450 past it (the oscillation established); and of one gradient."""
    grad_s = statistics.median(
        [
            (lambda t0: (gradient(problem, problem.theta0), time.perf_counter() - t0)[1])(time.perf_counter())
            for _ in range(15)
        ]
    )
    out: dict = {"gradient_seconds": grad_s, "windows": []}
    for i in sorted({min(150, len(t) - n - 1), min(450, len(t) - n - 1)}):
        span = t[i : i + n + 1]
        t0 = time.perf_counter()
        simulate(CentralFlow(problem, lr, above_edge="hold"), c_states[i], span)
        central_s = (time.perf_counter() - t0) / n
        flow = OscillationFlow(problem, lr, q=float(osc["q"]), n_track=N_TRACK)
        t0 = time.perf_counter()
        simulate(flow, osc["states"][i], span, extra0=flow.extra_from_covariance(osc["X"][i]))
        osc_s = (time.perf_counter() - t0) / n
        out["windows"].append(
            {
                "steps": [int(span[0]), int(span[-1])],
                "central": {"seconds_per_step": central_s, "gradients_per_step": central_s / grad_s},
                "oscillation": {"seconds_per_step": osc_s, "gradients_per_step": osc_s / grad_s},
            }
        )
    return out


def run_flow(problem: nf.Problem, traj: nf.Trajectory, start: int, t: torch.Tensor) -> dict:
    """The oscillation flow from GD's iterate at ``start`` (q and the initial X from the trajectory), at times ``t``."""
    seg = traj.slice(start, None)
    flow = OscillationFlow.from_trajectory(problem, seg, n_track=N_TRACK)
    x0 = seg.iterates[0].double()
    t0 = time.perf_counter()
    X0 = flow.initial_extra(x0, seg)
    first = flow.state_at(x0, X0)  # what the flow sees at the start
    seen = [(first.values, first.predicted_loss)]
    rebase = flow.rebase

    def recording_rebase(y: torch.Tensor) -> torch.Tensor:  # eigenvalues of each step's last evaluation
        seen.append((flow.last.values, flow.last.predicted_loss))
        return rebase(y)

    flow.rebase = recording_rebase
    states, extra = simulate(flow, x0, t, extra0=X0, return_extra=True, reset=False)
    return {
        "states": states,
        "X": flow.covariance(extra),
        "seconds": torch.tensor((time.perf_counter() - t0) / len(t)),
        "values": torch.stack([v for v, _ in seen]),
        "pred_loss": torch.stack([p for _, p in seen]),
        "q": torch.tensor(flow.q),
    }


def cached(cache: Path | None, filename: str, compute) -> dict:
    """``compute()`` (a dict of tensors), or its result saved in ``cache`` by an earlier run."""
    if cache is None:
        return compute()
    path = cache / filename
    if path.exists():
        return torch.load(path, weights_only=True)
    out = compute()
    torch.save(out, path)
    return out


def first_peak(steps: torch.Tensor, s: torch.Tensor, threshold: float) -> tuple[int, float] | None:
    """The first sharpness peak past the edge: the maximum of ``s`` from its first crossing of ``threshold`` until
    it first falls back below it (each series from its own crossing)."""
    above = s >= threshold
    cross = torch.nonzero(above).flatten()
    if not len(cross):
        return None
    i0 = int(cross[0])
    below = torch.nonzero(~above[i0:]).flatten()
    i1 = i0 + int(below[0]) if len(below) else len(s)
    i = i0 + int(torch.argmax(s[i0:i1]))
    return int(steps[i]), float(s[i])


def run_setup(
    name: str, variants: list[str], cache: Path | None, out_dir: Path, stage: str = "all", stop: int | None = None
) -> dict:
    cfg = SETUPS[name]
    lr, steps, start = cfg["lr"], cfg["steps"], cfg["start"]
    p64 = nf.problems.mlp_digits(n=cfg["n"], widths=cfg["widths"], seed=0)
    thr = 2 / lr
    g_seconds = statistics.median(
        [(lambda t0: (gradient(p64, p64.theta0), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(9)]
    )
    result: dict = {
        "setup": name,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "dim": p64.dim,
        "gradient_seconds": g_seconds,
        "runs": {},
    }

    def gd(variant: str) -> nf.Trajectory:
        nu = 0.0 if variant in ("f64", "f32") else float(variant)
        dtype = torch.float32 if variant == "f32" else torch.float64
        path = None if cache is None else cache / f"gd_{name}_{variant}.nft"
        if path is not None and path.exists():
            return nf.Trajectory.load(path)
        prob = nf.problems.mlp_digits(n=cfg["n"], widths=cfg["widths"], seed=0, dtype=dtype)
        t0 = time.perf_counter()
        traj = nf.run_gd(prob, lr, steps, n_eigs=N_TRACK, noise=nu, noise_seed=0, progress=False)
        traj.meta["seconds"] = time.perf_counter() - t0
        if path is not None:
            traj.save(path)
        return traj

    trajs = {v: gd(v) for v in variants}
    stop = steps if stop is None else min(stop, steps)
    result["stop"] = stop
    tag = "" if stop == steps else f"_to{stop}"
    t = torch.arange(start, stop, dtype=torch.float64)
    if stage == "gd":
        return result
    if stage == "flows":
        for variant, traj in trajs.items():
            cached(cache, f"oscillation_{name}_{variant}{tag}.pt", partial(run_flow, p64, traj, start, t))
        return result
    ref = trajs.get("f64") or next(iter(trajs.values()))
    if stage == "central":
        cached(cache, f"central_{name}{tag}.pt", partial(run_central, p64, lr, ref.iterates[start].double(), t))
        return result

    # ---- central flow, once per set-up
    c = cached(cache, f"central_{name}{tag}.pt", partial(run_central, p64, lr, ref.iterates[start].double(), t))
    c_states, c_sharp, probe, c_pred_loss = c["states"], c["sharp"], c["probe"], c["pred_loss"]
    c_seconds = float(c["seconds"])
    result["central"] = {"seconds_per_step": c_seconds, "gradients_per_step": c_seconds / g_seconds}

    figs = {}
    for variant, traj in trajs.items():
        h = traj.history
        sm = traj.smoothed()
        smooth = sm.iterates.double()  # steps 1..steps-1
        idx = t.long() - 1  # rows of smooth for steps start..steps-1
        valid = idx < len(smooth)
        onset = traj.eos_onset
        osc = traj.oscillation
        gd_est = osc.first_established(onset) if onset is not None else None

        o = cached(cache, f"oscillation_{name}_{variant}{tag}.pt", partial(run_flow, p64, traj, start, t))
        if "cost" not in result:
            result["cost"] = cost(p64, lr, c_states, o, t)
        states, X, o_seconds, o_pred = o["states"], o["X"], float(o["seconds"]), o["pred_loss"]
        var = X.diagonal(dim1=1, dim2=2).sum(dim=1)
        o_sharp = o["values"][:, 0]
        o_step = torch.cat([(states[1:] - states[:-1]).norm(dim=1), torch.tensor([math.nan], dtype=torch.float64)])
        o_est = first_established(t.long(), var, o_step, onset) if onset is not None else None

        d_osc = (states[valid] - smooth[idx[valid]]).norm(dim=1)
        d_cen = (c_states[valid] - smooth[idx[valid]]).norm(dim=1)
        tv = t[valid]
        win = (tv >= onset) & (tv < onset + TRANSIENT) if onset is not None else torch.zeros_like(tv, dtype=torch.bool)
        gd_loss_avg = window_average(h["loss"].double(), WINDOW)[t.long()]
        gd_peak = first_peak(h["step"], h["sharpness"][:, 0].double(), thr)
        o_peak = first_peak(t.long(), o_sharp, thr)
        c_peak = first_peak(t.long(), c_sharp, thr)
        rel = lambda a, b: float(((a - b).abs() / b.abs()).mean())  # noqa: E731
        quiet = None if gd_est is None else gd_est - onset
        run = {
            "noise": float(traj.meta.get("noise", 0.0)),
            "dtype": str(traj.iterates.dtype).removeprefix("torch."),
            "q": float(o["q"]),
            "gd_seconds": traj.meta.get("seconds"),
            "onset": onset,
            "gd_established": gd_est,
            "flow_established": o_est,
            "quiet_stretch": quiet,
            "established_error_fraction": None if (o_est is None or not quiet) else abs(o_est - gd_est) / quiet,
            "distance_transient": {"oscillation": float(d_osc[win].mean()), "central": float(d_cen[win].mean())},
            "distance_run": {"oscillation": float(d_osc.mean()), "central": float(d_cen.mean())},
            "first_peak": {"gd": gd_peak, "oscillation": o_peak, "central": c_peak},
            "avg_loss_error": {
                "oscillation": rel(o_pred, gd_loss_avg),
                "central": rel(c_pred_loss, gd_loss_avg[probe]),
            },
            "seconds_per_step": o_seconds,
            "gradients_per_step": o_seconds / g_seconds,
        }
        result["runs"][variant] = run
        figs[variant] = {
            "gd_steps": h["step"],
            "gd_sharp": h["sharpness"][:, 0].double(),
            "gd_var": osc.variance.double(),
            "gd_total": osc.total.double(),
            "t": t,
            "o_sharp": o_sharp,
            "o_var": var,
            "tv": tv,
            "d_osc": d_osc,
            "d_cen": d_cen,
        }
        print(
            f"[{name} {variant}] onset {onset} GD established {gd_est} flow {o_est}; dist transient "
            f"osc {run['distance_transient']['oscillation']:.4g} central {run['distance_transient']['central']:.4g}",
            flush=True,
        )

    noisy = sorted((float(v), r) for v, r in result["runs"].items() if v not in ("f64", "f32"))
    pts = [
        (math.log(1 / nu), r["quiet_stretch"], r["flow_established"] - r["onset"])
        for nu, r in noisy
        if r["quiet_stretch"] is not None and r["flow_established"] is not None
    ]
    if len(pts) >= 2:
        xs = torch.tensor([p[0] for p in pts])
        slope = lambda ys: float(
            torch.linalg.lstsq(  # noqa: E731
                torch.stack([xs, torch.ones_like(xs)], 1), torch.tensor(ys, dtype=xs.dtype)[:, None]
            ).solution[0, 0]
        )
        sg, sf = slope([p[1] for p in pts]), slope([p[2] for p in pts])
        result["quiet_slope"] = {"gd": sg, "oscillation": sf, "relative_error": abs(sf - sg) / abs(sg)}
    if noisy:
        tr = [r["distance_transient"] for _, r in noisy]
        result["transient_ratio_mean"] = statistics.mean(d["central"] / d["oscillation"] for d in tr)
    figure(result, figs, c_sharp, t, thr, out_dir / f"oscillation_{name}.png")
    return result


def figure(result: dict, figs: dict, c_sharp: torch.Tensor, t: torch.Tensor, thr: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a_s, a_v, a_d) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    a_s.plot(t.numpy(), c_sharp.numpy(), color="k", lw=1.2, label="central flow")
    for i, (variant, f) in enumerate(figs.items()):
        c = colors[i % len(colors)]
        lab = {"f64": "float64 round-off", "f32": "float32 round-off"}.get(variant, f"nu = {variant}")
        a_s.plot(f["gd_steps"].numpy(), f["gd_sharp"].numpy(), color=c, lw=0.6, alpha=0.6)
        a_s.plot(f["t"].numpy(), f["o_sharp"].numpy(), color=c, lw=1.2, ls="--", label=f"oscillation flow, {lab}")
        a_v.semilogy(f["gd_steps"].numpy(), f["gd_var"].numpy(), color=c, lw=0.6, alpha=0.6)
        a_v.semilogy(f["t"].numpy(), f["o_var"].numpy(), color=c, lw=1.2, ls="--", label=lab)
        a_d.semilogy(f["tv"].numpy(), f["d_osc"].numpy(), color=c, lw=1, ls="--", label=f"oscillation flow, {lab}")
        if i == 0:
            a_d.semilogy(f["tv"].numpy(), f["d_cen"].numpy(), color="k", lw=1.2, label="central flow")
    a_s.axhline(thr, color="0.5", ls=":", lw=1)
    a_s.set_ylabel("sharpness\n(thin: GD)")
    a_v.set_ylabel("oscillation variance\n(thin: GD measured, dashed: flow tr X)")
    a_d.set_ylabel("distance to smoothed GD")
    a_d.set_xlabel("step")
    a_s.legend(fontsize="x-small")
    a_v.legend(fontsize="x-small")
    a_d.legend(fontsize="x-small")
    lo = max(0, int(t[0]) - 50)
    a_s.set_xlim(lo, int(t[-1]))
    a_s.set_title(f"oscillation flow vs GD and central flow: digits {result['setup']} set-up (lr = {result['lr']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [
        f"set-up {result['setup']} (n {result['n']}, widths {result['widths']}, lr {result['lr']}): "
        f"central flow {result['central']['seconds_per_step']:.3g} s/step "
        f"({result['central']['gradients_per_step']:.0f} gradients)"
    ]
    head = (
        "run",
        "q",
        "onset",
        "GD est.",
        "flow est.",
        "err/quiet",
        "d trans osc",
        "d trans cen",
        "d run osc",
        "d run cen",
        "peak GD",
        "peak osc",
        "avg loss err osc",
        "avg loss err cen",
        "s/step",
    )
    lines.append(" | ".join(head))
    for v, r in result["runs"].items():
        fp = r["first_peak"]
        pk = lambda x: "-" if x is None else f"{x[0]}: {x[1]:.3f}"  # noqa: E731
        err = r["established_error_fraction"]
        lines.append(
            " | ".join(
                [
                    v,
                    f"{r['q']:.2g}",
                    str(r["onset"]),
                    str(r["gd_established"]),
                    str(r["flow_established"]),
                    "-" if err is None else f"{err:.3f}",
                    f"{r['distance_transient']['oscillation']:.4f}",
                    f"{r['distance_transient']['central']:.4f}",
                    f"{r['distance_run']['oscillation']:.4f}",
                    f"{r['distance_run']['central']:.4f}",
                    pk(fp["gd"]),
                    pk(fp["oscillation"]),
                    f"{r['avg_loss_error']['oscillation']:.4f}",
                    f"{r['avg_loss_error']['central']:.4f}",
                    f"{r['seconds_per_step']:.3g}",
                ]
            )
        )
    if "quiet_slope" in result:
        s = result["quiet_slope"]
        lines.append(
            f"quiet stretch vs log(1/nu): slope GD {s['gd']:.2f}, flow {s['oscillation']:.2f} steps "
            f"(relative error {s['relative_error']:.3f})"
        )
    for w in result.get("cost", {}).get("windows", []):
        lines.append(
            f"cost per GD step, one process, steps {w['steps'][0]}-{w['steps'][1]}: central flow "
            f"{w['central']['seconds_per_step']:.3g} s ({w['central']['gradients_per_step']:.0f} gradients), "
            f"oscillation flow {w['oscillation']['seconds_per_step']:.3g} s "
            f"({w['oscillation']['gradients_per_step']:.0f} gradients); one gradient "
            f"{1e3 * result['cost']['gradient_seconds']:.2f} ms"
        )
    if "transient_ratio_mean" in result:
        lines.append(f"transient distance, central / oscillation, mean over nu: {result['transient_ratio_mean']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", nargs="+", default=["small", "large"], choices=sorted(SETUPS))
    ap.add_argument(
        "--noise",
        nargs="+",
        default=["1e-12", "1e-10", "1e-8", "f64", "f32"],
        help="noise levels nu, 'f64' (round-off only) and 'f32' (float32 round-off, small set-up)",
    )
    ap.add_argument("--cache", default=None, help="folder to keep the GD runs in (reused when present)")
    ap.add_argument(
        "--stage",
        default="all",
        choices=["gd", "flows", "central", "all"],
        help="gd / flows / central: only run that part into --cache (to split the work)",
    )
    ap.add_argument("--stop", type=int, default=None, help="integrate the flows up to this step (default: the end)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = None if args.cache is None else Path(args.cache)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    for name in args.setups:
        variants = [v for v in args.noise if not (v == "f32" and name != "small")]
        res = run_setup(name, variants, cache, Path(args.out_dir), args.stage, args.stop)
        if args.stage != "all":
            continue
        print(table(res), flush=True)
        out = write_json(Path(args.out_dir) / f"oscillation_{name}.json", res, indent=1)
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
