"""Resume after SIGKILL, full size: a 2000-step digits run killed at a random step continues bit for bit.

GD on ``mlp_digits`` (n 500, widths (32, 32), lr 0.15, sharpness every step: the demo's set-up, well
into the edge of stability) runs uninterrupted once; then the same run, writing a checkpoint every
``--every`` steps (``run_gd(..., checkpoint_every=, resume=)``), is started in a subprocess and killed
with SIGKILL at a random moment (``--seed``), and resumed from its checkpoint. The resumed trajectory
(every stored iterate and every recorded series, bit for bit, NaN where NaN) must equal the
uninterrupted one. Prints a table and writes ``results/resume.json``.

    python benchmarks/resume_probe.py [--steps 2000] [--every 50] [--seed 0] [--kills 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow.provenance import write_json

HERE = Path(__file__).resolve().parent
SETUP = {"n": 500, "widths": (32, 32), "lr": 0.15}
CHILD = """
import sys, torch
torch.set_num_threads(1)
import neuralflow as nf
p = nf.problems.mlp_digits(n={n}, widths={widths})
nf.run_gd(p, {lr}, int(sys.argv[2]), progress=False, checkpoint_every=int(sys.argv[3]), resume=sys.argv[1])
"""


def next_step(path: Path) -> int:
    """The step a checkpoint resumes at, read from its header only (the file itself can be tens of MB)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(json.loads(f.read(n))["__metadata__"]["neuralflow"])
    return header["meta"]["next_step"]


def identical(a: nf.Trajectory, b: nf.Trajectory) -> bool:
    pairs = [(a.iterates, b.iterates), (a.steps, b.steps)] + [(a.history[k], b.history[k]) for k in a.history]
    return a.history.keys() == b.history.keys() and all(
        x.shape == y.shape and bool(((x == y) | ((x != x) & (y != y))).all()) for x, y in pairs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=1, help="kill and resume this many times in a row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    problem = nf.problems.mlp_digits(n=SETUP["n"], widths=SETUP["widths"])

    t0 = time.perf_counter()
    reference = nf.run_gd(problem, SETUP["lr"], args.steps, progress=False)
    t_ref = time.perf_counter() - t0
    per_step = t_ref / (args.steps + 1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.ckpt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        for _ in range(args.kills):
            start = next_step(ckpt) if ckpt.exists() else 0
            target = rng.randrange(start + args.every + 1, args.steps)  # a step the child must not reach a save at
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD.format(**SETUP), str(ckpt), str(args.steps), str(args.every)], env=env
            )
            while not ckpt.exists() or next_step(ckpt) <= start:  # started and past its first save
                time.sleep(0.05)
            time.sleep(max(0.0, (target - next_step(ckpt)) * per_step))
            child.send_signal(signal.SIGKILL)
            child.wait()
            rows.append({"kill aimed at step": target, "checkpoint at step": next_step(ckpt)})
        t0 = time.perf_counter()
        resumed = nf.run_gd(problem, SETUP["lr"], args.steps, progress=False, checkpoint_every=args.every, resume=ckpt)
        t_resume = time.perf_counter() - t0
        leftovers = [p.name for p in Path(tmp).iterdir() if p.name != "run.ckpt"]

    same = identical(resumed, reference)
    result = {
        "setup": {
            **SETUP,
            "widths": list(SETUP["widths"]),
            "steps": args.steps,
            "every": args.every,
            "seed": args.seed,
            "dim": problem.dim,
            "eos_onset": reference.eos_onset,
        },
        "kills": rows,
        "bit_for_bit": same,
        "temporary_files_left": leftovers,
        "seconds": {"uninterrupted": round(t_ref, 1), "resumed part": round(t_resume, 1)},
    }
    print(
        f"digits n {SETUP['n']} widths {SETUP['widths']} ({problem.dim} parameters), lr {SETUP['lr']}, "
        f"{args.steps} steps, sharpness every step, checkpoint every {args.every}; EoS onset {reference.eos_onset}"
    )
    for row in rows:
        aimed, saved = row["kill aimed at step"], row["checkpoint at step"]
        print(f"  SIGKILL aimed at step {aimed:>5}; checkpoint at step {saved:>5}")
    print(f"resumed run identical bit for bit to the uninterrupted one: {same}")
    print(f"temporary files left: {leftovers}")
    print(f"uninterrupted {t_ref:.0f} s; the resumed part {t_resume:.0f} s")
    out = write_json(HERE / "results" / "resume.json", result)
    print(f"wrote {out}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
