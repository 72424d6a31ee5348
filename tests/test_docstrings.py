"""Every public entry point documents each of its parameters in a numpydoc ``Parameters`` section.

The API reference renders docstrings with the numpy style; a parameter missing from the section (or a section
naming a parameter the signature no longer has) is a documentation bug this test catches.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
from typing import Any

import pytest

#: (module, dotted name) of each public entry point whose docstring must carry a ``Parameters`` section.
ENTRY_POINTS = [
    ("neuralflow.gd", "run_gd"),
    ("neuralflow.trajectory", "Trajectory"),
    ("neuralflow.trajectory", "Trajectory.eos_transients"),
    ("neuralflow.trajectory", "Trajectory.from_bytes"),
    ("neuralflow.trajectory", "Trajectory.load"),
    ("neuralflow.trajectory", "Trajectory.plot"),
    ("neuralflow.trajectory", "Trajectory.save"),
    ("neuralflow.trajectory", "Trajectory.slice"),
    ("neuralflow.trajectory", "Trajectory.to"),
    ("neuralflow.problems", "mlp_digits"),
    ("neuralflow.problems", "quadratic"),
    ("neuralflow.problems", "zhu_quartic"),
    ("neuralflow.problems", "from_module"),
    ("neuralflow.problems", "from_function"),
    ("neuralflow.problems", "cnn_digits"),
    ("neuralflow.problems", "lstm_recall"),
    ("neuralflow.flows.gradient", "GradientFlow"),
    ("neuralflow.flows.modified", "ModifiedFlow"),
    ("neuralflow.flows.principal", "PrincipalFlow"),
    ("neuralflow.flows.central", "CentralFlow"),
    ("neuralflow.flows.simulate", "simulate"),
    ("neuralflow.compare", "compare"),
    ("neuralflow.corrections", "TermLibrary"),
    ("neuralflow.corrections", "NeuralCorrection"),
    ("neuralflow.fit", "fit"),
    ("neuralflow.fit", "fit_loss"),
    ("neuralflow.fit", "fit_runs"),
    ("neuralflow.report.build", "build_report"),
    ("neuralflow.report.model", "Report.equation"),
    ("neuralflow.report.model", "Report.from_dict"),
    ("neuralflow.report.model", "Report.save_figures"),
    ("neuralflow.ladder", "ladder"),
    ("neuralflow.stability", "stability"),
    ("neuralflow.sweep", "sweep"),
    ("neuralflow.checkpoint", "save"),
    ("neuralflow.checkpoint", "load"),
    ("neuralflow.solvers", "Solver"),
]

_HEADER = re.compile(r"^(\w[\w ]*)\n-{3,}$", re.MULTILINE)
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?::.*)?$")


def _entry(module: str, dotted: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def section(doc: str, title: str) -> str | None:
    """The body of the numpydoc section ``title`` of ``doc`` (cleaned), or None without one."""
    headers = list(_HEADER.finditer(doc))
    for i, match in enumerate(headers):
        if match.group(1).strip() == title:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(doc)
            return doc[match.end() : end]
    return None


def documented_parameters(doc: str) -> list[str]:
    """The names a ``Parameters`` section describes: its unindented ``name : type`` lines (``a, b : type`` too)."""
    body = section(doc, "Parameters")
    if body is None:
        return []
    names = []
    for line in body.splitlines():
        if line and not line[0].isspace() and (match := _ENTRY.match(line)):
            names += [name.strip() for name in match.group(1).split(",")]
    return names


def expected_parameters(obj: Any) -> list[str]:
    """The parameter names of ``obj``'s signature as a docstring writes them (``*args``, ``**options``)."""
    params = inspect.signature(obj).parameters.values()
    out = []
    for p in params:
        if p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name)
    return out


@pytest.mark.parametrize(("module", "dotted"), ENTRY_POINTS, ids=[d for _, d in ENTRY_POINTS])
def test_parameters_section_names_every_parameter(module: str, dotted: str) -> None:
    obj = _entry(module, dotted)
    doc = inspect.getdoc(obj) or ""
    expected = expected_parameters(obj)
    assert expected, f"{dotted} takes no parameters; it does not belong in ENTRY_POINTS"
    documented = documented_parameters(doc)
    assert documented, f"{dotted}: no numpydoc 'Parameters' section (a 'Parameters' line underlined with dashes)"

    def same(name: str, written: str) -> bool:  # **kwargs may be written **options
        return name == written or (name.startswith("**") and written == "**options")

    missing = [n for n in expected if not any(same(n, w) for w in documented)]
    unknown = [w for w in documented if not any(same(n, w) for n in expected)]
    assert not missing, f"{dotted}: parameters not described in its Parameters section: {missing}"
    assert not unknown, f"{dotted}: its Parameters section describes names the signature lacks: {unknown}"
    summary = doc.split("\n\n", 1)[0]
    assert summary.strip(), f"{dotted}: the docstring must open with a one-sentence summary"


def test_parser_reads_numpydoc_sections() -> None:
    doc = inspect.cleandoc("""Summary.

    Parameters
    ----------
    a, *args : int
        The first.
    **options
        The rest.

    Returns
    -------
    int
        Not a parameter.
    """)
    assert documented_parameters(doc) == ["a", "*args", "**options"]
    assert documented_parameters("Summary without sections.") == []


#: Modules whose entry points carry an ``Examples`` section; the examples must run and print what they show.
EXAMPLE_MODULES = [
    "neuralflow.gd",
    "neuralflow.trajectory",
    "neuralflow.problems.core",
    "neuralflow.problems.digits",
    "neuralflow.flows.gradient",
    "neuralflow.flows.simulate",
    "neuralflow.corrections.library",
    "neuralflow.solvers",
]


@pytest.mark.parametrize("module", EXAMPLE_MODULES)
def test_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no examples; drop it from EXAMPLE_MODULES"
    assert result.failed == 0, f"{module}: {result.failed} example(s) fail (the doctest output above says which)"
