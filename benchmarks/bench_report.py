"""Cost of rendering a report from its stored numbers (target: under a second on a checkpointed fit).

A checkpoint stores ``Report.to_dict()`` (JSON); loading it and rendering every output form must
not recompute anything. This builds a report the size of the digits edge-of-stability fit (three
terms, one gated with three features at 100 states, 100 window errors, 20 window ends with loss
and sharpness), round-trips it through JSON, and times each output form (median of ``--repeat``).

    python benchmarks/bench_report.py [--repeat 5]

Prints a table and writes ``benchmarks/results/report.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from neuralflow.corrections import TERMS  # noqa: E402
from neuralflow.provenance import write_json  # noqa: E402
from neuralflow.report import Gate, Report, TermSummary, gate_formula  # noqa: E402


def eos_sized_report(states: int = 100, windows: int = 100, ends: int = 20) -> Report:
    rng = np.random.default_rng(0)
    steps = np.linspace(0, 2000, states).round().astype(int)
    x = np.linspace(-0.6, 0.08, states) + 0.01 * rng.standard_normal(states)  # lr S - 2 along a run into EoS
    features = {"lr_S_minus_2": x, "lr_S": x + 2, "loss": np.linspace(0.4, 0.05, states)}
    values = -3.0 * np.maximum(x, 0) + 0.01 * rng.standard_normal(states)
    formula = gate_formula({k: torch.tensor(v) for k, v in features.items()}, torch.tensor(values))
    gate = Gate({k: tuple(v.tolist()) for k, v in features.items()}, tuple(values.tolist()), formula)
    terms = [
        TermSummary("gradS", 0.55, float(values.mean()), None, None, TERMS["gradS"].approximation, gate),
        TermSummary("gradScrit", 0.21, -0.8, 0.2, None, TERMS["gradScrit"].approximation),
        TermSummary("Hg", 0.04, -0.45, 0.03, -0.5, TERMS["Hg"].approximation),
    ]
    wsteps = np.linspace(0, 1980, windows).round().astype(int).tolist()
    esteps = np.linspace(20, 2000, ends).round().astype(int).tolist()
    who = ("observed", "physics", "hybrid")
    curves = {
        "distance": {
            "step": wsteps,
            "physics": rng.uniform(0.1, 1, windows).tolist(),
            "hybrid": rng.uniform(0.01, 0.1, windows).tolist(),
        },
        "loss": {"step": esteps, **{k: rng.uniform(0.05, 0.4, ends).tolist() for k in who}},
        "sharpness": {"step": esteps, **{k: rng.uniform(15, 25, ends).tolist() for k in who}},
    }
    contributions = {"step": steps.tolist(), **{t.name: rng.uniform(1e-5, 1e-3, states).tolist() for t in terms}}
    return Report("mlp-digits", 0.1, "gradient", 0.175, 0.035, terms, curves=curves, contributions=contributions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/report.json")
    args = parser.parse_args()
    stored = json.dumps(eos_sized_report().to_dict())

    def figures_png() -> None:
        import io

        for fig in Report.from_dict(json.loads(stored)).figures().values():
            fig.savefig(io.BytesIO(), format="png", dpi=100)
            plt.close(fig)

    loaded = Report.from_dict(json.loads(stored))
    forms = {
        "load (from_dict)": lambda: Report.from_dict(json.loads(stored)),
        "str": lambda: str(loaded),
        "to_markdown": loaded.to_markdown,
        "to_latex": loaded.to_latex,
        "_repr_html_": loaded._repr_html_,
        "to_dict": loaded.to_dict,
        "figures (+ PNG)": figures_png,
    }
    times = {}
    for name, fn in forms.items():
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    text_total = sum(v for k, v in times.items() if not k.startswith("figures"))
    print(f"{'output form':20s} {'seconds':>10s}")
    for name, t in times.items():
        print(f"{name:20s} {t:10.4f}")
    print(f"{'all text forms':20s} {text_total:10.4f}")
    print(f"{'everything':20s} {text_total + times['figures (+ PNG)']:10.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        out,
        {
            "stored_bytes": len(stored),
            "seconds": times,
            "text_total": text_total,
            "total": text_total + times["figures (+ PNG)"],
        },
        indent=1,
    )
    print(f"wrote {out} ({len(stored)} bytes of stored report)")


if __name__ == "__main__":
    main()
