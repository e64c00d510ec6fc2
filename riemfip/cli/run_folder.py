"""The output folder of a run: refusal, resume, checkpoints, stages and the files published.

Layout of ``--out DIR``::

    DIR/record.json        the JSON record (inputs, versions, seed, device, timings, results)
    DIR/report.html        one self-contained page (images embedded as base64)
    DIR/*.png              the plots
    DIR/*.pt               networks a run hands on (``riemfip train``, ``riemfip demo``)
    DIR/checkpoints/       what ``--resume`` continues from: run.json (the options) and
                           the checkpoints of the library calls

Rules:

* A run into a folder that is not empty refuses, unless ``--resume`` (continue the run
  whose ``checkpoints/run.json`` is there, with the same options) or ``--force`` (start
  over: ``checkpoints/`` is deleted, the run's own files are replaced, other files are
  left alone).
* Nothing is written before :meth:`RunFolder.start`, which the command calls only after
  every input was read and checked, so a run that fails on bad input leaves the folder
  as it was.
* Every file is written atomically (a temporary file in the same folder, then
  :func:`os.replace`): checkpoints by :mod:`riemfip.checkpoint`, the record by
  :func:`riemfip.records.json_record`, plots and the page here. A checkpoint
  interrupted while it is written leaves the previous one whole.
* The record, the plots and the page are published at the end, by :meth:`RunFolder.finish`.

For tests, ``RIEMFIP_STOP_AFTER=k`` in the environment stops a run with
:class:`KeyboardInterrupt` (as Ctrl-C would) right after its k-th checkpoint, and
``RIEMFIP_WAIT_AFTER=k`` makes it wait there (up to two minutes, with a ``waiting`` file in
its checkpoint folder while it does) for a real signal.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..records import json_record, jsonable, read_json
from .config import UsageError
from .progress import Progress

__all__ = ["Figure", "Outcome", "RunFolder", "versions"]

STATE = "checkpoints"
RUN_FILE = "run.json"
STOP_AFTER = "RIEMFIP_STOP_AFTER"
WAIT_AFTER = "RIEMFIP_WAIT_AFTER"


@dataclass
class Figure:
    """A PNG of the run: ``draw(path)`` writes it; ``caption`` goes under it in the page."""

    name: str
    caption: str
    draw: Callable[[Path], Any]


@dataclass
class Outcome:
    """What a subcommand hands back to be published.

    Attributes
    ----------
    title : str
        The page's heading.
    summary : dict
        The key numbers (nested dicts of numbers and strings), first in the page.
    results : dict
        Every figure of the run: the library results' ``to_dict()``.
    figures : list of Figure
    tables : list of (caption, text)
        Plain-text tables (the results' ``table()``/``summary()``).
    lines : list of str
        What the command prints on stdout when it ends.
    """

    title: str
    summary: dict
    results: dict
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def versions() -> dict:
    """Versions of what computed the run (Python, platform, riemfip, torch, numpy, geoopt)."""
    from riemfip import __version__

    out = {
        "riemfip": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import geoopt

        out["geoopt"] = geoopt.__version__
    return out


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class RunFolder:
    """The ``--out`` folder of one run.

    Parameters
    ----------
    out : Path
    command : str
        The subcommand (``"demo"``, ...).
    options : dict
        The run's options as JSON values, without ``--out``/``--force``/``--resume``/
        ``--quiet``/``--config``; a resumed run must have the same.
    force, resume : bool
    progress : Progress
    argv : list of str
        The command line, for the record.
    """

    def __init__(
        self,
        out: Path,
        command: str,
        options: dict,
        *,
        force: bool = False,
        resume: bool = False,
        progress: Progress | None = None,
        argv: list[str] | None = None,
    ):
        if force and resume:
            raise UsageError("--force starts over and --resume continues: give one of them")
        self.out = Path(out)
        self.command = command
        self.options = json.loads(json.dumps(jsonable(options)))
        self.force, self.resume = bool(force), bool(resume)
        self.progress = progress or Progress()
        self.argv = list(argv or [])
        self.timings: dict[str, dict] = {}
        self.started = False
        self._checkpoints = 0
        self._files: set[str] = set()
        self._stop_after = int(os.environ.get(STOP_AFTER, "0") or 0)
        self._wait_after = int(os.environ.get(WAIT_AFTER, "0") or 0)
        self._clock0 = _clock()
        self._date0 = datetime.datetime.now(datetime.timezone.utc)

    # ------------------------------------------------------------------ before start
    @property
    def state(self) -> Path:
        return self.out / STATE

    def check(self) -> None:
        """Refuse a folder this run may not write into; read-only.

        Raises
        ------
        UsageError
            ``--out`` is a file; it is not empty and neither ``--resume`` nor ``--force``
            was given; ``--resume`` finds no run, another subcommand's run, or a run with
            other options (the message names the first option that differs).
        """
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a folder")
        empty = not self.out.exists() or not any(self.out.iterdir())
        if self.resume:
            self._check_resumable()
        elif not empty and not self.force:
            raise UsageError(
                f"--out {self.out} is not empty: continue its run with --resume, "
                "start over with --force, or choose another folder"
            )

    def _check_resumable(self) -> None:
        run_file = self.state / RUN_FILE
        if not run_file.is_file():
            raise UsageError(f"--resume: {self.out} holds no run to resume (no {run_file})")
        saved = read_json(run_file)
        if saved.get("command") != self.command:
            raise UsageError(
                f"--resume: {self.out} holds a `riemfip {saved.get('command')}` run, "
                f"not a `riemfip {self.command}` one"
            )
        before = saved.get("options", {})
        for key in [*self.options, *(k for k in before if k not in self.options)]:
            now, then = self.options.get(key, "<absent>"), before.get(key, "<absent>")
            if now != then:
                raise UsageError(
                    f"--resume: --{key.replace('_', '-')} is {now!r} here but {then!r} in the "
                    f"run being resumed ({run_file}); give the same options, or start over "
                    "with --force"
                )

    # ------------------------------------------------------------------ the run
    def start(self) -> None:
        """Create the folder (with ``--force``, delete ``checkpoints/`` first) and write
        ``checkpoints/run.json``. Call it once the inputs are read and checked."""
        if self.force and self.state.is_dir():
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            run = {"command": self.command, "options": self.options, "argv": self.argv}
            json_record(run, self.state / RUN_FILE)
        self.started = True

    def checkpoint(self, name: str) -> Path:
        """Where the checkpoint ``name`` of this run lives (``checkpoints/name``)."""
        return self.state / name

    def path(self, name: str) -> Path:
        """A file the run hands on, directly in ``--out`` (listed in the record)."""
        self._files.add(name)
        return self.out / name

    def saved(self) -> None:
        """Count a checkpoint just written; with ``RIEMFIP_STOP_AFTER=k``, stop after the k-th."""
        self._checkpoints += 1
        if self._stop_after and self._checkpoints >= self._stop_after:
            raise KeyboardInterrupt(f"{STOP_AFTER}={self._stop_after}")
        if self._wait_after and self._checkpoints == self._wait_after:
            marker = self.state / "waiting"
            marker.touch()
            try:
                time.sleep(120)
            finally:
                marker.unlink(missing_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "", *, seed: int | None = None) -> Iterator[None]:
        """Time a stage (wall and CPU seconds, under ``name`` in the record) and say that it
        started (with ``detail``).

        ``seed`` seeds torch's global generator first, so that a stage computes the same
        whether or not the stages before it were loaded from checkpoints.
        """
        self.progress.say(f"riemfip {self.command}: {name}" + (f": {detail}" if detail else ""))
        if seed is not None:
            torch.manual_seed(seed)
        wall, cpu = _clock()
        yield
        wall1, cpu1 = _clock()
        self.timings[name] = {"wall_s": wall1 - wall, "cpu_s": cpu1 - cpu}

    # ------------------------------------------------------------------ the end
    def finish(self, outcome: Outcome) -> dict:
        """Draw the figures, write the record and the page; return the record."""
        from .report import write_report

        drawn = []
        for fig in outcome.figures:
            drawn.append((self._publish_png(fig), fig.caption))
        wall, cpu = _clock()
        self.timings["total"] = {"wall_s": wall - self._clock0[0], "cpu_s": cpu - self._clock0[1]}
        record = {
            "command": self.command,
            "argv": self.argv,
            "options": self.options,
            "seed": self.options.get("seed"),
            "device": self.options.get("device"),
            "resumed": self.resume,
            "started": self._date0.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "timings": self.timings,
            "summary": outcome.summary,
            "results": outcome.results,
            "files": sorted(
                self._files | {p.name for p, _ in drawn} | {"record.json", "report.html"}
            ),
        }
        json_record(record, self.path("record.json"))
        write_report(self.path("report.html"), outcome, record, drawn)
        return record

    def _publish_png(self, fig: Figure) -> Path:
        """``fig.draw`` into a temporary PNG next to its place, then moved there."""
        final = self.path(fig.name)
        tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}.png")
        try:
            fig.draw(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def interrupted_message(self) -> str:
        """What to tell a person who pressed Ctrl-C."""
        if not self.started:
            return f"riemfip {self.command}: interrupted before anything was written"
        resume = " ".join(
            ["riemfip", *(a for a in self.argv if a not in ("--force", "--resume")), "--resume"]
        )
        return (
            f"riemfip {self.command}: interrupted; the finished steps are saved in "
            f"{self.state}; continue with: {resume}"
        )
