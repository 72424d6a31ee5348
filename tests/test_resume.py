"""Resumable runs and interruptions that lose no work: run_gd(checkpoint_every=, resume=) continues bit for bit,
also after a real SIGKILL; Ctrl-C and SIGTERM keep the trajectory or the best fit so far."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import neuralflow as nf
import neuralflow.gd as gd
from neuralflow import _io
from neuralflow.cli import main
from neuralflow.errors import FileFormatError, InputError, Interrupted

LR = 0.3


@pytest.fixture(scope="module")
def problem():
    return nf.problems.mlp_digits(n=40, widths=(6,))


def _identical(a: nf.Trajectory, b: nf.Trajectory) -> bool:
    """Bit for bit (NaN where NaN)."""
    pairs = [(a.iterates, b.iterates), (a.steps, b.steps)]
    pairs += [(a.history[k], b.history[k]) for k in a.history]
    return (
        a.history.keys() == b.history.keys()
        and a.meta == b.meta
        and all(
            x.dtype == y.dtype
            and x.shape == y.shape
            and bool((x == y).logical_or(x != x).logical_and((x != x) == (y != y)).all())
            for x, y in pairs
        )
    )


def _interrupt_at(monkeypatch, step: int) -> None:
    real = gd.take_step

    def step_or_interrupt(problem, run, k, *args):
        if k == step:
            raise KeyboardInterrupt
        return real(problem, run, k, *args)

    monkeypatch.setattr(gd, "take_step", step_or_interrupt)


@pytest.mark.parametrize("noise", [0.0, 1e-4])
@pytest.mark.parametrize("stop", [3, 17, 25])
def test_an_interrupted_run_resumes_bit_for_bit(problem, tmp_path, monkeypatch, stop, noise):
    """With injected noise too: its generator and the oscillation recorder's last updates are in the checkpoint."""
    kw = {"store_every": 2, "progress": False, "noise": noise, "noise_seed": 5, "n_eigs": 2}
    full = nf.run_gd(problem, LR, 30, **kw)
    ckpt = tmp_path / "run.ckpt"
    _interrupt_at(monkeypatch, stop)
    with pytest.raises(Interrupted, match=f"interrupted at step {stop}; its state is in .*run.ckpt") as err:
        nf.run_gd(problem, LR, 30, **kw, checkpoint_every=7, resume=ckpt)
    assert int(err.value.partial.history["step"][-1]) == stop - 1 and err.value.checkpoint == ckpt
    monkeypatch.undo()
    assert _io.read(ckpt, "gd-checkpoint")[1]["meta"]["next_step"] == stop
    resumed = nf.run_gd(problem, LR, 30, **kw, checkpoint_every=7, resume=ckpt)
    assert _identical(resumed, full)
    assert bool(full.history["oscillation"][2:-3].isfinite().all())  # the recorder's series are compared too
    assert _identical(nf.run_gd(problem, LR, 30, **kw, resume=ckpt), full)  # finished


def test_a_checkpoint_of_another_run_or_start_is_refused(problem, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    nf.run_gd(problem, LR, 6, progress=False, checkpoint_every=2, resume=ckpt)
    with pytest.raises(InputError, match=r"another run; .* lr \(file 0.3, now 0.2\)"):
        nf.run_gd(problem, 0.2, 6, progress=False, resume=ckpt)
    with pytest.raises(InputError, match="another theta0"):
        nf.run_gd(problem, LR, 6, progress=False, resume=ckpt, theta0=problem.theta0 + 1)
    with pytest.raises(InputError, match="pass resume=path"):
        nf.run_gd(problem, LR, 6, progress=False, checkpoint_every=2)
    ckpt.write_bytes(ckpt.read_bytes()[:-16])
    with pytest.raises(FileFormatError, match="run.ckpt"):
        nf.run_gd(problem, LR, 6, progress=False, resume=ckpt)


_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import neuralflow as nf
    p = nf.problems.mlp_digits(n=40, widths=(6,))
    nf.run_gd(p, 0.3, int(sys.argv[2]), progress=False, checkpoint_every=int(sys.argv[3]), resume=sys.argv[1])
""")


def _kill_when_checkpointed(ckpt, steps, every, after, tmp_path, sig=signal.SIGKILL):
    """Start a run in a subprocess, SIGKILL it ``after`` seconds after its first checkpoint; the step it had reached."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), str(steps), str(every)], env=env)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(after)
    child.send_signal(sig)
    child.wait()
    return _io.read(ckpt, "gd-checkpoint")[1]["meta"]["next_step"]


def test_a_run_killed_with_sigkill_resumes_bit_for_bit(problem, tmp_path):
    steps, every = 400, 10
    ckpt = tmp_path / "run.ckpt"
    after = float(torch.rand(1, generator=torch.Generator().manual_seed(12))) * 0.5
    reached = _kill_when_checkpointed(ckpt, steps, every, after, tmp_path)
    assert 0 < reached < steps + 1, "the child finished before it was killed; the test proves nothing"
    resumed = nf.run_gd(problem, LR, steps, progress=False, checkpoint_every=every, resume=ckpt)
    assert _identical(resumed, nf.run_gd(problem, LR, steps, progress=False))
    assert not list(tmp_path.glob(".*.tmp"))  # a temporary file of the killed write was cleaned up


def test_stale_temporary_files_of_our_own_writes_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    ours = tmp_path / f".run.nft.nf{pid}-abc123_x.tmp"
    live = tmp_path / f".run.nft.nf{os.getpid()}-zzz.tmp"
    other_target = tmp_path / f".other.nft.nf{pid}-abc.tmp"
    user = tmp_path / ".run.nft.mine.tmp"
    for path in (ours, live, other_target, user):
        path.write_bytes(b"x" * 100)
    nf.run_gd(nf.problems.zhu_quartic(), 0.1, 3, progress=False).save(tmp_path / "run.nft")
    assert not ours.exists()
    assert live.exists() and other_target.exists() and user.exists()


def test_sigterm_makes_run_gd_save_the_trajectory_so_far_and_say_where(tmp_path):
    out, ckpt = tmp_path / "run.nft", tmp_path / "run.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
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
        "5",
    ]
    child = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    while not ckpt.exists() and child.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert "saved the trajectory so far" in err and str(out) in err and str(ckpt) in err
    partial = nf.Trajectory.load(out)
    meta = _io.read(ckpt, "gd-checkpoint")[1]["meta"]
    assert int(partial.history["step"][-1]) == meta["next_step"] - 1 > 0


def test_ctrl_c_in_a_fit_keeps_the_best_fit_so_far(tmp_path, monkeypatch, capsys):
    fit_module = importlib.import_module("neuralflow.fit.optimisers")
    run = tmp_path / "run.nft"
    assert (
        main(["run-gd", "--problem", "scalar-factorization", "--lr", "0.02", "--steps", "60", "--out", str(run)]) == 0
    )
    real = fit_module.gauss_newton

    def two_iterations_then_ctrl_c(obj, optimizer, iters, tol, learning_rate, record, **kw):
        calls = []

        def record_then_interrupt(*args):
            calls.append(args)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return record(*args)

        return real(obj, optimizer, iters, tol, learning_rate, record_then_interrupt, **kw)

    monkeypatch.setattr(fit_module, "gauss_newton", two_iterations_then_ctrl_c)
    out = tmp_path / "fit.nff"
    code = main(
        ["fit", str(run), "--terms", "Hg", "--window", "5", "--method", "direct", "--max-iters", "5", "--out", str(out)]
    )
    assert code == 130
    assert f"saved the best fit so far (1 iterations) to {out}" in capsys.readouterr().err
    saved = nf.load(out)
    assert saved.settings["interrupted_after"] == 1 and len(saved.history) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["run-gd", "--problem", "zhu-quartic", "--steps", "5", "--out", "{file}/run.nft"],
        ["run-gd", "--problem", "zhu-quartic", "--steps", "5", "--out", "{dir}"],
        ["run-gd", "--problem", "zhu-quartic", "--steps", "5", "--resume", "{file}/x.ckpt", "--out", "{dir}/ok.nft"],
        ["compare", "{run}", "--out", "{file}/x.png"],
        ["compare", "{run}", "--json", "{file}/x.json", "--out", "{dir}/ok.png"],
        ["fit", "{run}", "--out", "{file}/fit.nff"],
        ["report", "{fit}", "--figures", "{file}"],
        ["report", "{fit}", "--markdown", "{file}/r.md", "--figures", "{dir}/figs"],
        ["demo", "--out", "{file}"],
    ],
)
def test_unwritable_outputs_are_refused_before_any_computation(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "a-file").write_text("not a folder")
    run = nf.run_gd(nf.problems.zhu_quartic(), 0.1, 10, progress=False).save(tmp_path / "run.nft")
    fit_path = tmp_path / "fit.nff"
    # the command line's own references (it imports these at the top), and the checkpoint's reader
    for module, name in (
        ("cli.runs", "run_gd"),
        ("cli.fits", "fit"),
        ("cli.runs", "compare"),
        ("checkpoint", "stored_report"),
        ("cli.batch", "run_demo"),
    ):
        where = importlib.import_module(f"neuralflow.{module}")
        monkeypatch.setattr(where, name, _refusing(getattr(where, name)))
    words = [w.format(file=tmp_path / "a-file", dir=tmp_path, run=run, fit=fit_path) for w in command]
    assert main(words) == 2
    assert "cannot write" in capsys.readouterr().err


def _refusing(fn):
    """``fn``'s signature (the command line's options come from it), failing the test if it is called."""

    @functools.wraps(fn)
    def computed(*args, **kwargs):
        pytest.fail("computed before checking the outputs")

    return computed


def test_a_demo_rerun_does_not_mix_files_of_two_runs(tmp_path):
    from neuralflow.demo import OUTPUT_FILES, clear_previous_run

    for name in (*OUTPUT_FILES, "report_gates.png", "notes.txt"):
        (tmp_path / name).write_text("an earlier run")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _gn_fit(resume=None):
    problem = nf.problems.scalar_factorization(3)
    traj = nf.run_gd(problem, 0.02, 60, eig_every=0, progress=False)
    model = nf.Hybrid(
        nf.flows.GradientFlow(problem, 0.02), nf.corrections.TermLibrary(problem, 0.02, terms=["Hg", "H2g"])
    )
    return nf.fit(
        model,
        traj,
        window=5,
        method="direct",
        init="current",
        max_iters=4,
        patience=10,
        tol=0.0,
        progress=False,
        resume=resume,
    )


def _same_fit(a, b) -> bool:
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("time", "n_function_evals")} for row in h]
    return (
        a.coefficients == b.coefficients
        and a.uncertainty == b.uncertainty
        and strip(a.history) == strip(b.history)
        and torch.equal(a.window_errors, b.window_errors)
    )


@pytest.mark.parametrize("stop_after", [0, 2])
def test_an_interrupted_gauss_newton_fit_resumes_bit_for_bit(tmp_path, monkeypatch, stop_after):
    fit_module = importlib.import_module("neuralflow.fit.optimisers")
    full = _gn_fit()
    assert len(full.history) == 4  # iterations 0..3; the last one stops on xtol
    real = fit_module.gauss_newton

    def interrupt_after(*args, after=None, **kw):
        def save_then_maybe_stop(it, p, mu):
            after(it, p, mu)
            if it == stop_after:
                raise KeyboardInterrupt

        return real(*args, after=save_then_maybe_stop, **kw)

    monkeypatch.setattr(fit_module, "gauss_newton", interrupt_after)
    state = tmp_path / "fit.state"
    with pytest.raises(Interrupted) as err:
        _gn_fit(resume=state)
    assert len(err.value.partial.history) == stop_after + 1
    monkeypatch.undo()
    resumed = _gn_fit(resume=state)
    assert _same_fit(resumed, full)
    with pytest.raises(InputError, match="another fit"):
        problem = nf.problems.scalar_factorization(3)
        traj = nf.run_gd(problem, 0.02, 60, eig_every=0, progress=False)
        model = nf.Hybrid(
            nf.flows.GradientFlow(problem, 0.02), nf.corrections.TermLibrary(problem, 0.02, terms=["Hg", "H2g"])
        )
        nf.fit(model, traj, window=10, method="direct", init="current", max_iters=4, progress=False, resume=state)
