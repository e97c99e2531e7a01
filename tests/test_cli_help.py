"""One CLI convention (issue 21), checked on every command by walking typer's click command tree: SAE folders
are positional, outputs are `--out`, every default is shown in one style, `--device` defaults to auto, the
commands that draw progress bars take `--no-progress` (that it hides them all: tests/test_report.py), and `tide --help` lists each command's whole summary."""

from __future__ import annotations

import inspect

import pytest
import typer.main
from tide.cli import app
from typer.testing import CliRunner

runner = CliRunner()

PROGRESS_BARS = {"harvest", "train", "splice", "steer", "features", "demo-model train"}
"""The commands whose library calls draw a tqdm bar (harvest/run, trainer, splice, steer, features + report,
demo_model.train); each must be able to hide them all."""


def _commands(group, prefix: str = "") -> dict:
    """Every leaf command under `group` by its full name. (typer brings its own copy of click, so the classes
    are told apart by what they have, not by click's types.)"""
    found = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            found |= _commands(cmd, f"{prefix}{name} ")
        else:
            found[f"{prefix}{name}"] = cmd
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _visible(cmd) -> list:
    return [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]


def test_the_walk_sees_every_command():
    assert {"harvest", "train", "eval", "splice", "steer", "export", "import", "features"} <= set(COMMANDS)
    assert {"store info", "store verify", "store pack", "store card", "store stats"} <= set(COMMANDS)
    assert {"demo-model train", "demo-model eval", "demo-model grid", "config-reference"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_shows_its_default_in_one_style(name):
    cmd = COMMANDS[name]
    ctx = cmd.context_class(cmd, info_name=name)
    for param in _visible(cmd):
        if param.param_type_name == "argument" or param.is_flag:
            continue  # an argument is given; an on/off flag is off unless given
        _, text = param.get_help_record(ctx)
        assert "(default" not in text, f"tide {name} {param.opts[0]}: old default style in {text!r}"
        assert "[default: " in text or "[required]" in text, (
            f"tide {name} {param.opts[0]} shows no default: {text!r}"
        )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_sae_folders_are_positional_and_outputs_are_out(name):
    for param in _visible(COMMANDS[name]):
        help_text = (getattr(param, "help", None) or "").lower()
        if param.param_type_name == "option" and "sae folder" in help_text and "write" not in help_text:
            pytest.fail(f"tide {name} {param.opts[0]} takes an SAE folder as an option; make it positional")
        if param.name in ("out", "output"):
            assert param.param_type_name == "option" and param.opts == ["--out"], f"tide {name}: {param.name}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_device_defaults_to_auto(name):
    for param in _visible(COMMANDS[name]):
        if param.name == "device":
            # harvest and train leave it unset (a config file may set it); their help names the default
            assert param.default == "auto" or "[default: auto]" in param.help, (
                name,
                param.default,
                param.help,
            )


def test_commands_that_draw_progress_bars_can_hide_them():
    has = {name for name, cmd in COMMANDS.items() if any(p.name == "no_progress" for p in cmd.params)}
    assert has == PROGRESS_BARS


def test_top_level_help_shows_every_summary_in_full():
    runner_wide = CliRunner()
    for group, names in (([], ("harvest", "train", "eval", "splice", "steer", "export", "features")),
                         (["store"], ("verify", "pack", "card", "stats"))):  # fmt: skip
        text = " ".join(runner_wide.invoke(app, [*group, "--help"], terminal_width=80).output.split())
        for name in names:
            doc = inspect.cleandoc(COMMANDS[" ".join([*group, name])].callback.__doc__)
            summary = " ".join(doc.split("\n\n")[0].split())
            assert summary in text, f"`tide {' '.join(group)} --help` cuts {name}'s summary: {summary!r}"
