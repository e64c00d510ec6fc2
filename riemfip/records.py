"""JSON records of results: one convention for every result object.

``to_json(path=None)`` on a result returns the record as indented JSON text and,
when ``path`` is given, also writes it there (creating folders).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["json_record"]


def json_record(record: dict, path: str | Path | None = None, *, indent: int = 2) -> str:
    """``record`` as JSON text; also written to ``path`` (with a final newline) when given."""
    text = json.dumps(record, indent=indent)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text
