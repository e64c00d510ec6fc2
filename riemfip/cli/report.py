"""The run's page: one self-contained HTML file (plots embedded as base64, no scripts).

It shows, in order: the key numbers (``Outcome.summary``), the plots with their
captions, the plain-text tables, how the run was made (command line, seed, device,
versions, wall and CPU time per stage) and, folded, the whole JSON record.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from ..checkpoint import write_atomically

__all__ = ["render_report", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
th { font-weight: 600; } h3 { font-size: 1em; margin-bottom: 0.2em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _rows(summary: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested key numbers as ``("a / b", value)`` rows."""
    rows = []
    for key, value in summary.items():
        name = f"{prefix} / {key}" if prefix else str(key)
        if isinstance(value, dict):
            rows += _rows(value, name)
        else:
            rows.append((name, value))
    return rows


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(name)}</th><td class='num'>{_number(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table>{cells}</table>"


def _matrix(rows: dict[str, dict]) -> str:
    """``{row: {column: value}}`` as one table, a row per key (paths, methods, ...)."""
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        f"<tr><th>{html.escape(str(name))}</th>"
        + "".join(f"<td class='num'>{_number(values.get(c, ''))}</td>" for c in columns)
        + "</tr>"
        for name, values in rows.items()
    )
    return f"<table>{head}</tr>{body}</table>"


def _key_numbers(summary: dict) -> list[str]:
    """Scalars first in one table; then one titled table per group (a matrix when the
    group's values are all groups themselves)."""
    scalars = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    parts = [_table(scalars)] if scalars else []
    for key, value in summary.items():
        if not isinstance(value, dict):
            continue
        parts.append(f"<h3>{html.escape(str(key))}</h3>")
        nested = value and all(isinstance(v, dict) for v in value.values())
        parts.append(_matrix(value) if nested else _table(_rows(value)))
    return parts


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(Path(path).name)
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{alt}'>"
        f"<figcaption>{html.escape(caption)} ({alt})</figcaption></figure>"
    )


def render_report(outcome, record: dict, figures: list[tuple[Path, str]]) -> str:
    """The page's HTML text."""
    timings = [
        (stage, f"{t['wall_s']:.1f} s wall, {t['cpu_s']:.1f} s CPU")
        for stage, t in record["timings"].items()
    ]
    made = [
        ("command", " ".join(["riemfip", *record["argv"]])),
        ("seed", record["seed"]),
        ("device", record["device"]),
        ("resumed", record["resumed"]),
        ("started", record["started"]),
        ("finished", record["finished"]),
        *((f"version / {k}", v) for k, v in record["versions"].items()),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(outcome.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(outcome.title)}</h1>",
        "<h2>Key numbers</h2>",
        *_key_numbers(outcome.summary),
    ]
    if figures:
        parts += ["<h2>Plots</h2>", *(_figure(p, c) for p, c in figures)]
    for caption, text in outcome.tables:
        parts += [f"<h2>{html.escape(caption)}</h2>", f"<pre>{html.escape(text)}</pre>"]
    parts += [
        "<h2>How this run was made</h2>",
        _table(made),
        "<h3>Time per stage</h3>",
        _table(timings),
        "<details><summary>The whole JSON record (record.json)</summary>",
        f"<pre>{html.escape(json.dumps(record, indent=1))}</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(path: Path, outcome, record: dict, figures: list[tuple[Path, str]]) -> Path:
    """Write :func:`render_report` to ``path`` atomically."""
    text = render_report(outcome, record, figures)
    return write_atomically(path, lambda fh: fh.write(text.encode("utf-8")))
