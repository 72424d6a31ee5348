"""The package's layout (docs/architecture.md): stages import only earlier stages, and no private names leak.

Checked with ``ast`` on the source, so a violation is found whether or not the code runs. Three rules:

* every module belongs to one stage of :data:`STAGES`; it imports modules of its own or earlier stages only;
* an import inside a function is allowed only for a heavy optional package (:data:`LAZY_PACKAGES`) or for one of
  the few calls up the stack listed in :data:`UPWARD` (each with its reason);
* a private name (``_x``, not a dunder) is used only where it is defined: in its own module, or in a sibling
  module of the same subpackage (``neuralflow.fit.api`` may use ``neuralflow.fit.shooting._objective``);
  ``obj._x`` on anything but ``self``/``cls`` must name something the same module defines. Tests are held to the
  same rule: they use the public contract.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neuralflow"

#: The pipeline's stages, from the bottom up (docs/architecture.md draws the same picture). A name is a module
#: (``neuralflow.gd``) or a package (``neuralflow.fit``: the package and every module in it).
STAGES: list[tuple[str, ...]] = [
    ("neuralflow.errors",),
    ("neuralflow._validate", "neuralflow.provenance"),
    ("neuralflow._io", "neuralflow._display"),
    ("neuralflow.problems",),
    ("neuralflow.autodiff",),
    ("neuralflow.oscillation",),
    ("neuralflow.trajectory",),
    ("neuralflow.gd",),
    ("neuralflow.solvers",),
    ("neuralflow.flows",),
    ("neuralflow.compare",),
    ("neuralflow.corrections",),
    ("neuralflow.sparse",),
    ("neuralflow.fit",),
    ("neuralflow.report",),
    ("neuralflow.ladder", "neuralflow.stability"),
    ("neuralflow.checkpoint",),
    ("neuralflow.sweep",),
    ("neuralflow.demo",),
    ("neuralflow.options",),
    ("neuralflow.cli",),
    ("neuralflow.__main__", "neuralflow"),
]

#: Heavy optional packages a function may import when it needs them (figures, tables, clusters).
LAZY_PACKAGES = {"matplotlib", "pandas", "pyarrow", "ray", "sklearn"}

#: The only imports up the stack, each made at call time: (module, function, imported module) and why.
UPWARD = {
    # FitResult.report() and .save() are conveniences on the fit's result for stages above the fit
    ("neuralflow.fit.result", "report", "neuralflow.report"),
    ("neuralflow.fit.result", "save", "neuralflow.checkpoint"),
    # the old import paths of names that moved up a stage (nf.compare and nf.ladder are the public ones)
    ("neuralflow.flows", "__getattr__", "neuralflow.compare"),
    ("neuralflow.report", "__getattr__", "neuralflow.ladder"),
}

#: Private modules shared by every stage (their public names, not their private ones).
SHARED = {"neuralflow._io", "neuralflow._validate", "neuralflow._display"}

#: Private names of the standard library with no public equivalent (``os._exit`` ends a worker at once,
#: ``argparse`` lists a parser's options only in ``_actions``; ``hashlib._Hash`` is the type of a hash).
STANDARD_LIBRARY = {"_exit", "_actions", "_Hash"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> int:
    for i, names in enumerate(STAGES):
        if any(module == n or module.startswith(n + ".") for n in names if n != "neuralflow"):
            return i
        if module in names:
            return i
    raise AssertionError(f"{module} is in no stage of STAGES; add it (and to docs/architecture.md)")


def resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The neuralflow modules an ``from ... import ...`` statement imports (a name may be a submodule)."""
    if node.level == 0:
        base = node.module or ""
        if not base.startswith("neuralflow"):
            return []
    else:
        package = module.split(".") if is_package(path) else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def imports(module: str, path: Path, tree: ast.AST) -> list[tuple[ast.AST, str, str | None]]:
    """``(node, imported module, enclosing function or None)`` for every import of a neuralflow module, and the
    top-level package name for third-party imports inside functions."""
    out = []

    def visit(node: ast.AST, func: str | None, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: no import at run time
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.ImportFrom):
                for target in resolve(module, path, child) or [f"!{(child.module or '').split('.')[0]}"]:
                    out.append((child, target, func))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    name = alias.name
                    out.append((child, name if name.startswith("neuralflow") else f"!{name.split('.')[0]}", func))
            visit(child, inner, type_only)

    visit(tree, None, False)
    return out


def parsed() -> dict[str, tuple[Path, ast.AST]]:
    return {m: (p, ast.parse(p.read_text(), str(p))) for m, p in MODULES.items()}


def layout_violations(sources: dict[str, tuple[Path, ast.AST]]) -> list[str]:
    bad = []
    for module, (path, tree) in sources.items():
        here = stage(module)
        for node, target, func in imports(module, path, tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if target.startswith("!"):
                if func is not None and target[1:] not in LAZY_PACKAGES:
                    bad.append(f"{where}: imports {target[1:]} inside {func}(); import it at the top")
                continue
            if func is not None and (module, func, target) not in UPWARD:
                bad.append(f"{where}: imports {target} inside {func}(); import it at the top")
            if stage(target) > here and (module, func, target) not in UPWARD:
                bad.append(f"{where}: {module} (stage {here}) imports {target} (stage {stage(target)}), a later stage")
    return bad


def test_every_module_imports_in_dependency_order():
    """Importing the modules from the bottom stage up works: no module needs a later one to load."""
    ordered = sorted((m for m in MODULES if not m.endswith("__main__")), key=lambda m: (stage(m), m.count(".")))
    for module in ordered:
        importlib.import_module(module)


def test_stages_import_only_earlier_stages_and_nothing_inside_functions():
    assert layout_violations(parsed()) == []


def test_the_layout_check_catches_an_upward_import():
    """Break the layout once: a physics module that imports the fit, and a lazy import in the fit."""
    sources = parsed()
    path, _ = sources["neuralflow.flows.gradient"]
    broken = ast.parse(path.read_text() + "\nfrom ..fit import fit\n\ndef f():\n    import numpy\n")
    sources["neuralflow.flows.gradient"] = (path, broken)
    found = layout_violations(sources)
    assert any("imports neuralflow.fit" in v and "later stage" in v for v in found), found
    assert any("imports numpy inside f()" in v for v in found), found


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, variables, and attributes it sets on ``self``/``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return names


def private(name: str) -> bool:
    """``_x``; not a dunder, nor a protocol name such as ``_repr_html_`` (it ends with an underscore)."""
    return name.startswith("_") and not name.endswith("_")


def private_violations(module: str, path: Path, tree: ast.AST) -> list[str]:
    own = defined_names(tree)
    package = module.rsplit(".", 1)[0] if module.count(".") >= 2 else None
    bad = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            targets = resolve(module, path, node) if node.level or (node.module or "").startswith("neuralflow") else []
            for alias, target in zip(node.names, targets or [None] * len(node.names), strict=True):
                if not private(alias.name) or target is None or target in SHARED and alias.name == target[11:]:
                    continue
                if package is not None and target.startswith(package + "."):
                    continue  # a sibling in the same subpackage
                bad.append(f"{where}: imports the private name {alias.name} from {target}")
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in STANDARD_LIBRARY:
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr not in own:
                bad.append(f"{where}: uses {ast.unparse(node)}, a private name of another module")
    return bad


TESTS = {f"tests.{p.stem}": p for p in sorted((ROOT / "tests").glob("*.py"))}


@pytest.mark.parametrize("module", [*MODULES, *TESTS])
def test_no_module_uses_another_modules_private_names(module):
    path = MODULES.get(module) or TESTS[module]
    assert private_violations(module, path, ast.parse(path.read_text(), str(path))) == []


def test_the_private_name_check_catches_a_leak():
    path = MODULES["neuralflow.fit.shooting"]
    leak = ast.parse(
        "from ..corrections import TermLibrary\n\ndef f(lib):\n    return lib._context\n"
        "from ..report.notation import _percent\n"
    )
    found = private_violations("neuralflow.fit.shooting", path, leak)
    assert any("lib._context" in v for v in found) and any("_percent" in v for v in found), found


#: The most code lines (docstrings left out) a module may have; a longer one is split along its seams (issue 13).
MAX_LINES = 450


def code_lines(source: str) -> int:
    """Lines of ``source`` outside docstrings: the numpydoc sections the entry points must carry
    (``tests/test_docstrings.py``) document the code and do not make a module one to split."""
    docstrings = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings += (first.end_lineno or first.lineno) - first.lineno + 1
    return len(source.splitlines()) - docstrings


def test_modules_stay_short():
    long = {m for m, p in MODULES.items() if code_lines(p.read_text()) > MAX_LINES}
    assert not long, f"split these along their seams: {sorted(long)}"


def test_code_lines_leave_out_docstrings_only():
    source = 'def f():\n    """Two\n    lines."""\n    x = "not a docstring"\n    return x\n'
    assert code_lines(source) == 3
