"""Reliability probes: bad arguments, bad files, bit flips of headers and tensors, interruptions.

Every probe is classified as *handled* (a clear ``NeuralflowError``, identical content, or nothing
lost), *traceback* (another exception type), *silent wrong result* (the call returned, but with a
wrong value or different content) or *lost work* (an interruption that kept nothing, or left a
damaged file). The README's reliability table is this script's output. Writes
``results/reliability.json``.

    python benchmarks/reliability.py [--fit-header-bits all|N] [--kills 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow import _io, checkpoint
from neuralflow.corrections import TermLibrary
from neuralflow.errors import NeuralflowError
from neuralflow.provenance import write_json

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
F64 = torch.float64


def expect_error(call) -> str:
    try:
        call()
    except NeuralflowError:
        return "handled"
    except Exception:  # noqa: BLE001 - counting what escapes is the point
        return "traceback"
    return "silent wrong result"


# ----------------------------------------------------------------------------------------- bad arguments


def bad_arguments() -> Counter:
    zhu = nf.problems.zhu_quartic()
    tiny = nf.problems.mlp_digits(n=30, widths=(4,))
    gd = lambda **kw: lambda: nf.run_gd(**{"problem": zhu, "lr": 0.1, "steps": 3, "progress": False, **kw})
    probes = [gd(lr=v) for v in (-0.1, 0, math.nan, math.inf, True, "0.1", None)]
    probes += [gd(steps=v) for v in (0, -1, 1.5, True, "3")]
    probes += [gd(eig_every=v) for v in (-1, 0.5, True)] + [gd(n_eigs=v) for v in (0, 3, 1.0)]
    probes += [gd(eig_tol=v) for v in (math.nan, -1.0, 0.0, math.inf, True)] + [gd(eig_retries=v) for v in (-1, 0.5)]
    probes += [gd(store_every=v) for v in (0, -2)] + [gd(checkpoint_every=5), gd(checkpoint_every=-1)]
    probes += [
        gd(theta0=t)
        for t in (
            torch.tensor([math.nan, 1.0], dtype=F64),
            torch.tensor([1.0, math.inf], dtype=F64),
            torch.ones(3, dtype=F64),
            torch.ones(2, dtype=torch.float32),
            [1.0, 2.0],
        )
    ]
    probes += [lambda n=n: nf.problems.mlp_digits(n=n, widths=(4,)) for n in (0, -1, 5000, 2.5)]
    probes += [lambda w=w: nf.problems.mlp_digits(n=10, widths=w) for w in ((0,), (-3,))]
    probes += [lambda: nf.problems.mlp_digits(n=10, activation="exp")]
    probes += [lambda d=d: nf.problems.mlp_digits(n=10, widths=(4,), dtype=d) for d in (torch.float16, torch.bfloat16)]
    probes += [
        lambda: nf.problems.quadratic([[1.0, 2.0], [0.0, 1.0]]),
        lambda: nf.problems.quadratic([[math.nan]]),
        lambda: nf.problems.quadratic([1.0, 2.0]),
        lambda: nf.problems.scalar_factorization(0),
        lambda: nf.problems.zhu_quartic(theta0=(1.0,)),
        lambda: nf.problems.from_function(3, torch.ones(2)),
    ]
    lin = torch.nn.Linear(3, 2, dtype=F64)
    x = torch.randn(6, 3, dtype=F64)
    probes += [
        lambda y=y, loss=loss: nf.problems.from_module(lin, x, y, loss=loss)
        for y in (torch.randn(6, 1, dtype=F64), torch.randn(6, dtype=F64), torch.randn(6, 2, 1, dtype=F64))
        for loss in ("mse", "ce")
    ]
    probes += [
        lambda: nf.problems.from_module(lin, x, torch.randn(5, 2, dtype=F64)),
        lambda: nf.problems.from_module(lin, x, torch.randn(6, 2, dtype=F64), loss="l1"),
    ]
    for d in (
        {"name": "warp"},
        {"name": "mlp-digits", "n": "60"},
        {"name": "mlp-digits", "dtype": "manual_seed"},
        {"name": "mlp-digits", "widths": [100000, 100000]},
        {"name": "zhu-quartic", "colour": 1},
        {"name": "scalar-factorization", "depth": 10**9},
        {"name": "mlp-digits", "n": True},
    ):
        probes.append(lambda d=d: nf.problems.make(d))
    traj = nf.run_gd(tiny, 0.05, 12, eig_every=0, progress=False)
    other = nf.problems.mlp_digits(n=20, widths=(4,))

    def fit(problem=tiny, lr=0.05, t=traj, **kw):
        model = nf.Hybrid(nf.flows.GradientFlow(problem, lr), TermLibrary(problem, lr, terms=["Hg"]))
        return lambda: nf.fit(model, t, **{"window": 4, "method": "regression", "progress": False, **kw})

    probes += [fit(val_fraction=v) for v in (-0.1, 1.0, 1.5, math.nan)]
    probes += [fit(window=v) for v in (0, -4, 100)] + [
        fit(target="mean"),
        fit(method="magic"),
        fit(problem=other),
        fit(lr=0.1),
        fit(exclude=[(5, 2)]),
    ]
    probes += [lambda r=r: nf.flows.CentralFlow(zhu, 0.1, relaxation=r) for r in (0, -1.0, math.nan, math.inf)]
    probes += [lambda c=c: nf.flows.CentralFlow(zhu, 0.1, critical=c) for c in (0, 3, math.nan)]
    probes += [lambda: TermLibrary(zhu, 0.1, terms=["nonsense"]), lambda: nf.flows.ModifiedFlow(zhu, 0.1, order=7)]
    return Counter(expect_error(p) for p in probes)


# --------------------------------------------------------------------------------------------- bad files


def craft(path: Path, kind: str, meta, tensors, **header_fields) -> Path:
    """A forged file: any header, with a checksum that matches it."""
    from safetensors.torch import save

    header = {
        "kind": kind,
        "format_version": _io.FORMAT_VERSION,
        "neuralflow_version": nf.__version__,
        "torch_version": torch.__version__,
        "meta": meta,
        **header_fields,
    }
    header["sha256"] = _io.digest(header, tensors)
    path.write_bytes(save(tensors, metadata={"neuralflow": json.dumps(header)}))
    return path


def bad_files(tmp: Path, small: nf.Trajectory) -> Counter:
    good = small.save(tmp / "good.nft")
    data = good.read_bytes()
    tensors, header = _io.read(good, "trajectory")
    meta = header["meta"]
    results = Counter()
    edits = [("lr", v) for v in (-0.02, 0, math.nan, math.inf, True, "0.2", None, [0.2])]
    edits += [
        ("problem", v)
        for v in (
            {"name": "mlp-digits", "n": 60, "widths": [100000, 100000]},
            {"name": "mlp-digits", "dtype": "float16"},
            {"name": "mlp-digits", "dtype": "manual_seed"},
            {"name": "zhu-quartic", "theta0": [1.0]},
            {"name": "zhu-quartic", "colour": "red"},
            {"name": 7},
            [1, 2],
            "zhu",
        )
    ]
    edits += [("meta", v) for v in ({"eig_tol": -1.0}, {"warp": 1}, {"eig_every": 1.5}, {"smoothed": "yes"})]
    for key, value in edits:
        path = craft(tmp / "forged.nft", "trajectory", {**meta, key: value}, tensors)

        def load_and_build(path=path):
            t = nf.Trajectory.load(path)
            nf.problems.make(t.problem)  # what compare and fit do next

        results[expect_error(load_and_build)] += 1
    for fields in ({"format_version": v} for v in (0, -1, True, "1", 1.5, None, 99)):
        results[
            expect_error(lambda f=fields: nf.Trajectory.load(craft(tmp / "v.nft", "trajectory", meta, tensors, **f)))
        ] += 1
    deep = tmp / "deep.nft"
    from safetensors.torch import save

    deep.write_bytes(
        save(tensors, metadata={"neuralflow": '{"kind": "trajectory", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"})
    )
    results[expect_error(lambda: nf.Trajectory.load(deep))] += 1
    for name, bad in (
        ("iterates", tensors["iterates"].half()),
        ("steps", tensors["steps"].double()),
        ("loss", tensors["loss"][:, None]),
        ("iterates", tensors["iterates"][:-1]),
    ):
        path = craft(tmp / "t.nft", "trajectory", meta, {**tensors, name: bad})
        results[expect_error(lambda p=path: nf.Trajectory.load(p))] += 1
    cut = tmp / "cut.nft"
    for n in range(0, len(data), max(1, len(data) // 200)):
        cut.write_bytes(data[:n])
        results[expect_error(lambda: nf.Trajectory.load(cut))] += 1
    junk = tmp / "junk.nft"
    rng = random.Random(0)
    for _ in range(200):
        junk.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400))))
        results[expect_error(lambda: nf.Trajectory.load(junk))] += 1
    torch.save({"x": 1}, tmp / "pickle.nft")
    results[expect_error(lambda: nf.Trajectory.load(tmp / "pickle.nft"))] += 1
    results[expect_error(lambda: checkpoint.load(good))] += 1  # wrong kind
    results[expect_error(lambda: nf.Trajectory.load(tmp / "missing.nft"))] += 1
    return results


# ---------------------------------------------------------------------------------------------- bit flips


def flips(data: bytes, bits, read, same) -> Counter:
    results = Counter()
    for bit in bits:
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        try:
            out = read(bytes(b))
        except NeuralflowError:
            results["handled"] += 1
            continue
        except Exception:  # noqa: BLE001
            results["traceback"] += 1
            continue
        results["handled" if same(out) else "silent wrong result"] += 1
    return results


def bit_flips(tmp: Path, small: nf.Trajectory, fit_header_bits: str) -> dict[str, Counter]:
    data = small.save(tmp / "small.nft").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    ref = nf.Trajectory.from_bytes(data)

    def same_traj(t):
        fields = ("steps", "iterates", "loss", "grad_norm", "sharpness", "update_u")
        return json.dumps([t.lr, t.problem, t.meta]) == json.dumps([ref.lr, ref.problem, ref.meta]) and all(
            torch.equal(getattr(t, f).nan_to_num(7), getattr(ref, f).nan_to_num(7)) for f in fields
        )

    out = {
        ".nft header": flips(data, range(8 * (8 + n)), nf.Trajectory.from_bytes, same_traj),
        ".nft tensors": flips(data, range(8 * (8 + n), 8 * len(data)), nf.Trajectory.from_bytes, same_traj),
    }
    problem = nf.problems.zhu_quartic(theta0=(1.5, 0.5))
    traj = nf.run_gd(problem, 0.1, 12, progress=False)
    model = nf.Hybrid(nf.flows.GradientFlow(problem, 0.1), TermLibrary(problem, 0.1, terms=["Hg"]))
    fdata = checkpoint.save(
        nf.fit(model, traj, window=4, method="regression", progress=False), tmp / "fit.nff"
    ).read_bytes()
    (fn,) = struct.unpack("<Q", fdata[:8])
    ref_t, ref_h = _io.parse(fdata, "fit", "fit.nff")

    def same_fit(parsed):
        t, h = parsed
        return (
            json.dumps(h) == json.dumps(ref_h)
            and t.keys() == ref_t.keys()
            and all(torch.equal(t[k].nan_to_num(7), ref_t[k].nan_to_num(7)) for k in t)
        )

    header_bits = range(8 * (8 + fn))
    if fit_header_bits != "all":
        header_bits = random.Random(1).sample(list(header_bits), int(fit_header_bits))
    tensor_bits = range(8 * (8 + fn), 8 * len(fdata))
    read_fit = lambda b: _io.parse(b, "fit", "fit.nff")
    out[".nff header"] = flips(fdata, header_bits, read_fit, same_fit)
    out[".nff tensors"] = flips(fdata, tensor_bits, read_fit, same_fit)
    return out


# ------------------------------------------------------------------------------------------ interruptions

CHILD = """
import sys, torch
torch.set_num_threads(1)
import neuralflow as nf
p = nf.problems.mlp_digits(n=40, widths=(6,))
nf.run_gd(p, 0.3, 400, progress=False, checkpoint_every=10, resume=sys.argv[1])
"""


def identical(a: nf.Trajectory, b: nf.Trajectory) -> bool:
    pairs = [(a.iterates, b.iterates)] + [(a.history[k], b.history[k]) for k in a.history]
    return a.history.keys() == b.history.keys() and all(
        x.shape == y.shape and bool(((x == y) | ((x != x) & (y != y))).all()) for x, y in pairs
    )


def interruptions(tmp: Path, kills: int) -> Counter:
    results = Counter()
    problem = nf.problems.mlp_digits(n=40, widths=(6,))
    reference = nf.run_gd(problem, 0.3, 400, progress=False)
    rng = random.Random(3)
    for i in range(kills):  # SIGKILL of a resumable run at a random moment
        ckpt = tmp / f"kill{i}.ckpt"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt)], env=ENV)
        while not ckpt.exists() and child.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.6))
        child.kill()
        child.wait()
        resumed = nf.run_gd(problem, 0.3, 400, progress=False, checkpoint_every=10, resume=ckpt)
        leftovers = [p for p in tmp.iterdir() if p.name.startswith(f".{ckpt.name}.")]
        results["handled" if identical(resumed, reference) and not leftovers else "lost work"] += 1
    for sig in (signal.SIGTERM, signal.SIGINT):  # the command line saves what it has
        out, ckpt = tmp / f"cli{sig}.nft", tmp / f"cli{sig}.ckpt"
        args = [
            sys.executable,
            "-m",
            "neuralflow",
            "run-gd",
            "--n",
            "40",
            "--widths",
            "6",
            "--lr",
            "0.3",
            "--steps",
            "100000",
            "--out",
            str(out),
            "--resume",
            str(ckpt),
            "--checkpoint-every",
            "10",
        ]
        child = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)
        while not ckpt.exists() and child.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        child.send_signal(sig)
        _, err = child.communicate(timeout=300)
        try:
            partial = nf.Trajectory.load(out)
            ok = (
                child.returncode == 130
                and str(out) in err
                and identical(partial, nf.run_gd(problem, 0.3, int(partial.history["step"][-1]), progress=False))
            )
        except NeuralflowError:
            ok = False
        results["handled" if ok else "lost work"] += 1
    for _ in range(kills):  # SIGKILL during the atomic save of a large file: the previous file survives
        path = tmp / "big.nft"
        nf.run_gd(problem, 0.3, 5, progress=False).save(path)
        before = path.read_bytes()
        code = (
            "import torch, neuralflow as nf, sys; from neuralflow import _io\n"
            "_io.write(sys.argv[1], 'trajectory', {'x': torch.zeros(60_000_000)}, {'lr': 0.1})"
        )
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], env=ENV)
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".big.nft.nf") for p in tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        child.kill()
        child.wait()
        try:
            intact = path.read_bytes() == before and nf.Trajectory.load(path) is not None
        except NeuralflowError:
            intact = False
        nf.run_gd(problem, 0.3, 5, progress=False).save(path)  # the next save removes the killed one's temporary
        clean = not any(p.name.startswith(".big.nft.nf") for p in tmp.iterdir())
        results["handled" if intact and clean else "lost work"] += 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-header-bits", default="all", help="'all' or how many sampled bits of the .nff header")
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table: dict[str, Counter] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        small = nf.run_gd(nf.problems.zhu_quartic(), 0.2, 4, progress=False)
        table["bad arguments"] = bad_arguments()
        table["bad files (forged with valid checksums, truncated, junk)"] = bad_files(tmp, small)
        for what, counts in bit_flips(tmp, small, args.fit_header_bits).items():
            table[f"single-bit flips, {what}"] = counts
        table["interruptions (SIGKILL, SIGTERM, Ctrl-C, kill during save)"] = interruptions(tmp, args.kills)
    columns = ("handled", "traceback", "silent wrong result", "lost work")
    print(f"{'category':<62}{'probes':>9}" + "".join(f"{c:>21}" for c in columns))
    for category, counts in table.items():
        print(f"{category:<62}{sum(counts.values()):>9}" + "".join(f"{counts.get(c, 0):>21}" for c in columns))
    print(f"({time.perf_counter() - t0:.0f} s)")
    out = write_json(HERE / "results" / "reliability.json", {k: dict(v) for k, v in table.items()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
