"""The curated top level (``import neuralflow as nf``) and the public contract of the design notes."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import neuralflow as nf
from neuralflow.fit import ShootingOptions, fit_loss

#: The public API of the design notes (the contract users, examples and acceptance checks rely on), as
#: ``(dotted path, names it must have)``; ``""`` is the top level.
CONTRACT: dict[str, tuple[str, ...]] = {
    "": (
        "run_gd",
        "Trajectory",
        "Approximation",
        "simulate",
        "Hybrid",
        "fit",
        "load",
        "save",
        "Report",
        "OscillationFlow",
        "sweep",
        "compare",
        "ladder",
        "build_report",
        "Solver",
        "GradientFlow",
        "ModifiedFlow",
        "PrincipalFlow",
        "CentralFlow",
        "TermLibrary",
        "NeuralCorrection",
        "HiddenStateLibrary",
        "LatentCorrection",
        "NeuralflowError",
    ),
    "problems": ("mlp_digits", "zhu_quartic", "quadratic", "from_module", "from_function", "Problem"),
    "flows": ("GradientFlow", "ModifiedFlow", "PrincipalFlow", "CentralFlow", "OscillationFlow", "simulate", "FLOWS"),
    "corrections": ("TermLibrary", "NeuralCorrection", "TERMS"),
    "Trajectory": ("load", "save", "smoothed"),
    "FitResult": ("report", "save"),
    "Report": ("to_markdown", "to_latex", "_repr_html_"),
}

#: Keyword arguments the design notes call public entry points with.
KEYWORDS = {
    "run_gd": ("lr", "steps", "eig_every", "n_eigs", "progress", "noise", "noise_seed"),
    "fit": ("window", "target", "method", "max_iters", "progress"),
}


def test_every_name_in_all_resolves_once():
    assert len(set(nf.__all__)) == len(nf.__all__)
    missing = [n for n in nf.__all__ if not hasattr(nf, n)]
    assert missing == []


def test_the_design_notes_public_names_exist():
    missing = []
    for where, names in CONTRACT.items():
        owner = nf
        for part in filter(None, where.split(".")):
            owner = getattr(owner, part)
        missing += [f"nf.{where}.{n}".replace("..", ".") for n in names if not hasattr(owner, n)]
    assert missing == []
    assert {n for n in CONTRACT[""] if not n.startswith("_")} <= set(nf.__all__)


def test_the_design_notes_keywords_exist():
    for name, keywords in KEYWORDS.items():
        params = inspect.signature(getattr(nf, name)).parameters
        assert set(keywords) <= set(params), (name, set(keywords) - set(params))


def test_top_level_names_are_the_stage_objects():
    """``nf.X`` is the stage's own object, not a copy: one class to subclass, one registry to extend."""
    assert nf.GradientFlow is nf.flows.GradientFlow and nf.CentralFlow is nf.flows.CentralFlow
    assert nf.TermLibrary is nf.corrections.TermLibrary and nf.TERMS is nf.corrections.TERMS
    assert nf.FLOWS is nf.flows.FLOWS and nf.Approximation is nf.flows.Approximation


def test_renamed_keywords_keep_their_old_names_with_a_warning():
    """``simulate``/``compare``: ``solver=`` (was ``method=``, the fit's gradient method) and ``half_width=`` (was
    ``window=``, the fit's shooting window) give the same result; the old names warn, both at once is an error."""
    p = nf.problems.zhu_quartic()
    t = torch.arange(0.0, 6.0, dtype=torch.float64)
    flow = nf.GradientFlow(p, 0.1)
    new = nf.simulate(flow, p.theta0, t, solver="euler", step_size=0.5)
    with pytest.warns(DeprecationWarning, match="method= is now solver="):
        old = nf.simulate(flow, p.theta0, t, method="euler", step_size=0.5)
    assert torch.equal(new, old)
    assert torch.equal(new, nf.simulate(flow, p.theta0, t, solver=nf.Solver("euler", 0.5)))
    assert not torch.equal(new, nf.simulate(flow, p.theta0, t, solver="euler", step_size=1.0))
    with pytest.raises(nf.InputError, match="pass solver= only"):
        nf.simulate(flow, p.theta0, t, solver="euler", method="rk4")

    traj = nf.run_gd(p, 0.1, 8)
    wide = nf.compare(traj, flow, half_width=3, solver="euler", n_probe=2)
    with pytest.warns(DeprecationWarning, match="window= is now half_width="):
        old = nf.compare(traj, flow, window=3, solver="euler", n_probe=2)
    assert torch.equal(wide.gd_loss_avg, old.gd_loss_avg) and old.half_width == 3
    assert not torch.equal(wide.gd_loss_avg, nf.compare(traj, flow, solver="euler", n_probe=2).gd_loss_avg)


def test_term_library_feature_values_keep_their_old_method_name_with_a_warning():
    """``TermLibrary.feature_values(thetas)`` is the evaluated matrix; ``features`` is the constructor's names."""
    p = nf.problems.zhu_quartic()
    lib = nf.TermLibrary(p, 0.1, terms=["Hg"], gated=True, features=["lr_S", "loss"])
    states = p.theta0[None].repeat(2, 1)
    values = lib.feature_values(states)
    assert values.shape == (2, 2) and torch.allclose(values[:, 1], p.loss(p.theta0).detach().expand(2))
    with pytest.warns(DeprecationWarning, match="feature_values"):
        assert torch.equal(lib.features(states), values)


@pytest.mark.parametrize("function", [nf.fit, fit_loss, nf.fit_runs])
def test_fit_options_are_keyword_only_after_the_data(function):
    """As ``torchdiffeq.odeint(func, y0, t, *, ...)``: the model and the data by position, every option by name."""
    params = list(inspect.signature(function).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional in (["model", "trajectory"], ["model", "trajectories"])
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[len(positional) :])


def test_the_shooting_options_are_one_dataclass_with_fits_defaults():
    """fit and fit_loss build one ShootingOptions; each of its fields is a keyword of both with the same default."""
    for function in (nf.fit, fit_loss):
        params = inspect.signature(function).parameters
        for f in dataclasses.fields(ShootingOptions):
            if f.name == "extra_start" and function is fit_loss:
                continue  # fit_loss evaluates the measured start only
            assert f.name in params, (function.__name__, f.name)
            assert params[f.name].default == f.default, (function.__name__, f.name)
    assert ShootingOptions.pick({"window": 7, "progress": True}) == ShootingOptions(window=7)
