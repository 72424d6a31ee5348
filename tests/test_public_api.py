"""The curated top level (``import neuralflow as nf``) and the public contract of the design notes."""

from __future__ import annotations

import inspect

import neuralflow as nf

#: The public API of the design notes (the contract users, examples and acceptance checks rely on), as
#: ``(dotted path, names it must have)``; ``""`` is the top level.
CONTRACT: dict[str, tuple[str, ...]] = {
    "": ("run_gd", "Trajectory", "Approximation", "simulate", "Hybrid", "fit", "load", "save", "Report",
         "OscillationFlow", "sweep", "compare", "ladder", "build_report", "Solver", "GradientFlow", "ModifiedFlow",
         "PrincipalFlow", "CentralFlow", "TermLibrary", "NeuralCorrection", "HiddenStateLibrary", "LatentCorrection",
         "NeuralflowError"),
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
