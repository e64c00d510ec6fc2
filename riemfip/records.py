"""JSON records of results: one convention for every result object.

A result is a dataclass that mixes in :class:`JsonRecord` and declares only its
fields. It then has

``to_dict()``
    The fields as JSON values: numpy arrays and tensors as (nested) lists, nested
    records as dictionaries, tuples as lists; first the ``"application"`` tag when
    the class sets one. A result that reports derived numbers (averages, a
    summary) extends it with them; they are not read back.
``to_json(path=None, *, indent=2)``
    That dictionary as indented JSON text, also written to ``path`` when given
    (folders created).
``from_json(text_or_path, *, key=None)``
    The result back from JSON text or a file: each field decoded by its type
    annotation (``np.ndarray``, ``torch.Tensor``, a nested record, a list or a
    ``dict[str, ...]`` of records, optionally ``| None``); every other key is
    ignored. ``from_json(r.to_json()).to_dict() == r.to_dict()``.

Tensors come back as float64 (integer data as int64); the records that hold
tensors keep them in float64.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from .checkpoint import write_atomically

__all__ = ["JsonRecord", "json_record", "jsonable", "percent_cells", "read_json"]

R = TypeVar("R", bound="JsonRecord")


def jsonable(value: Any) -> Any:
    """``value`` with arrays, tensors, records and tuples turned into JSON values."""
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def json_record(record: dict, path: str | Path | None = None, *, indent: int = 2) -> str:
    """``record`` as JSON text; also written to ``path`` (with a final newline) when given.

    The file is replaced atomically (:func:`riemfip.checkpoint.write_atomically`), so a
    record that doubles as a checkpoint (``sparsify_sweep``) is never left half written.
    """
    text = json.dumps(jsonable(record), indent=indent)
    if path is not None:
        write_atomically(path, lambda fh: fh.write((text + "\n").encode()))
    return text


def percent_cells(value: Callable[[Any], float], keys: Iterable, width: int) -> str:
    """One row of a results table: ``100 * value(key)`` for each key, right-aligned in
    ``width`` characters with one decimal, or ``-`` where ``value`` raises ``KeyError``."""
    cells = []
    for key in keys:
        try:
            cells.append(f"{100 * value(key):>{width}.1f}")
        except KeyError:
            cells.append(f"{'-':>{width}}")
    return "".join(cells)


def read_json(text_or_path: str | Path) -> Any:
    """Parse JSON text (a string starting with ``{`` or ``[``) or the JSON file at a path.

    Raises
    ------
    FileNotFoundError
        A path that does not exist.
    ValueError
        Text that is not JSON, naming where it came from.
    """
    if isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "["):
        text, source = text_or_path, "the JSON text"
    elif isinstance(text_or_path, (str, Path)):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no JSON record at {path}")
        text, source = path.read_text(), str(path)
    else:
        raise TypeError(f"expected JSON text or a path, got {type(text_or_path).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None


def _decode(hint: Any, value: Any) -> Any:
    """``value`` read from JSON as the annotation ``hint`` says."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if hint is np.ndarray:
        return np.asarray(value)
    if hint is torch.Tensor:
        return torch.as_tensor(np.asarray(value))
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_dict(value)
    if origin is list and args:
        return [_decode(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _decode(args[1], v) for k, v in value.items()}
    return value


class JsonRecord:
    """Mixin for dataclass results: ``to_dict``, ``to_json`` and ``from_json`` from the fields.

    Attributes
    ----------
    application : str or None
        Class attribute: the tag written as ``"application"`` first in the record and
        checked when reading (a record tagged otherwise is refused; an untagged one,
        as written before tags, is read by its fields).
    """

    application: ClassVar[str | None] = None

    def to_dict(self) -> dict:
        """The fields as JSON values, the ``"application"`` tag first when the class has one."""
        head = {} if self.application is None else {"application": self.application}
        body = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {**head, **body}

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """The record as JSON text; also written to ``path`` when given."""
        return json_record(self.to_dict(), path, indent=indent)

    @classmethod
    def from_dict(cls: type[R], data: dict) -> R:
        """The result from :meth:`to_dict`'s dictionary (extra keys, e.g. summaries, ignored).

        Raises
        ------
        TypeError
            ``data`` is not a dictionary.
        ValueError
            It is tagged as another application's record, or lacks a required field.
        """
        if not isinstance(data, dict):
            raise TypeError(f"a {cls.__name__} record is a JSON object, got {type(data).__name__}")
        tag = data.get("application")
        if cls.application is not None and tag is not None and tag != cls.application:
            raise ValueError(
                f"this is a {tag!r} record, not a {cls.application!r} one ({cls.__name__})"
            )
        hints = typing.get_type_hints(cls)
        values, missing = {}, []
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _decode(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(f.name)
        if missing:
            raise ValueError(f"not a {cls.__name__} record: it has no {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_json(cls: type[R], text_or_path: str | Path, *, key: str | None = None) -> R:
        """Read a record written by :meth:`to_json` (JSON text or a file path).

        Parameters
        ----------
        text_or_path : str or Path
            JSON text, or the path of a JSON file.
        key : str, optional
            Read the record stored under this top-level key of a file that holds
            several (e.g. ``"test"`` in ``benchmarks/results/connectivity_mnist.json``).
        """
        data = read_json(text_or_path)
        if key is not None:
            if not isinstance(data, dict) or key not in data:
                keys = sorted(data) if isinstance(data, dict) else type(data).__name__
                raise ValueError(f"no record under key {key!r}; the JSON has {keys}")
            data = data[key]
        return cls.from_dict(data)
