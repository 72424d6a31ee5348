"""The command line exposes every public option of the functions it runs (or says why not), and only once."""

from __future__ import annotations

import functools
import inspect
import json

import pytest
import torch

import neuralflow as nf
from neuralflow import options
from neuralflow.cli import COMMON, build_parser, main, problem_builders, public_functions
from neuralflow.errors import Interrupted
from neuralflow.flows import FLOWS

COMMANDS = ("run-gd", "compare", "fit", "report", "demo")


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _positionals(parser) -> set[str]:
    return {a.dest for a in parser._actions if not a.option_strings}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_keyword_is_an_option_or_routed_or_declared_api_only(command):
    _, commands = build_parser()
    cmd = commands[command]
    flags, positionals = _flags(cmd.parser), _positionals(cmd.parser)
    functions = dict(public_functions(command))
    if command == "run-gd":
        functions.update({fn.__name__: fn for fn in problem_builders().values()})
    for owner, fn in functions.items():
        for p in inspect.signature(fn).parameters.values():
            if p.name == "self" or p.kind == p.VAR_KEYWORD:
                continue
            key = f"{owner}.{p.name}"
            flag = "--" + p.name.replace("_", "-")
            if key in options.API_ONLY:
                assert len(options.API_ONLY[key]) > 20, f"{key}: say why it is API-only"
            elif key in options.ROUTED:
                how = options.ROUTED[key]
                named = [w.strip(",.()") for w in how.split() if w.startswith("--")]
                named_positional = [w.lower() for w in how.split() if w.isupper() and len(w) > 2]
                assert all(f in flags for f in named) and all(p in positionals for p in named_positional), (key, how)
                assert named or named_positional or len(how) > 10, (key, how)
            else:
                assert flag in flags, f"{owner}({p.name}=...) is not on the command line of `{command}`"
    for name in COMMON:
        assert "--" + name in flags


def _non_default(opt: options.Option) -> tuple[list[str], object]:
    """Command-line words setting ``opt`` to a value other than its default, and the value expected."""
    d = opt.default
    if opt.kind == "bool":
        return ([f"--no-{opt.flag[2:]}"] if d else [opt.flag]), not d
    if opt.choices:
        value = next(c for c in opt.choices if c != d)
        return [opt.flag, value], value
    if opt.kind in ("ints", "floats"):
        return [opt.flag, "3", "4"], [3, 4] if opt.kind == "ints" else [3.0, 4.0]
    if opt.kind == "int":
        return [opt.flag, str((d or 0) + 3)], (d or 0) + 3
    text, value = {
        "float": ("0.123", 0.123),
        "str": ("zz", "zz"),
        "tristate": ("true" if d is None else "auto", True if d is None else None),
        "names": ("a,b", ["a", "b"]),
        "ranges": ("1:2,5:", [(1, 2), (5, None)]),
        "dtype": ("float32", torch.float32),
    }[opt.kind]
    return [opt.flag, text], value


@pytest.mark.parametrize("command", COMMANDS)
def test_every_generated_option_reaches_its_function_with_the_value_given(command):
    parser, commands = build_parser()
    cmd = commands[command]
    argv = [command]
    expected: dict[str, dict[str, object]] = {}
    for owner, names in cmd.owners.items():
        for name in names:
            opt = cmd.generated[name]
            words, value = _non_default(opt)
            assert value != opt.default, name
            argv += words
            expected.setdefault(owner, {})[name] = value
    argv += ["--seed", "7"]
    args = parser.parse_args(argv)
    for owner, values in expected.items():
        if owner == "problem":
            got = {name: getattr(args, name) for name in values}
        else:
            got = cmd.kwargs(owner, args)
            if "seed" in inspect.signature(cmd.functions[owner]).parameters:
                values = {**values, "seed": 7}  # the common --seed reaches a function that takes one (fit)
        assert got == values, owner


def test_every_option_has_a_help_sentence_and_shows_its_default():
    functions = {owner: fn for c in COMMANDS for owner, fn in public_functions(c).items()}
    functions.update({fn.__name__: fn for fn in problem_builders().values()})
    for owner, fn in functions.items():
        assert options.missing_help(fn, owner) == [], f"add sentences to options.HELP for {owner}"
    for name, builder in FLOWS.items():
        assert options.missing_help(builder, "flow") == [], f"add sentences to options.HELP for flow {name}"
    _, commands = build_parser()
    for cmd in commands.values():
        for action in cmd.parser._actions:
            if action.option_strings and action.dest not in ("help", "config", "quiet", "exclude_transients"):
                assert "default:" in action.help, (cmd.name, action.dest)


def test_a_keyword_that_clashes_between_two_functions_of_one_command_is_refused():
    _, commands = build_parser()
    cmd = commands["fit"]

    def extra(window: int = 3) -> None:  # fit has a window already
        """A function with a keyword fit has."""

    with pytest.raises(nf.InputError, match="clashes"):
        cmd.add_generated("extra", extra)


def test_a_keyword_without_a_command_line_form_is_refused():
    def odd(problem, weights: dict[str, float] | None = None) -> None:
        """A keyword the generator cannot parse."""

    with pytest.raises(nf.InputError, match="no command-line form"):
        options.options_of(odd, "odd", skip=("problem",))


def test_flow_specs_carry_each_flows_constructor_options():
    specs = options.parse_flows("gradient,central:above_edge=hold,relaxation=2:gram-every=1,modified2", FLOWS)
    assert specs == [
        ("gradient", {}),
        ("central", {"above_edge": "hold", "relaxation": 2.0, "gram_every": 1}),
        ("modified2", {}),
    ]
    assert options.parse_flows(options.format_flows(specs, FLOWS), FLOWS) == specs
    assert options.parse_flows("principal:k=none", FLOWS) == [("principal", {"k": None})]
    for name, builder in FLOWS.items():  # every option of every flow, at its default, round-trips
        defaults = {k: o.default for k, o in options.flow_options(builder).items()}
        text = options.format_flows([(name, defaults)], FLOWS)
        assert options.parse_flows(text, FLOWS) == [(name, defaults)]
    for bad, match in (
        ("centrl", "unknown flow"),
        ("central:abov=hold", "no option"),
        ("central:above_edge=maybe", "choose from"),
        ("relaxation=2", "before any flow"),
        ("central:relaxation=fast", "central:relaxation=fast"),
    ):
        with pytest.raises(nf.InputError, match=match):
            options.parse_flows(bad, FLOWS)


@pytest.fixture(scope="module")
def eos_run(tmp_path_factory):
    """GD on the quartic at the edge of stability from the start (sharpness above 2/lr)."""
    run = tmp_path_factory.mktemp("eos") / "run.nft"
    assert (
        main(["run-gd", "--problem", "zhu-quartic", "--lr", "0.2", "--steps", "40", "--quiet", "--out", str(run)]) == 0
    )
    return run


@pytest.fixture(scope="module")
def gentle_run(tmp_path_factory):
    """GD on a scalar factorisation well below the edge (the modified equation holds)."""
    run = tmp_path_factory.mktemp("gentle") / "run.nft"
    assert (
        main(
            [
                "run-gd",
                "--problem",
                "scalar-factorization",
                "--lr",
                "0.02",
                "--steps",
                "100",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


def test_physics_options_reach_the_flow_at_the_edge_of_stability(eos_run, tmp_path, capsys):
    out = tmp_path / "fit.nff"
    common = [
        str(eos_run),
        "--terms",
        "Hg",
        "--target",
        "smoothed",
        "--method",
        "regression",
        "--window",
        "5",
        "--solver",
        "euler",
        "--step-size",
        "0.5",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(["fit", *common, "--physics", "central"]) == 2
    assert "above_edge='hold'" in capsys.readouterr().err
    assert main(["fit", *common, "--physics", "central:above_edge=hold"]) == 0
    flow = nf.load(out).model.flow
    assert flow.above_edge == "hold"


def test_several_physics_fit_a_ladder_with_one_file_each(gentle_run, tmp_path, capsys):
    out = tmp_path / "fit.nff"
    assert (
        main(
            [
                "fit",
                str(gentle_run),
                "--physics",
                "gradient,modified1",
                "--terms",
                "Hg",
                "--method",
                "regression",
                "--window",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "neuralflow ladder" in capsys.readouterr().out
    assert nf.load(tmp_path / "fit.gradient.nff").model.flow.name == "gradient"
    assert nf.load(tmp_path / "fit.modified1.nff").model.flow.name == "modified1"


def test_the_config_written_back_reruns_the_same_command_and_the_command_line_wins(gentle_run, tmp_path):
    out = tmp_path / "fit.nff"
    args = [
        str(gentle_run),
        "--terms",
        "Hg",
        "--method",
        "regression",
        "--window",
        "10",
        "--exclude",
        "0:20",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(["fit", *args]) == 0
    config = tmp_path / "fit.nff.toml"
    first = nf.load(out)
    text = config.read_text()
    assert "[fit]" in text and 'method = "regression"' in text and "# command: neuralflow fit" in text
    out.unlink()
    assert main(["fit", "--config", str(config)]) == 0
    again = nf.load(out)
    assert again.settings["exclude"] == first.settings["exclude"] == [[0, 20]]
    assert again.coefficients == first.coefficients
    assert main(["fit", "--config", str(config), "--window", "12", "--out", str(tmp_path / "b.nff")]) == 0
    assert nf.load(tmp_path / "b.nff").settings["window"] == 12


def test_a_config_file_with_a_stray_key_or_a_missing_argument_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run-gd]\nlr = 0.1\nlearning_rate = 3\n")
    assert main(["run-gd", "--config", str(bad)]) == 2
    assert "no option 'learning_rate'" in capsys.readouterr().err
    assert main(["fit"]) == 2
    assert "missing trajectory" in capsys.readouterr().err


def test_version_and_problem_options_that_do_not_apply(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert nf.__version__ in capsys.readouterr().out
    assert main(["run-gd", "--problem", "zhu-quartic", "--depth", "3", "--steps", "2"]) == 2
    assert "--depth does not apply to problem 'zhu-quartic'" in capsys.readouterr().err


def test_report_writes_every_rendering(gentle_run, tmp_path):
    fit_file = tmp_path / "fit.nff"
    assert (
        main(
            [
                "fit",
                str(gentle_run),
                "--terms",
                "Hg",
                "--method",
                "regression",
                "--window",
                "10",
                "--quiet",
                "--out",
                str(fit_file),
            ]
        )
        == 0
    )
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "latex", "html", "markdown")}
    argv = ["report", str(fit_file), "--quiet", *[w for k, p in paths.items() for w in (f"--{k}", str(p))]]
    assert main(argv) == 0
    report = nf.Report.from_dict(json.loads(paths["json"].read_text()))
    assert report.to_markdown() == paths["markdown"].read_text()
    assert paths["latex"].read_text() == report.to_latex()
    assert paths["html"].read_text().startswith("<!DOCTYPE html>") and "<table" in paths["html"].read_text()
    # a report option that differs from the stored report's rebuilds it
    assert main(["report", str(fit_file), "--quiet", "--max-states", "7", "--json", str(paths["json"])]) == 0


def test_a_users_module_from_a_file_runs_and_is_rebuilt_for_the_fit(tmp_path, capsys):
    model = tmp_path / "mymodel.py"
    model.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.linspace(-2, 2, 20, dtype=torch.float64)[:, None]\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()\n"
        "    return net, (x, torch.sin(x))\n"
        "def wrong():\n"
        "    return 3\n"
    )
    run = tmp_path / "run.nft"
    assert (
        main(
            [
                "run-gd",
                "--problem",
                f"module:{model}:build",
                "--lr",
                "0.05",
                "--steps",
                "40",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    traj = nf.Trajectory.load(run)
    assert traj.problem["name"] == "module" and traj.problem["function"] == "build"
    fit = [
        "fit",
        str(run),
        "--terms",
        "Hg",
        "--method",
        "regression",
        "--window",
        "5",
        "--quiet",
        "--out",
        str(tmp_path / "f.nff"),
    ]
    assert main(fit) == 2  # a file does not decide which code runs
    assert "runs that file. Pass allow_code=True (command line: --allow-code)" in capsys.readouterr().err
    assert main([*fit, "--allow-code"]) == 0
    assert main(["run-gd", "--problem", f"module:{model}:wrong", "--steps", "2"]) == 2
    assert "must return (module, (inputs, targets))" in capsys.readouterr().err
    assert main(["run-gd", "--problem", f"module:{tmp_path / 'nope.py'}:build", "--steps", "2"]) == 2
    assert "not a Python file" in capsys.readouterr().err


#: The library's long loops: quiet unless asked (``progress=True``); the command line and the demo turn bars on.
LONG_LOOPS = {"run_gd": nf.run_gd, "fit": nf.fit, "compare": nf.compare, "simulate": nf.simulate, "sweep": nf.sweep}


@pytest.mark.parametrize("name", sorted(LONG_LOOPS))
def test_library_functions_are_quiet_by_default(name):
    assert inspect.signature(LONG_LOOPS[name]).parameters["progress"].default is False


@pytest.mark.parametrize("quiet", [False, True])
def test_the_command_line_shows_progress_bars_unless_quiet(monkeypatch, tmp_path, quiet):
    from neuralflow.cli import runs

    seen = {}

    @functools.wraps(nf.run_gd)  # the command line's options come from the signature
    def record(problem, **kwargs):
        seen.update(kwargs)
        raise Interrupted("recorded", partial=None)

    monkeypatch.setattr(runs, "run_gd", record)
    argv = ["run-gd", "--problem", "zhu-quartic", "--steps", "3", "--out", str(tmp_path / "run.nft")]
    main(argv + (["--quiet"] if quiet else []))
    assert seen["progress"] is not quiet


def test_the_demo_shows_progress_bars_by_default():
    from neuralflow.demo import run_demo

    assert inspect.signature(run_demo).parameters["progress"].default is True
