"""How `tide` commands take their settings: a config file plus flags -> one validated pydantic config, library
errors as one `error:` line, and `tide config-reference`'s tables. The options themselves: clioptions.py.

Nothing here imports torch, diffusers or a config module at import time, so that `tide --help` stays instant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

REPO = Path(__file__).resolve().parent
REFERENCE_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")
"""docs/settings.md holds `tide config-reference`'s output between these lines."""


def fail(message: str) -> NoReturn:
    """Print a one-paragraph error and exit non-zero, without a traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def log(message: str) -> None:
    """Progress notes go to stderr, so that stdout holds only a command's result."""
    typer.echo(message, err=True)


@contextmanager
def user_errors(storage: str | None = None) -> Iterator[None]:
    """Run a command's library call: every tide error (each is a ValueError) and OSError becomes one `error:`
    line; URL stores opened inside use `storage` (--storage-options JSON)."""
    from tide.store.open import storage_options

    try:
        with storage_options(storage):
            yield
    except (ValueError, OSError) as e:
        if getattr(e, "shown", True):
            fail(str(e))
        raise typer.Exit(code=2) from None  # under torchrun, rank 0 prints what every rank met


def deprecated_flag(value: Any, old: Any, name: str, usage: str) -> Any:
    """A positional argument that an older option (`name`) also gave: the old spelling still works, with a
    note; neither is an error naming the `usage`."""
    if old is not None:
        log(f"note: {name} is deprecated and will go; give it first instead: `{usage}`")
    if value is None and old is None:
        fail(f"missing the SAE folder: `{usage}`")
    return value if value is not None else old


def full_short_help(*apps: typer.Typer) -> None:
    """Let `tide --help` list each command with its docstring's whole first paragraph: click cuts the short
    help at ~45 characters otherwise."""
    import inspect

    for group in apps:
        for info in group.registered_commands:
            first = inspect.cleandoc(info.callback.__doc__ or "").split("\n\n")[0]
            info.short_help = info.short_help or " ".join(first.split())


# --- config file + flags -> pydantic ---------------------------------------------------------------


def default_text(value: Any) -> str:
    """A default as `--help` and docs/settings.md write it (`[default: <this>]`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(default_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | Path) and Path(value).is_absolute() and Path(value).is_relative_to(REPO):
        return Path(value).relative_to(REPO).as_posix()  # the shipped model, not this machine's path
    return str(value)


def keys(model_cls) -> dict[str, str]:
    """Every name a config file may use for a field (its validation aliases, then its own name) -> field."""
    from pydantic import AliasChoices

    names = {}
    for field_name, field in model_cls.model_fields.items():
        alias = field.validation_alias
        aliases = (
            alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        )
        names |= {str(a): field_name for a in aliases} | {field_name: field_name}
    return names


def config_key(model_cls, field_name: str) -> str:
    """The key a config file should use for a field: its option's name (`arch` for TrainConfig.archs)."""
    return next(key for key, name in keys(model_cls).items() if name == field_name)


def explain(err: dict, model_cls, flags: dict, config: Path | None) -> str:
    """One pydantic error as `where: what`, where is the flag or the config file's key."""
    import difflib

    loc = [str(p) for p in err["loc"]]
    if not loc:
        return err["msg"].removeprefix("Value error, ")
    key, item = loc[0], "".join(f"[{p}]" for p in loc[1:])
    if err["type"] == "extra_forbidden":
        names = keys(model_cls)
        if key in names:  # two names of one setting, e.g. arch and archs
            return f"{key} in {config} sets {names[key]} again; keep one of its names"
        close = difflib.get_close_matches(key, list(names), n=1)
        return (
            f"{key} in {config} is not a setting of {model_cls.__name__}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + "; `tide config-reference` lists every key"
        )
    where = f"--{key.replace('_', '-')}" if key in flags else f"{key} in {config}" if config else key
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error":  # pydantic's own messages do not show the value; ours do
        msg = f"got {err['input']!r}; {msg[0].lower()}{msg[1:]}"
    return f"{where}{item}: {msg}"


def given_flags(values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A command's parameters as config overrides: None for every option not given, so that a config file can
    set it; an on/off flag that is off is not given either, and `--no-X` sets X to false."""
    flags = {}
    for name, value in values.items():
        if name in skip:
            continue
        if isinstance(value, bool) and name.startswith("no_"):
            flags[name.removeprefix("no_")] = False if value else None
        else:
            flags[name] = (value or None) if isinstance(value, bool) else value
    return flags


def build_config(model_cls, config: Path | None, overrides: dict) -> tuple[Any, set[str]]:
    """Config file values, then every flag the user actually gave, validated by the stage's pydantic model.

    Returns the config and the fields the user set (in the file or by a flag); flags left at None are unset.
    """
    from pydantic import ValidationError
    from tide.harvest.config import load_config_file

    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        values = load_config_file(config) if config is not None else {}
    except ValueError as e:
        fail(str(e))
    names = keys(model_cls)
    for key in flags:  # a flag replaces the file's value under any name of the setting (--arch over archs:)
        for other in [k for k in values if k != key and names.get(k) == names.get(key)]:
            del values[other]
    values.update(flags)
    try:
        cfg = model_cls(**values)
    except ValidationError as e:
        fail("; ".join(explain(err, model_cls, flags, config) for err in e.errors()))
    return cfg, {names.get(k, k) for k in values}


def flags_config(model_cls, **flags: Any) -> Any:
    """A command's config from its flags alone (no config file); a refused value names its flag."""
    return build_config(model_cls, None, flags)[0]


# --- every setting ---------------------------------------------------------------------------------


def setting_options(app: typer.Typer, command: str, model_cls) -> dict[str, str]:
    """Config field -> the `tide COMMAND` option that sets it (`--no-progress` for progress)."""
    from typer.main import get_command

    names = keys(model_cls)
    found = {}
    for param in get_command(app).commands[command].params:
        name = param.name.removeprefix("no_")  # --no-progress sets progress
        if name in names:
            found[names[name]] = param.opts[0]
    return found


def config_reference(app: typer.Typer) -> str:
    """Markdown tables of every HarvestConfig and TrainConfig field: key, option, default, docstring."""
    from tide.harvest.config import HarvestConfig
    from tide.train.fit.config import TrainConfig

    parts = []
    for command, model_cls in (("harvest", HarvestConfig), ("train", TrainConfig)):
        options = setting_options(app, command, model_cls)
        rows = ["| key | option | default | meaning |", "| --- | --- | --- | --- |"]
        for name, field in model_cls.model_fields.items():
            key = config_key(model_cls, name)
            option_text = f"`{options[name]}`" if name in options else "file only"
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            if key != name:
                meaning += f" Older files may call it `{name}`."
            rows.append(f"| `{key}` | {option_text} | `{default_text(field.default)}` | {meaning} |")
        parts.append(f"`tide {command}` ({model_cls.__name__}):\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


def write_reference(app: typer.Typer, readme: Path) -> None:
    """Put the config reference between the markers of `readme` (docs/settings.md), replacing what was there."""
    start, end = REFERENCE_MARKERS
    old = readme.read_text()
    if start not in old or end not in old:
        fail(f"{readme} has no {start} ... {end} lines to put the reference between; add them")
    head, rest = old.split(start, 1)
    readme.write_text(f"{head}{start}\n{config_reference(app)}{end}{rest.split(end, 1)[1]}")
