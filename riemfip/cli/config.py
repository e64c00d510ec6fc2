"""``--config FILE.toml``: any option of a subcommand, read from a TOML file.

Keys are option names without the dashes, either spelling (``bezier-epochs`` or
``bezier_epochs``); values are TOML strings, numbers, booleans (for flags) or arrays
(for options that take several values). A file's values replace the defaults and the
command line replaces the file's::

    # tiny.toml
    hidden = [16]
    epochs = 1
    maxiter = 10

    riemfip demo --config tiny.toml --out runs/tiny

Each value goes through the option's own type and choices, so a file cannot set
what the command line could not.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["UsageError", "check_ranges", "config_defaults", "read_config"]

#: Options that a configuration file cannot set: they say where and how to run, not what.
RUN_CONTROL = ("config", "out", "force", "resume", "quiet", "help")


class UsageError(ValueError):
    """A command line or configuration file the command cannot run with."""


def read_config(path: str | Path) -> dict:
    """The TOML file at ``path`` as a dictionary; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no file at {path}")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"--config {path} is not valid TOML: {err}") from None


def config_defaults(parser: argparse.ArgumentParser, table: dict, source: str) -> dict:
    """``table``'s values as parser defaults (``dest -> value``), each checked as the
    command line would check it.

    Raises
    ------
    UsageError
        A key that is not an option of this parser, or a value of the wrong kind.
    """
    actions = {
        a.dest: a
        for a in parser._actions  # argparse keeps no public list of its actions
        if a.option_strings and a.dest not in RUN_CONTROL
    }
    out = {}
    for key, value in table.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in actions))
            raise UsageError(f"{source}: {key!r} is not an option here (options: {known})")
        out[dest] = _convert(action, value, f"{source}: {key}")
    return out


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` as the option would hold it after parsing."""
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise UsageError(f"{where} is a flag: give true or false, not {value!r}")
        return value
    several = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if several != isinstance(value, list) or isinstance(value, dict):
        kind = "an array" if several else "a single value"
        raise UsageError(f"{where} takes {kind}, not {value!r}")
    values = value if several else [value]
    if several and action.nargs == "+" and not values:
        raise UsageError(f"{where} needs at least one value")
    converted = []
    for v in values:
        if isinstance(v, (dict, list)):
            raise UsageError(f"{where}: {v!r} is not a single value")
        text = v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
        try:
            item = action.type(text) if action.type is not None else text
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise UsageError(f"{where}: invalid value {v!r} ({err})") from None
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UsageError(f"{where}: {v!r} is not one of {choices}")
        converted.append(item)
    return converted if several else converted[0]


def check_ranges(args, *, at_least: dict[str, int] | None = None, positive=()) -> None:
    """Refuse options out of range before a run writes anything.

    Parameters
    ----------
    args : argparse.Namespace
    at_least : dict
        ``{option dest: smallest allowed value}``.
    positive : iterable of str
        Options that must be > 0 (learning rates, damping, radii); list values are
        checked element by element.

    Raises
    ------
    UsageError
        Naming the first option out of range and its value.
    """
    for dest, low in (at_least or {}).items():
        value = getattr(args, dest)
        if value < low:
            raise UsageError(f"--{dest.replace('_', '-')} must be >= {low}, got {value}")
    for dest in positive:
        value = getattr(args, dest)
        for v in value if isinstance(value, list) else [value]:
            if not v > 0:
                raise UsageError(f"--{dest.replace('_', '-')} must be > 0, got {value}")
