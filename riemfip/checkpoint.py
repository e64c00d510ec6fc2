"""Checkpoints a resumed run can trust: atomic writes, safe reads, settings checked.

A checkpoint file is written by :func:`torch.save` and holds one dictionary::

    {"format": "riemfip-checkpoint", "version": 1,
     "settings": {...},  # JSON values: everything that must match for an exact resume
     "step": 3,          # how far the run got (tasks, epochs, members, ...)
     "state": {...}}     # tensors, numbers, strings, None, lists, tuples and dicts

:func:`save_checkpoint` writes it to a temporary file in the same folder and moves
that over the old file with :func:`os.replace`, so an interrupted save leaves the
previous checkpoint whole. :func:`load_checkpoint` reads it with
``torch.load(weights_only=True)`` (no arbitrary code runs) and

* refuses a checkpoint written with other settings (:class:`SettingsMismatchError`,
  a ``ValueError`` naming the first setting that differs, both values, and the file);
* says so when the file is not a riemfip checkpoint (:class:`NotACheckpointError`)
  or is truncated or corrupted (:class:`CorruptCheckpointError`), with a one-line
  reason instead of an unpickling traceback.

:func:`resume_checkpoint` is the usual entry point of a run: ``None`` when there is
nothing to resume, else the checked checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "CorruptCheckpointError",
    "NotACheckpointError",
    "SettingsMismatchError",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
    "write_atomically",
]

#: The tag every riemfip checkpoint carries.
FORMAT = "riemfip-checkpoint"
#: The layout version this module writes (and the only one it reads).
VERSION = 1

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from."""


class NotACheckpointError(CheckpointError):
    """The file is readable but is not a riemfip checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """The file is empty, truncated or otherwise damaged."""


class SettingsMismatchError(CheckpointError):
    """The checkpoint was written by a run with other settings.

    Attributes
    ----------
    path : Path
    setting : str
        The first setting that differs, dotted for nested ones (``"method_config.lam"``).
    saved, current
        Its value in the checkpoint and in this run (``"<absent>"`` where it is missing).
    reason : str, optional
        Says what differs in words, for settings that are not JSON values (the
        message names ``saved`` and ``current`` otherwise).
    """

    def __init__(
        self, path: Path, setting: str, saved: Any, current: Any, *, reason: str | None = None
    ):
        self.path, self.setting, self.saved, self.current = path, setting, saved, current
        top = setting.split(".", 1)[0]
        reason = reason or (
            f"its {setting} is {saved!r}, this call's is {current!r}, so the {top} would "
            "differ from an uninterrupted run"
        )
        super().__init__(
            f"checkpoint {path} was written by a different run: {reason}; "
            "use another checkpoint path or delete the file"
        )


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` read.

    Attributes
    ----------
    path : Path
    settings : dict
        The settings it was written with (JSON values).
    step : int
        How far the run that wrote it got.
    state : dict
        The run's state.
    """

    path: Path
    settings: dict
    step: int
    state: dict

    def check_settings(self, settings: dict) -> None:
        """Raise :class:`SettingsMismatchError` unless ``settings`` equal the saved ones
        (as JSON values); it names the first setting that differs."""
        found = _first_difference(self.settings, _json_settings(settings))
        if found:
            raise SettingsMismatchError(self.path, *found)


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it to ``path``.

    The move is :func:`os.replace`, atomic on POSIX and Windows: readers see the
    old file or the new one, never half of one. Folders are created; the
    temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, whose files are private): the result
    # gets the permissions any new file gets.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _json_settings(settings: dict) -> dict:
    """``settings`` as JSON values (tuples become lists), so that saved and new ones compare."""
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings))
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint settings must be JSON values: {err}") from None


def save_checkpoint(path: str | Path, state: dict, *, settings: dict, step: int) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or Path
        The file (folders are created).
    state : dict
        Tensors, numbers, strings, ``None`` and lists, tuples and dicts of them (what
        ``torch.load(weights_only=True)`` reads back); e.g. ``model.state_dict()``,
        ``optimizer.state_dict()``, ``generator.get_state()``.
    settings : dict
        JSON values that a resumed run must match.
    step : int
        How far the run got (>= 0).

    Returns
    -------
    Path
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    record = {
        "format": FORMAT,
        "version": VERSION,
        "settings": _json_settings(settings),
        "step": step,
        "state": state,
    }
    return write_atomically(path, lambda fh: torch.save(record, fh))


def _first_difference(saved: Any, current: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key where two JSON values differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in [*current, *(k for k in saved if k not in current)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                return name, saved.get(key, "<absent>"), current.get(key, "<absent>")
            found = _first_difference(saved[key], current[key], name)
            if found:
                return found
        return None
    return None if saved == current else (prefix or "settings", saved, current)


def _read(path: Path, map_location: Any) -> Any:
    """``torch.load`` with ``weights_only=True``; failures as named one-line errors."""
    with path.open("rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if not head:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (an interrupted write?)")
    if head != _ZIP_MAGIC:
        raise NotACheckpointError(
            f"{path} is not a riemfip checkpoint: it is not a file written by torch.save"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise NotACheckpointError(
                f"{path} is not a riemfip checkpoint: it holds a {found.group(1)}, which a "
                "weights-only load refuses to build"
            ) from None
        reason = (text.strip().splitlines() or [type(err).__name__])[0][:200]
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be read ({reason}); "
            "delete it to start over"
        ) from None


def load_checkpoint(
    path: str | Path, *, settings: dict | None = None, map_location: Any = None
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, and check its settings.

    Parameters
    ----------
    path : str or Path
    settings : dict, optional
        This run's settings: the checkpoint's must be equal (as JSON values).
    map_location : optional
        As for :func:`torch.load` (e.g. the device the run is on).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    NotACheckpointError
        Not a file written by :func:`save_checkpoint` (another torch file, JSON, ...).
    CorruptCheckpointError
        Empty, truncated or damaged.
    SettingsMismatchError
        Written with other ``settings``; names the first setting that differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    record = _read(path, map_location)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise NotACheckpointError(
            f"{path} is a torch file but not a riemfip checkpoint (no {FORMAT!r} tag); "
            "it may predate riemfip's tagged checkpoints: delete it to start over"
        )
    if record.get("version") != VERSION or not {"settings", "step", "state"} <= set(record):
        raise NotACheckpointError(
            f"{path} is a riemfip checkpoint of version {record.get('version')!r}; "
            f"this riemfip reads version {VERSION}"
        )
    saved = Checkpoint(path, record["settings"], int(record["step"]), record["state"])
    if settings is not None:
        saved.check_settings(settings)
    return saved


def resume_checkpoint(
    path: str | Path | None, settings: dict | None, *, map_location: Any = None
) -> Checkpoint | None:
    """The checkpoint to resume from: ``None`` when ``path`` is ``None`` or absent.

    Otherwise :func:`load_checkpoint` with ``settings`` (``None``: the caller checks
    them later with :meth:`Checkpoint.check_settings`), and its errors.
    """
    if path is None or not Path(path).exists():
        return None
    return load_checkpoint(path, settings=settings, map_location=map_location)
