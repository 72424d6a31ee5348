"""Which numbers of the EoS demo depend on the CPU's kernel path.

Runs the demo (``neuralflow.demo.DEFAULT``) in subprocesses that force different vector kernel paths:
PyTorch's own kernels through ``ATEN_CPU_CAPABILITY`` and MKL's through ``MKL_ENABLE_INSTRUCTIONS``
(the machine's default, AVX2, and SSE4.2 / no vectorisation). At the edge of stability the oscillation
grows from round-off, and round-off differs between kernel paths; this table says which printed numbers
follow. Prints a table and writes ``results/kernel_paths.json``.

    python benchmarks/kernel_paths.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from neuralflow.provenance import write_json

HERE = Path(__file__).resolve().parent
PATHS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no vectors": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from neuralflow.demo import run_demo
s = run_demo(sys.argv[1], progress=False, quiet=True)
print(json.dumps({"onset": s["eos_onset"], "coefficients": s["coefficients"], "verdict": s["verdict"],
                  "top suggestion": s["suggestions"][0], "physics_error": s["physics_error"],
                  "hybrid_error": s["hybrid_error"], "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def main() -> None:
    rows = {}
    for name, env in PATHS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tmp],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **env},
            )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[name]
        r["closed"] = 1 - r["hybrid_error"] / r["physics_error"]
        print(
            f"{name:<11} ({r['capability']}): onset {r['onset']}, verdict {r['verdict']}, closed "
            f"{100 * r['closed']:.1f} percent, " + ", ".join(f"{k} {v:+.4g}" for k, v in r["coefficients"].items())
        )
        print(f"            top suggestion: {r['top suggestion'][:150]}")
    # the runs' own thread count is 1 (OMP_NUM_THREADS above); the stamp's is this process's
    print(f"wrote {write_json(HERE / 'results' / 'kernel_paths.json', rows)}")


if __name__ == "__main__":
    main()
