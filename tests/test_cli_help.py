"""`alignprog --help`: starts without torch, shows the config's own defaults, and offers shell
completion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.cli.common import ConfigDefault, show_number
from alignprog.config import DEFAULT_LAMBDA, Config

# Modules that `--help` must not import: each costs from 0.1 s (numpy) to 2 s (torch).
HEAVY = ("torch", "numpy", "matplotlib", "av", "scipy", "sklearn")

PROBE = """
import json, sys
sys.argv = ["alignprog", *ARGS]
from alignprog.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""


def _imported(args: list[str], code: str = PROBE) -> set[str]:
    """The top-level modules a fresh interpreter has imported after running `code`."""
    proc = subprocess.run([sys.executable, "-c", code.replace("ARGS", repr(args))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["data", "check", "--help"],
                                  ["sample-inspect", "--help"], ["extract-features", "--help"],
                                  ["config", "show", "--help"], ["config", "show"]])
def test_help_imports_no_heavy_module(args):
    imported = _imported(args)
    assert "typer" in imported   # the probe ran the CLI
    assert not imported & set(HEAVY), f"alignprog {' '.join(args)} imports {imported & set(HEAVY)}"


def test_data_package_is_lazy():
    code = ("import json, sys\nimport alignprog.data.splits\nfrom alignprog.data import Splits\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    assert "torch" not in _imported([], code)
    import alignprog.data as data
    from alignprog.data.batching import make_loader
    assert data.make_loader is make_loader
    assert set(data.__all__) <= set(dir(data))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope  # noqa: B018


def _options(group, prefix: str = ""):
    """(command path, click option) of every option of every command, groups walked."""
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(cmd, "commands"):
            yield from _options(cmd, path + " ")
            continue
        for param in cmd.params:
            if param.param_type_name == "option":
                yield path, param


def _config_value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# Options whose default is not one config field: explained in words, or computed.
DESCRIBED = {("train", "name"), ("train", "lambda_"), ("data synth", "dtype")}
OWN_COMMANDS = ("train", "data synth", "data check", "sample-inspect", "extract-features",
                "config show", "config validate")


def test_shown_defaults_are_the_config_defaults():
    defaults = Config()   # validated: what a run gets when it sets nothing
    checked = 0
    for path, option in _options(typer.main.get_command(app)):
        shown = option.show_default
        if isinstance(shown, ConfigDefault):
            want = _config_value(defaults, shown.key)
            assert shown.value == want, (path, option.name, shown.value, want)
            if option.is_flag and option.secondary_opts:
                text = (option.opts[0] if want else option.secondary_opts[0]).lstrip("-")
            elif isinstance(want, (int, float)) and not isinstance(want, bool):
                text = show_number(want)
            else:
                text = str(want)
            assert str(shown) == text, (path, option.name)
            checked += 1
        elif (path in OWN_COMMANDS and option.default is None and isinstance(shown, str)
              and shown):
            # A hand-typed default would drift from the config: only DESCRIBED ones are allowed.
            assert (path, option.name) in DESCRIBED, f"{path} --{option.name}: typed default"
    assert checked >= 20
    train = typer.main.get_command(app).commands["train"]
    (lam,) = [p for p in train.params if p.name == "lambda_"]
    assert lam.show_default == ", ".join(f"{m} {show_number(v)}"
                                         for m, v in DEFAULT_LAMBDA.items())


def test_show_number():
    assert [show_number(v) for v in (20, 0.5, 3e-4, 1e6, 1.0, 2048, 1e-5, 0.0)] == [
        "20", "0.5", "3e-4", "1e6", "1", "2048", "1e-5", "0"]


def test_shell_completion_is_offered_and_works():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--install-completion" in result.output and "--show-completion" in result.output
    result = runner.invoke(app, ["--show-completion", "bash"])
    assert result.exit_code == 0, result.output
    assert "complete -o default -F _alignprog_completion alignprog" in result.output
    # The script that the shell calls back: the installed entry point, asked for completions.
    script = Path(sys.executable).with_name("alignprog")
    if not script.is_file():
        pytest.skip("the alignprog entry point is not installed beside this interpreter")
    env = {"PATH": str(script.parent), "_ALIGNPROG_COMPLETE": "complete_bash"}
    for words, cword, want in (("alignprog con", 1, {"config"}),
                               ("alignprog config ", 2, {"show", "validate"})):
        proc = subprocess.run([str(script)], env=env | {"COMP_WORDS": words,
                                                         "COMP_CWORD": str(cword)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) == want, (words, proc.stdout)
