"""Bring your own model and data: any ``torch.nn.Module`` becomes a neuralflow problem.

``nf.problems.from_module(module, inputs, targets, loss="mse" | "ce")`` flattens the module's
parameters into one vector ``theta`` and builds the full-batch loss; everything else (GD, flows,
corrections, fits, reports, checkpoints) works on it unchanged. Here: a small softplus net fitting a
noisy sine, GD at a small step size (``lr S`` about 0.3), and the first-order modified-equation term ``Hg`` (theory
``-1/2``, Barrett & Dherin 2021) recovered from the iterates. A problem built from your own module
cannot be rebuilt from a checkpoint's description, so ``checkpoint.load`` takes it back as
``problem=``.

Run ``python examples/custom_problem.py`` (seconds) or with ``--fast``.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow import checkpoint


def make_problem() -> nf.Problem:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 40, dtype=torch.float64)[:, None]
    y = torch.sin(x) + 0.1 * torch.randn_like(x)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    return nf.problems.from_module(net, x, y, loss="mse")


def main(argv: list[str] | None = None) -> nf.FitResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    args = parser.parse_args(argv)
    steps = 60 if args.fast else 300

    problem = make_problem()
    lr = 0.02
    traj = nf.run_gd(problem, lr, steps, eig_every=10, progress=not args.fast)
    print(traj)
    model = nf.Hybrid(nf.flows.GradientFlow(problem, lr), nf.corrections.TermLibrary(problem, lr, ["Hg"]))
    result = nf.fit(model, traj, window=10, max_iters=2, progress=not args.fast)
    print(result)
    print(f"Hg = {result.coefficients['Hg']:+.4f} +- {result.uncertainty['Hg']:.1e} (theory -0.5)")

    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(result, Path(tmp) / "custom.nff", report=False)
        back = checkpoint.load(path, problem=problem)  # your module's problem, passed back in
        print(f"reloaded from a checkpoint: Hg = {back.coefficients['Hg']:+.4f}")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
