"""The edge-of-stability fit: gated sharpness-gradient terms fitted to smoothed GD on the digits MLP.

GD on ``mlp_digits(n=500, widths=(32, 32), seed=0)`` at lr = 0.15 for 700 steps (sharpness every
step); the targets are the smoothed iterates (midpoint process, Cohen et al. ICLR 2025). The model
``GradientFlow + TermLibrary(["Hg", "gradS", "gradScrit"], gated=["gradS", "gradScrit"],
features=["lr_S_minus_2"])`` (each gated coefficient ``switch(lr S - 2) * scale``; with ``--amplitude``,
``switch * (scale + w sigma2)`` with ``sigma2 = 2 alpha / beta`` the self-stabilisation variance, theory
``w = -1/2``) is fitted by the balanced gated derivative regression (``fit(..., method="regression",
balance=True)``: fields and gate inputs evaluated once at the targets, switches by LBFGS over those
tensors), leaving out the quiet stretches past ``2/lr`` where GD does not oscillate yet
(``Trajectory.eos_transients``: float64 GD's oscillation grows from round-off for ~200 steps, and
there no function of the state can say whether it has). Reported next to GradientFlow and
CentralFlow (Cohen et al. ICLR 2025):

(i)   the windowed distance to the smoothed iterates (normalised as in ``neuralflow.fit``);
(ii)  a rollout of each model from step 0 over the whole run: mean distance to the smoothed GD
      trajectory and the sharpness along it (LOBPCG at a few dozen states);
(iii) ``Hg`` and ``gradScrit`` fitted as constants bin by bin (``nf.coefficient_profile``: no gate model)
      and the fitted gated coefficients over time, beside ``-sigma^2/2``: of CentralFlow along its own
      rollout (at the same step), and measured from GD's oscillation, ``-1/2 ||theta_k - smoothed_k||^2``
      averaged over +-5 steps and divided by the number of critical eigenvalues (one shared variance).
      CentralFlow's ``sigma^2`` at the smoothed GD states themselves is not comparable: their sharpness
      is above ``2/lr``, and the complementarity problem's margin term inflates ``Sigma`` there.

Every rollout and window solve is explicit Euler with half-step substeps (``lr S * 0.5 <= 1.2``:
stable), CentralFlow's own default. Plain script: prints a table, writes JSON and
a PNG (default ``benchmarks/results/eos_fit.{json,png}``).

    python benchmarks/eos_fit.py [--steps 700] [--out benchmarks/results/eos_fit.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _digits_eos import LR, digits_eos_run  # noqa: E402

import neuralflow as nf
from neuralflow.autodiff import top_eigenpairs  # noqa: E402
from neuralflow.corrections import Hybrid, TermLibrary  # noqa: E402
from neuralflow.flows import CentralFlow, GradientFlow  # noqa: E402
from neuralflow.provenance import write_json  # noqa: E402

STEP = 0.5  # Euler substep (steps)


def rollout_stats(
    name: str, states: torch.Tensor, smoothed: torch.Tensor, problem: nf.Problem, probes: torch.Tensor, seconds: float
) -> dict:
    dist = (states - smoothed).norm(dim=1)
    block, sharp = None, []
    for k in probes.tolist():
        eig = top_eigenpairs(problem, states[k], k=1, v0=block, tol=1e-6)
        block = eig.block
        sharp.append(float(eig.values[0]))
    return {
        "name": name,
        "distance": dist.tolist(),
        "mean_distance": float(dist[1:].mean()),
        "probe_steps": probes.tolist(),
        "sharpness": sharp,
        "seconds": seconds,
    }


def central_window_errors(
    flow: CentralFlow, win_steps: torch.Tensor, smoothed: torch.Tensor, window: int, normaliser: float
) -> list[float]:
    """CentralFlow's normalised window error from each start (NaN where it is undefined: S > 2/lr at the start)."""
    t = torch.arange(window + 1, dtype=smoothed.dtype)
    out = []
    for s in win_steps.tolist():
        try:
            sol = nf.simulate(flow, smoothed[s], t, solver="euler", step_size=STEP)
        except nf.InputError:
            out.append(math.nan)
            continue
        out.append(float((sol[1:] - smoothed[s + 1 : s + window + 1]).square().sum(-1).mean() / normaliser))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--probes", type=int, default=30, help="states along each rollout where sharpness is measured")
    parser.add_argument(
        "--amplitude",
        action="store_true",
        help="gated amplitudes linear in sigma2 (amplitude=['sigma2']) instead of constant",
    )
    parser.add_argument(
        "--unbalanced",
        action="store_true",
        help="plain least squares instead of the balanced regression (points weighted by the inverse "
        "local mean of their squared residual)",
    )
    parser.add_argument(
        "--keep-transients",
        action="store_true",
        help="fit the quiet stretches past 2/lr too (Trajectory.eos_transients: GD does not oscillate "
        "yet there), which are excluded by default",
    )
    parser.add_argument("--out", default="benchmarks/results/eos_fit.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; two OpenMP threads were measured 30x slower here
    timing: dict[str, float] = {}

    p, traj, timing["gd"] = digits_eos_run(args.steps)
    sm = traj.smoothed()
    smoothed = sm.iterates
    print(f"GD: d = {p.dim}, {args.steps} steps, EoS onset at step {traj.eos_onset}, {timing['gd']:.1f} s")
    transients = traj.eos_transients()
    exclude = [] if args.keep_transients else transients
    print(f"quiet stretches past 2/lr (GD not oscillating yet): {transients}; excluded from the fit: {exclude}")

    t0 = time.perf_counter()
    # the gates see lr S - 2 only: a switch on the loss could stand in for time
    lib = TermLibrary(
        p,
        LR,
        ["Hg", "gradS", "gradScrit"],
        gated=["gradS", "gradScrit"],
        features=["lr_S_minus_2"],
        amplitude=["sigma2"] if args.amplitude else [],
        eig_tol=1e-3,
    )
    model = Hybrid(GradientFlow(p, LR), lib)
    res = nf.fit(
        model,
        traj,
        window=args.window,
        target="smoothed",
        method="regression",
        solver="euler",
        step_size=STEP,
        progress=False,
        balance=not args.unbalanced,
        exclude=exclude,
    )
    timing["fit"] = time.perf_counter() - t0
    print(res)
    print(f"fit timing: {res.timing}; regression loss {res.settings['regression_loss']}")
    with torch.no_grad():
        gates = {
            n: {
                "scale": float(g.scale),
                "w_sigma2": float(g.weights[0]) if args.amplitude else 0.0,
                "gain": float(g.gain),
                "margin": float(g.margin),
            }
            for n, g in lib.gates.items()
        }
    print(f"gates: {json.dumps(gates)}", flush=True)

    # (ii) rollouts from step 0
    # smoothed[i] is GD's step i + 1 (the midpoint process needs both neighbours); the rollouts start at step 0
    t = torch.arange(len(smoothed) + 1, dtype=p.dtype)
    probes = torch.linspace(0, len(smoothed) - 1, args.probes).round().long()
    central = CentralFlow(p, LR)
    rollouts, states_of = {}, {}
    # ablation: the fitted constant terms alone (gates off), to see what the gated terms add
    constants_only = TermLibrary(p, LR, list(lib.constants))
    with torch.no_grad():
        for n, c in lib.constants.items():
            constants_only.constants[n].copy_(c)
    ablation = Hybrid(GradientFlow(p, LR), constants_only)
    for name, flow in (
        ("gradient", GradientFlow(p, LR)),
        ("central", central),
        ("hybrid", model),
        ("constants_only", ablation),
    ):
        t0 = time.perf_counter()
        states_of[name] = nf.simulate(flow, p.theta0, t, solver="euler", step_size=STEP)[1:]
        sec = time.perf_counter() - t0
        rollouts[name] = rollout_stats(name, states_of[name], smoothed, p, probes, sec)
        print(f"rollout {name}: mean distance {rollouts[name]['mean_distance']:.4f} ({sec:.0f} s)")
        timing[f"rollout_{name}"] = sec

    # (iii) coefficients over time beside -sigma^2/2: CentralFlow along its own rollout, and GD's measured
    # oscillation variance per critical direction
    t0 = time.perf_counter()
    every = max(1, args.steps // 70)
    coef_steps = torch.arange(0, len(smoothed), every)
    coeffs = lib.coefficient_values(smoothed[coef_steps])
    central.reset()
    sig_top, sig_mean = [], []
    for k in coef_steps.tolist():
        state = central.solve(states_of["central"][k], index=0)
        s2 = state.sigma2
        sig_top.append(-0.5 * float(s2[0]) if len(s2) else 0.0)
        sig_mean.append(-0.5 * float(s2.mean()) if len(s2) else 0.0)
    oscillation = (traj.iterates[1:-1] - smoothed).square().sum(1)

    def n_critical(states: torch.Tensor) -> list[int]:
        """Critical eigenvalues (at least 1.95/lr, as CentralFlow counts them) at each state."""
        return (lib._eigenpairs(states, lib.max_critical)[0] >= 1.95 / LR).sum(1).tolist()

    def gd_minus_sigma2_half(lo: int, hi: int, n: int) -> float:
        """``-sigma^2/2`` per critical direction from GD's oscillation over smoothed indices [lo, hi)."""
        return -0.5 * float(oscillation[max(0, lo) : hi].mean()) / n if n else 0.0

    n_crit = n_critical(smoothed[coef_steps])
    sig_gd = [gd_minus_sigma2_half(k - 5, k + 6, n) for k, n in zip(coef_steps.tolist(), n_crit, strict=True)]
    # with no critical eigenvalue the gradScrit field is 0 and its coefficient undefined: report 0 there
    coeffs["gradScrit"] = coeffs["gradScrit"] * (torch.tensor(n_crit) > 0).to(coeffs["gradScrit"].dtype)
    timing["coefficients"] = time.perf_counter() - t0

    # (iii) model-free: Hg and gradScrit fitted as constants in each window-long bin (coefficient_profile),
    # beside -sigma^2/2 measured on GD over the same bin
    t0 = time.perf_counter()
    profile_lib = TermLibrary(p, LR, ["Hg", "gradScrit"], eig_tol=1e-3)
    prof = nf.coefficient_profile(Hybrid(GradientFlow(p, LR), profile_lib), traj, bin=args.window, target="smoothed")
    first = int(sm.steps[0])
    bin_idx = prof["step"] - first
    bin_crit = n_critical(smoothed[bin_idx + args.window // 2])
    quiet_bin = [any(lo <= int(s0) + args.window // 2 < hi for lo, hi in transients) for s0 in prof["step"]]
    profile_rows = []
    for i, s0 in enumerate(prof["step"].tolist()):
        n, lo = bin_crit[i], int(bin_idx[i])
        sig = gd_minus_sigma2_half(lo, lo + args.window, n)
        profile_rows.append(
            {
                "step": s0,
                "n_critical": n,
                "quiet": quiet_bin[i],
                "Hg": float(prof["coefficients"]["Hg"][i]),
                "gradScrit": float(prof["coefficients"]["gradScrit"][i]),
                "gradScrit_se": float(prof["se"]["gradScrit"][i]),
                "minus_sigma2_half_gd": sig,
                "unexplained": float(prof["unexplained"][i]),
            }
        )
    timing["profile"] = time.perf_counter() - t0

    # (i) windowed distances: GradientFlow and the hybrid on every window (from the fit), CentralFlow on
    # the validation windows (it is undefined from a start above 2/lr)
    val = res.windows["validation"]
    win_steps = res.windows["step"]
    t0 = time.perf_counter()
    cf_val = central_window_errors(central, win_steps[val], smoothed, args.window, res.normaliser)
    timing["central_windows"] = time.perf_counter() - t0
    windows = {
        "step": win_steps.tolist(),
        "validation": val.tolist(),
        "gradient": res.physics_window_errors.tolist(),
        "hybrid": res.window_errors.tolist(),
        "central_validation": cf_val,
    }

    def nanmean(x: list[float]) -> float:
        x = [v for v in x if math.isfinite(v)]
        return sum(x) / len(x) if x else math.nan

    rep = res.report()
    top = rep.terms[0] if rep.terms else None
    print()
    print(rep)
    threshold = 2 / LR
    rows = [
        (
            "GradientFlow",
            float(res.physics_window_errors[val].mean()),
            float(res.physics_window_errors.mean()),
            rollouts["gradient"],
        ),
        ("CentralFlow", nanmean(cf_val), math.nan, rollouts["central"]),
        ("GF + gated terms", float(res.window_errors[val].mean()), float(res.window_errors.mean()), rollouts["hybrid"]),
        ("GF + constants only", math.nan, math.nan, rollouts["constants_only"]),
    ]
    after = [i for i, k in enumerate(probes.tolist()) if k >= (traj.eos_onset or 0)]
    print()
    print(
        f"{'model':18s} {'win err (val)':>14s} {'win err (all)':>14s} {'rollout dist':>13s} "
        f"{'S after onset (mean, max)':>26s}   (2/lr = {threshold:.3f})"
    )
    table = []
    for name, wv, wa, ro in rows:
        s_after = [ro["sharpness"][i] for i in after]
        mean_s = sum(s_after) / len(s_after) if s_after else math.nan
        max_s = max(s_after, default=math.nan)
        print(f"{name:18s} {wv:14.4g} {wa:14.4g} {ro['mean_distance']:13.4f} {mean_s:13.3f} {max_s:12.3f}")
        table.append(
            {
                "model": name,
                "window_error_val": wv,
                "window_error_all": wa,
                "rollout_mean_distance": ro["mean_distance"],
                "sharpness_after_onset_mean": mean_s,
            }
        )
    ratio = rollouts["gradient"]["mean_distance"] / rollouts["hybrid"]["mean_distance"]
    print(f"\nrollout: hybrid {ratio:.2f}x closer than GradientFlow (target >= 2)")
    print(
        "\ncoefficients over time (step, lr S - 2 of the smoothed state, fitted gradS, gradScrit; -sigma^2/2 of "
        "CentralFlow on its rollout (top, mean); -sigma^2/2 measured on GD; n critical):"
    )
    inspected = lib.feature_values(smoothed[coef_steps])
    feats = inspected[:, lib.inspected_features.index("lr_S_minus_2")]
    for i in range(0, len(coef_steps), max(1, len(coef_steps) // 14)):
        print(
            f"  {int(coef_steps[i]):4d} {float(feats[i]):+.3f} {float(coeffs['gradS'][i]):+.3e} "
            f"{float(coeffs['gradScrit'][i]):+.3e} {sig_top[i]:+.3e} {sig_mean[i]:+.3e} {sig_gd[i]:+.3e} {n_crit[i]}"
        )
    print("\ncoefficient profile (constants fitted per bin; -sigma^2/2 measured on GD per critical direction):")
    print(
        f"  {'step':>5} {'n crit':>6} {'quiet':>5} {'Hg':>8} {'gradScrit':>11} {'+-':>9} {'-sigma^2/2':>11} "
        f"{'ratio':>6} {'unexpl.':>7}"
    )
    for r in profile_rows:
        ratio_r = r["gradScrit"] / r["minus_sigma2_half_gd"] if r["minus_sigma2_half_gd"] else math.nan
        print(
            f"  {r['step']:5d} {r['n_critical']:6d} {str(r['quiet']):>5} {r['Hg']:+8.3f} {r['gradScrit']:+11.3e} "
            f"{r['gradScrit_se']:9.1e} {r['minus_sigma2_half_gd']:+11.3e} {ratio_r:6.2f} {r['unexplained']:7.3f}"
        )
    onset = traj.eos_onset or 0
    oscillating = [r for r in profile_rows if r["n_critical"] and not r["quiet"] and r["step"] >= onset]
    before = [r for r in profile_rows if r["step"] + args.window <= onset]
    ratios = [r["gradScrit"] / r["minus_sigma2_half_gd"] for r in oscillating]
    profile_summary = {
        "bins_before_onset_max_abs_gradScrit": max((abs(r["gradScrit"]) for r in before), default=math.nan),
        "bins_quiet_max_abs_gradScrit": max(
            (abs(r["gradScrit"]) for r in profile_rows if r["quiet"]), default=math.nan
        ),
        "bins_oscillating": len(oscillating),
        "ratio_to_minus_sigma2_half_median": statistics.median(ratios) if ratios else math.nan,
        "ratio_to_minus_sigma2_half_range": [min(ratios), max(ratios)] if ratios else [],
        "Hg_before_onset_median": statistics.median(r["Hg"] for r in before) if before else math.nan,
        "Hg_oscillating_median": statistics.median(r["Hg"] for r in oscillating) if oscillating else math.nan,
    }
    print(json.dumps(profile_summary, indent=1))
    pre = [i for i, k in enumerate(coef_steps.tolist()) if k < onset]
    post = [i for i, k in enumerate(coef_steps.tolist()) if k >= onset + 100]
    summary = {}
    for n in ("gradS", "gradScrit"):
        c = coeffs[n]
        summary[n] = {
            "mean_before_onset": float(c[pre].mean()) if pre else math.nan,
            "mean_100_after_onset": float(c[post].mean()) if post else math.nan,
        }
    summary["minus_sigma2_half_top"] = {
        "mean_before_onset": nanmean([sig_top[i] for i in pre]),
        "mean_100_after_onset": nanmean([sig_top[i] for i in post]),
    }
    summary["minus_sigma2_half_mean"] = {
        "mean_before_onset": nanmean([sig_mean[i] for i in pre]),
        "mean_100_after_onset": nanmean([sig_mean[i] for i in post]),
    }
    summary["minus_sigma2_half_gd"] = {
        "mean_before_onset": nanmean([sig_gd[i] for i in pre]),
        "mean_100_after_onset": nanmean([sig_gd[i] for i in post]),
    }
    print(json.dumps(summary, indent=1))
    top_name = None if top is None else top.name
    top_approx = None if top is None else getattr(top.approximation, "name", top.approximation)
    print(
        f"\nreport verdict: {rep.verdict}; top term {top_name!r} repairs {top_approx!r}; top suggestion is the "
        f"no-oscillation approximation: {top_approx in ('no-oscillation', 'no-oscillation-critical-subspace')}"
    )
    print(f"timing (s): {json.dumps({k: round(v, 1) for k, v in timing.items()})}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "problem": p.description,
        "lr": LR,
        "steps": args.steps,
        "window": args.window,
        "euler_step": STEP,
        "eos_onset": traj.eos_onset,
        "fit": {
            "coefficients": res.coefficients,
            "timing": res.timing,
            "regression_loss": res.settings["regression_loss"],
            "physics_error": res.physics_error,
            "hybrid_error": res.hybrid_error,
        },
        "table": table,
        "rollout_ratio_gradient_over_hybrid": ratio,
        "windows": windows,
        "rollouts": rollouts,
        "coefficients": {
            "step": coef_steps.tolist(),
            "lr_S_minus_2": feats.tolist(),
            "gradS": coeffs["gradS"].tolist(),
            "gradScrit": coeffs["gradScrit"].tolist(),
            "minus_sigma2_half_top": sig_top,
            "minus_sigma2_half_mean": sig_mean,
            "minus_sigma2_half_gd": sig_gd,
            "n_critical": n_crit,
        },
        "gates": gates,
        "coefficient_summary": summary,
        "transients": transients,
        "excluded": exclude,
        "balance": not args.unbalanced,
        "profile": profile_rows,
        "profile_summary": profile_summary,
        "report": {
            "verdict": rep.verdict,
            "top_term": top_name,
            "top_approximation": top_approx,
            "suggestions": rep.suggestions(),
        },
        "gd_sharpness": traj.sharpness[:, 0].tolist(),
        "timing": timing,
    }
    write_json(out, result, indent=1)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, ro in rollouts.items():
        axes[0].plot(ro["distance"], label=name)
        axes[1].plot(ro["probe_steps"], ro["sharpness"], "o-", ms=3, label=name)
    axes[0].set(xlabel="step", ylabel="||flow - smoothed GD||", title="(ii) rollout from step 0")
    axes[1].plot(traj.sharpness[:, 0].tolist(), color="0.6", lw=0.8, label="GD")
    axes[1].axhline(threshold, color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="step", ylabel="sharpness", title="(ii) sharpness along the rollouts")
    cs = coef_steps.tolist()
    axes[2].plot(cs, coeffs["gradS"].tolist(), label="fitted gradS")
    axes[2].plot(cs, coeffs["gradScrit"].tolist(), label="fitted gradScrit")
    axes[2].plot(cs, sig_top, "--", label="-sigma^2/2 (CentralFlow rollout, top)")
    axes[2].plot(cs, sig_mean, ":", label="-sigma^2/2 (CentralFlow rollout, mean)")
    axes[2].plot(cs, sig_gd, "-.", label="-sigma^2/2 (GD oscillation, per critical direction)")
    axes[2].plot(
        [r["step"] + args.window / 2 for r in profile_rows],
        [r["gradScrit"] for r in profile_rows],
        "k.",
        ms=6,
        label="gradScrit fitted per bin (coefficient_profile)",
    )
    for lo, hi in transients:
        axes[2].axvspan(lo, hi, color="0.9", zorder=0)
    axes[2].axvline(onset, color="k", lw=0.8)
    axes[2].set(xlabel="step", ylabel="coefficient", title="(iii) gated coefficients")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
