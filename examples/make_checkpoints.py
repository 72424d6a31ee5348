"""Regenerate the shipped checkpoints in ``checkpoints/`` (the fitted results of the examples).

    python examples/make_checkpoints.py

writes ``checkpoints/modified_equation.nff`` (``modified_equation.py``: gradient flow + ``Hg, H2g, D3gg``
on a small tanh net; about 2 minutes on one thread), ``checkpoints/edge_of_stability.nff``
(``edge_of_stability.py``: gradient flow + gated ``grad S`` on the Zhu quartic at the edge of stability) and
``checkpoints/demo.nff`` (``neuralflow demo``: the oscillation flow + its hidden-state library fitted by the adjoint
on the digits MLP, with the demo's report; about 3 minutes). The problems are registered, so
``checkpoint.load(path)`` rebuilds them without the user's help. ``--fast`` runs the examples' fast
settings (for tests; the files are then not the shipped ones).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = ("modified_equation", "edge_of_stability")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "checkpoints"), help="folder to write the checkpoints to")
    parser.add_argument("--fast", action="store_true", help="the examples' fast settings (for tests)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EXAMPLES:
        path = out / f"{name}.nff"
        command = [sys.executable, str(HERE / f"{name}.py"), "--save", str(path)] + (["--fast"] if args.fast else [])
        subprocess.run(command, check=True)
        written.append(path)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "neuralflow", "demo", "--quiet", "--out", run]
        subprocess.run(command + (["--fast"] if args.fast else []), check=True)
        path = Path(shutil.copy(Path(run) / "fit.nff", out / "demo.nff"))
    written.append(path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return written


if __name__ == "__main__":
    main()
