"""Every shell and Python snippet in README.md, docs/ and store/FORMAT.md is checked, so a wrong name fails CI.

- bash blocks: every `tide` line must parse against the real CLI (options, types, choices), every `make` line
  must name Makefile targets (and the `tide` lines its recipes print under `make -n` must parse), every
  `python -m` module must exist and accept its arguments, every `pip install` must name this distribution and
  its extras. Blocks tagged `run` (```` ```bash run ````) are also run, in order, on a tiny store: the sizes
  in TINY are appended to each command (the last value of an option wins).
- python blocks are run in the folder the `run` blocks filled, unless their first line is NOT_RUN (they need
  network, GPUs or model weights); those are compiled, their imports done and every name resolved.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib
import importlib.util
import re
import shlex
import subprocess
import symtable
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest
import typer
from tide.cli import app
from typer.main import get_command
from typer.testing import CliRunner

# typer >= 0.20 carries its own copy of click: take its usage-error base class from typer's public BadParameter.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "store" / "FORMAT.md"]
NOT_RUN = "# not run by the tests:"
"""First line of a python block that cannot run here; say why after the colon."""
EXTERNAL = {"dask", "hf", "aws", "git", "cd", "export", "moto_server"}
"""Programs of not-run bash lines that the tests do not check (servers, network uploads)."""
TINY = {
    ("harvest",): ["--num-samples", "20", "--num-steps", "6", "--batch-size", "10", "--no-progress"],
    ("train",): ["--max-steps", "3", "--batch-size", "256", "--expansion", "1", "--no-progress"],
    ("features",): ["--max-pages", "2", "--no-progress"],
    ("splice",): ["--num-samples", "2", "--batch-size", "2"],
    ("steer",): ["--num-samples", "2"],
}
"""Appended to a `run` block's commands: the same command on a store of 20 samples x 6 steps."""


class Snippet(NamedTuple):
    path: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    tags: tuple[str, ...]
    """Words after the language on the fence line, e.g. ('run',)."""
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)(\w*)\s*(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[1]))
        found.append(Snippet(path, i + 1, fence[2], tuple(fence[3].split()), "\n".join(lines[i + 1 : end])))
        i = end + 1
    return found


ALL = [s for doc in DOCUMENTS for s in snippets(doc)]
BASH = [s for s in ALL if s.lang in ("bash", "sh", "shell")]
PYTHON = [s for s in ALL if s.lang == "python"]


def command_lines(code: str) -> list[list[str]]:
    """Each command of a shell snippet as argv, continuation lines joined, comments and env assignments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.match(r"^\w+=", argv[0]):
            argv = argv[1:]
        if argv:
            commands.append(argv)
    return commands


# ---- checks of one command, by program -------------------------------------------------------------------
def parse_tide(argv: list[str]) -> None:
    """Parse argv as the real CLI does (groups, options, types, choices) without running any command."""
    cli = get_command(app)
    ctx = cli.make_context("tide", list(argv))
    cmd = cli
    while hasattr(cmd, "resolve_command"):  # a group: hand the rest to the subcommand it names
        # click keeps the subcommand's name apart from its arguments (`_protected_args` since click 8.2)
        args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if not args:
            break
        name, sub, rest = cmd.resolve_command(ctx, args)  # an unknown name raises "No such command"
        ctx, cmd = sub.make_context(name, rest, parent=ctx), sub


def check_make(argv: list[str]) -> None:
    targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
    dry = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, f"`{shlex.join(argv)}`: {dry.stderr.strip()}"
    assert targets, f"`{shlex.join(argv)}` names no target"
    for line in dry.stdout.splitlines():  # what the recipes would run: their tide and python -m lines
        program = line.split(maxsplit=1)[0] if line.strip() else ""
        if program.endswith("/tide"):
            parse_tide(shlex.split(line)[1:])
        elif program.endswith("/python") and line.split()[1:2] == ["-m"]:
            check_python_m(shlex.split(line))


class _Parsed(Exception):
    pass


def check_python_m(argv: list[str]) -> None:
    """`python -m MODULE ARGS`: the module exists and, when it is tide's own with main(argv) and argparse, accepts
    ARGS (main is stopped right after parsing)."""
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if module.split(".")[0] not in ("tide", "tests"):  # another program's main may do real work (pip!)
        return
    main = getattr(importlib.import_module(module), "main", None)
    if main is None:
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with pytest.raises(_Parsed):
            main(argv[3:])
    finally:
        argparse.ArgumentParser.parse_args = original


def check_pip(argv: list[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in argv[2:]:
        name, _, extras = requirement.partition("[")
        if name in (".", "-e", "torch") or name.startswith("-"):
            name = project["name"] if name == "." else None
        if name is None:
            continue
        assert name == project["name"], f"pip install {requirement}: the distribution is {project['name']}"
        for extra in filter(None, extras.rstrip("]").split(",")):
            assert extra in project["optional-dependencies"], f"{requirement}: no extra {extra!r}"


def check_torchrun(argv: list[str]) -> None:
    """`torchrun OPTIONS -m tide.cli ARGS`: torchrun's own parser takes OPTIONS, and ARGS parse as tide's."""
    from torch.distributed.run import parse_args

    args = parse_args(argv[1:])
    assert args.module and args.training_script == "tide.cli", "torchrun runs tide as `-m tide.cli ...`"
    parse_tide(args.training_script_args)


def check_command(argv: list[str]) -> None:
    program = Path(argv[0]).name
    if program == "tide":
        parse_tide(argv[1:])
    elif program == "make":
        check_make(argv)
    elif program.startswith("python") and argv[1:2] == ["-m"]:
        check_python_m(argv)
    elif program == "pip":
        check_pip(argv)
    elif program == "torchrun":
        check_torchrun(argv)
    else:
        assert program in EXTERNAL, f"{program}: not a command the docs' test knows; add it to EXTERNAL"


@pytest.mark.parametrize("snippet", BASH, ids=[s.where for s in BASH])
def test_every_shell_line_parses(snippet):
    for argv in command_lines(snippet.code):
        try:
            check_command(argv)
        except (AssertionError, ClickException) as e:
            raise AssertionError(f"{snippet.where}: `{shlex.join(argv)}`: {e}") from e


def test_a_wrong_option_or_name_is_caught():
    """The checks above fail on the mistakes they exist for."""
    with pytest.raises(ClickException, match="No such option: --stor"):
        parse_tide(["train", "--stor", "runs/digits.zarr"])
    with pytest.raises(ClickException, match="valid integer"):
        parse_tide(["harvest", "--num-samples", "many"])
    with pytest.raises(ClickException, match="No such command 'infos'"):
        parse_tide(["store", "infos", "x"])
    with pytest.raises(ClickException, match="No such option: --nprocs"):
        check_torchrun(["torchrun", "--standalone", "-m", "tide.cli", "train", "--nprocs", "2"])
    with pytest.raises(SystemExit):  # argparse's refusal of an option torchrun does not have
        check_torchrun(["torchrun", "--nproc-per-gpu", "2", "-m", "tide.cli", "train"])
    with pytest.raises(AssertionError, match="No rule to make target"):
        check_make(["make", "harvst"])
    with pytest.raises(AssertionError, match="unresolved"):
        check_names(
            Snippet(REPO, 1, "python", (), "from tide.store.reader import open_store\nopen_stor('x')")
        )
    with pytest.raises(AttributeError):
        check_names(Snippet(REPO, 1, "python", (), "from tide.store.reader import open_stor"))


# ---- python: names resolved, then run ---------------------------------------------------------------------
def check_names(snippet: Snippet) -> None:
    """Every import is done (a module that is not installed is allowed only in a not-run block) and every
    name a scope reads is assigned, imported or a builtin."""

    tree = ast.parse(snippet.code, snippet.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                name = module or alias.name
                if importlib.util.find_spec(name.split(".")[0]) is None:
                    assert snippet.code.startswith(NOT_RUN), f"{snippet.where}: {name} is not installed"
                    continue
                imported = importlib.import_module(name)
                if module:
                    getattr(imported, alias.name)
    table = symtable.symtable(snippet.code, snippet.where, "exec")
    defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    unresolved = []

    def visit(t: symtable.SymbolTable, top: bool) -> None:
        for s in t.get_symbols():
            free = (not s.is_assigned() and not s.is_imported()) if top else s.is_global()
            if s.is_referenced() and free and s.get_name() not in defined | set(dir(builtins)):
                unresolved.append(s.get_name())
        for child in t.get_children():
            visit(child, False)

    visit(table, True)
    assert not unresolved, f"{snippet.where}: unresolved names {unresolved}"


RUN_BASH = [s for s in BASH if "run" in s.tags]
RUN_PYTHON = [s for s in PYTHON if not s.code.startswith(NOT_RUN)]


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> Path:
    """A folder where the `run` blocks have run, in document order, on a tiny store."""
    folder = tmp_path_factory.mktemp("tour")
    runner = CliRunner()
    with contextlib.chdir(folder):
        for snippet in RUN_BASH:
            for argv in command_lines(snippet.code):
                assert argv[0] == "tide", f"{snippet.where}: a run block holds tide commands only"
                path = tuple(a for a in argv[1:3] if not a.startswith("-"))
                extra = next((v for k, v in TINY.items() if path[: len(k)] == k), [])
                result = runner.invoke(app, [*argv[1:], *extra])
                assert result.exit_code == 0, f"{snippet.where}: `{shlex.join(argv)}`:\n{result.output}"
    return folder


@pytest.mark.parametrize("snippet", PYTHON, ids=[s.where for s in PYTHON])
def test_every_python_snippet_resolves_its_names(snippet):
    check_names(snippet)


@pytest.mark.parametrize("snippet", RUN_PYTHON, ids=[s.where for s in RUN_PYTHON])
def test_python_snippets_run(snippet, tour, monkeypatch, capsys):
    monkeypatch.chdir(tour)
    exec(compile(snippet.code, snippet.where, "exec"), {"__name__": "__snippet__"})


def test_the_tour_made_what_the_readme_says(tour):
    """The README's tour ends with a trained SAE and a report, where the README says they are."""
    assert (tour / "runs/saes/resid_l03-tide-k16/sae.safetensors").is_file()
    assert (tour / "runs/saes/resid_l03-tide-k16/eval.json").is_file()
    assert (tour / "runs/features/tide/index.html").is_file()
