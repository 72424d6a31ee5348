"""GD's own coefficients of the oscillation flow, measured from its iterates alone (no model, no fit).

The digits runs of ``benchmarks/eos_hidden_fit.py`` (same set-ups, same cached GD run). With ``theta_k = m_k +
(-1)^k x_k`` (science notes section 7), ``m`` the midpoint process ``(theta_{k-1} + 2 theta_k + theta_{k+1}) / 4``
and ``(-1)^k x_k`` the period-two demodulation ``(theta_{k-2} - 4 theta_{k-1} + 6 theta_k - 4 theta_{k+1} +
theta_{k+2}) / 16`` (all directions, not only the tracked ones; the sign drops out of what is measured), two of
the flow's coefficients are read off each oscillating step ``k`` (``s = |x_k|^2`` at least ``--min-variance``):

* **The drift coupling** (theory 1/2). The smoothed step minus GD's gradient step, ``r_k = m_{k+1} - m_k + lr
  g(m_k)`` (a discrete step: on a quadratic the midpoint process moves by exactly ``-lr g(m_k)``, so no
  backward-error term enters), against ``w_k = D3L[x_k, x_k]``: ``c_k = -<r_k, w_k> / (lr |w_k|^2)``, the
  coefficient of ``-lr c D3L[x, x]`` that best explains the step. Also
  with ``x`` projected on the 4 tracked eigenvectors (what the flow's ``Sigma`` holds), and pooled over the steps
  (``-sum <r, w> / (lr sum |w|^2)``, where the large oscillations weigh most).
* **The amplitude-dependent rate** (theory 0 in *linear Floquet growth*). Along the top eigenvector ``u`` of
  ``H(m_k)`` the amplitude ``a_k = u . x_k`` grows per step by ``log|a_{k+1} / a_k|``; linear Floquet growth says
  ``log|1 - lr lambda|``. The period-two map of ``a`` with the loss's quartic along ``u`` is ``a -> -(1 - lr
  (lambda + D4L[u, u, u, u] a^2 / 6)) a`` (the odd part of ``g(m + a u)``), so the variance's excess rate is
  ``2 log|1 - lr (lambda + D4L s / 6)| - 2 log|1 - lr lambda|`` ~ ``lr D4L s / 3`` near ``lr lambda = 2``: the
  library's amplitude term ``s^2`` with coefficient ``lr D4L[u, u, u, u] / 3`` (``D4L`` by nested forward mode).
  Compared on the steps where ``u`` carries at least 90 percent of the tracked oscillation.

Prints a table and the summary, writes ``benchmarks/results/eos_gd_couplings_<setup>.json``.

    python benchmarks/eos_gd_couplings.py --setup small [--every 5] [--cache DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from eos_hidden_fit import SETUPS, gd_run
from torch.func import jvp
from tqdm import tqdm

import neuralflow as nf
from neuralflow.autodiff import d3, gradient, top_eigenpairs
from neuralflow.oscillation import period_two
from neuralflow.provenance import write_json

N_TRACK = 4
SINGLE_DIRECTION = 0.9  # share of the tracked oscillation along u for the amplitude-rate comparison


def quartic(problem: nf.Problem, theta: torch.Tensor, u: torch.Tensor) -> float:
    """``D4L[u, u, u, u]`` at ``theta``: four nested directional derivatives of the loss along ``u``."""

    def along(f):  # noqa: ANN001, ANN202 - a directional derivative of a scalar function of theta
        return lambda t: jvp(f, (t,), (u,))[1]

    f = problem.loss
    for _ in range(4):
        f = along(f)
    return float(f(theta))


def measure(problem: nf.Problem, traj: nf.Trajectory, smoothed: nf.Trajectory, k: int) -> dict[str, float]:
    """The drift coupling and the amplitude rate at step ``k`` (a step of ``traj``, two steps from its ends);
    ``smoothed`` is ``traj.smoothed()``."""
    lr = traj.lr
    i, j = k - int(traj.steps[0]), k - int(smoothed.steps[0])

    def demod(i: int) -> torch.Tensor:  # d at iterate row i
        return period_two(traj.iterates[i - 2 : i + 3])[0]

    m, x = smoothed.iterates[j], demod(i)
    r = smoothed.iterates[j + 1] - m + lr * gradient(problem, m)
    eig = top_eigenpairs(problem, m, N_TRACK)
    U, lam = eig.vectors, float(eig.values[0])
    x_tracked = U.T @ (U @ x)
    w, w_tracked = d3(problem, m, x, x), d3(problem, m, x_tracked, x_tracked)
    u = U[0]
    a_now, a_next = float(u @ x), float(u @ demod(i + 1))  # demod(j) is (-1)^j x_j: the ratio's sign is dropped
    s = a_now**2
    d4 = quartic(problem, m, u)
    linear = math.log(abs(1 - lr * lam))
    return {
        "step": k,
        "variance": float(x @ x),
        "sharpness": lam,
        "lr_S_minus_2": lr * lam - 2,
        "top_share": s / max(float((U @ x).pow(2).sum()), 1e-300),
        "drift": float(-(r @ w) / (lr * (w @ w))),
        "drift_tracked": float(-(r @ w_tracked) / (lr * (w_tracked @ w_tracked))),
        "r_dot_w": float(r @ w),
        "w_sq": float(w @ w),
        "residual_at_half": float((r + 0.5 * lr * w).norm() / r.norm()),
        "top_variance": s,
        "D4": d4,
        "excess_rate": 2 * (math.log(abs(a_next / a_now)) - linear) if a_now and a_next else math.nan,
        "quartic_rate": 2 * (math.log(abs(1 - lr * (lam + d4 * s / 6))) - linear),
        "amplitude_coefficient": lr * d4 / 3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="small")
    ap.add_argument("--first", type=int, default=None, help="first step (default: the fit's first window)")
    ap.add_argument("--last", type=int, default=None, help="last step (default: the fit's windows' end)")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--min-variance", type=float, default=1e-5, help="steps with |x|^2 below this are skipped")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=None, help="folder to keep the GD run in (reused when present)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = SETUPS[args.setup]
    problem, traj = gd_run(setup, args.cache)
    first = setup["first"] if args.first is None else args.first
    last = setup["last"] if args.last is None else args.last
    osc = traj.oscillation
    steps = [
        k
        for k in range(first, last, args.every)
        if float(osc.variance[int(torch.nonzero(osc.steps == k)[0])]) >= args.min_variance
    ]
    t0 = time.perf_counter()
    smoothed = traj.smoothed()
    rows = [measure(problem, traj, smoothed, k) for k in tqdm(steps, desc="steps", leave=False)]
    seconds = time.perf_counter() - t0
    print(
        f"{args.setup}: n {setup['n']}, widths {setup['widths']}, lr {traj.lr}; {len(rows)} steps in {first}-{last} "
        f"every {args.every} with |x|^2 >= {args.min_variance:g} ({seconds:.0f} s)"
    )
    print(
        f"{'step':>5s} {'|x|^2':>9s} {'lrS-2':>8s} {'top':>5s} {'drift':>7s} {'tracked':>8s} "
        f"{'excess rate':>12s} {'lr D4 s/3':>10s} {'D4':>8s}"
    )
    for row in rows:
        print(
            f"{row['step']:5d} {row['variance']:9.2e} {row['lr_S_minus_2']:+8.4f} {row['top_share']:5.2f} "
            f"{row['drift']:7.3f} {row['drift_tracked']:8.3f} {row['excess_rate']:+12.5f} "
            f"{row['quartic_rate']:+10.5f} {row['D4']:8.1f}"
        )
    drifts = [row["drift"] for row in rows]
    pooled = -sum(row["r_dot_w"] for row in rows) / (traj.lr * sum(row["w_sq"] for row in rows))
    single = [row for row in rows if row["top_share"] >= SINGLE_DIRECTION and abs(row["quartic_rate"]) > 5e-4]
    quartiles = statistics.quantiles(drifts, n=4) if len(drifts) > 1 else [math.nan] * 3
    summary = {
        "drift_median": statistics.median(drifts),
        "drift_quartiles": [quartiles[0], quartiles[2]],
        "drift_pooled": pooled,
        "drift_tracked_median": statistics.median(row["drift_tracked"] for row in rows),
        "amplitude_steps": len(single),
        "excess_over_quartic_median": statistics.median(r["excess_rate"] / r["quartic_rate"] for r in single)
        if single
        else None,
        "amplitude_coefficient_range": [
            min(r["amplitude_coefficient"] for r in rows),
            max(r["amplitude_coefficient"] for r in rows),
        ],
    }
    print(
        f"drift coupling (theory 1/2): median {summary['drift_median']:.3f} "
        f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}), pooled {pooled:.3f}, "
        f"x on the {N_TRACK} tracked directions: median {summary['drift_tracked_median']:.3f}"
    )
    if single:
        print(
            f"amplitude-dependent rate: on {len(single)} single-direction steps GD's excess growth is "
            f"{summary['excess_over_quartic_median']:.2f}x the quartic's lr D4L s / 3 (median ratio); the "
            f"coefficient lr D4L[u,u,u,u] / 3 of s^2 ranges {summary['amplitude_coefficient_range'][0]:.1f} to "
            f"{summary['amplitude_coefficient_range'][1]:.1f} over the steps"
        )
    out = {
        "setup": {**setup, "first": first, "last": last, "every": args.every, "min_variance": args.min_variance},
        "summary": summary,
        "rows": rows,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    path = Path(args.out or f"benchmarks/results/eos_gd_couplings_{args.setup}.json")
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
