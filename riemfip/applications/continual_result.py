"""What a continual-learning run measured: :class:`ContinualResult` (the accuracy matrix,
its summary numbers, the JSON record and the heat map) and :func:`forgetting`.

Both are re-exported from :mod:`riemfip.applications.continual`, whose notes define the
summary numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..plotting import png_figure
from ..records import JsonRecord

__all__ = ["ContinualResult", "forgetting"]


def forgetting(accuracy: np.ndarray) -> tuple[float, list[float]]:
    """Average and per-task forgetting of an accuracy matrix ``R[i, j]``.

    Forgetting of task ``j < T-1`` is ``max(R[j:T-1, j]) - R[T-1, j]``: its best
    accuracy after it was learned and before the last task, minus its final
    accuracy. With a single task there is nothing to forget (``nan``, ``[]``).
    """
    r = np.asarray(accuracy, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"accuracy must be a square matrix, got shape {r.shape}")
    n = r.shape[0]
    per_task = [float(r[j : n - 1, j].max() - r[n - 1, j]) for j in range(n - 1)]
    return (float(np.mean(per_task)) if per_task else math.nan), per_task


@dataclass
class ContinualResult(JsonRecord):
    """Outcome of :func:`~riemfip.applications.continual.run_continual`.

    Attributes
    ----------
    method : str
    method_config : dict
        The method's hyperparameters.
    scenario : {"task", "class"}
    tasks : list of str
        Task names.
    task_classes : list of list of int
        The labels of each task.
    accuracy : numpy.ndarray
        ``(T, T)``: ``accuracy[i, j]`` is the test accuracy (%) on task ``j`` after
        training task ``i`` (entries ``j > i`` are tasks not yet trained).
    config : dict
        Run settings (epochs, lr, batch size, seed, memory per class, ...).
    seconds : list of float
        Training time of each task (including the method's end-of-task work), wall clock.
    cpu_seconds : list of float
        The same, in CPU time of this process (``time.process_time``; steadier than wall
        time on a shared machine).
    steps : list of int
        Optimizer steps of each task.
    diagnostics : list of dict
        The method's diagnostics after each task (e.g. EWC Fisher scale, FIP drift).

    Notes
    -----
    The JSON record (:meth:`to_json`, tagged ``"application": "continual"``) also holds
    ``average_accuracy``, ``forgetting`` and ``per_task_forgetting``.
    """

    application = "continual"

    method: str
    method_config: dict
    scenario: str
    tasks: list[str]
    task_classes: list[list[int]]
    accuracy: np.ndarray
    config: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        """Mean final accuracy over all tasks (%)."""
        return float(np.mean(self.accuracy[-1]))

    @property
    def forgetting(self) -> float:
        """Mean forgetting over the tasks before the last (percentage points)."""
        return forgetting(self.accuracy)[0]

    @property
    def per_task_forgetting(self) -> list[float]:
        return forgetting(self.accuracy)[1]

    def to_dict(self) -> dict:
        """JSON-ready dictionary: the fields, then the summary numbers (not read back).

        ``cpu_seconds`` and ``steps`` are left out when empty (records made before they were
        kept), so such a record reads back and rewrites to the same JSON."""
        fg = self.forgetting
        fields = super().to_dict()
        for key in ("cpu_seconds", "steps"):
            if not fields.get(key):
                fields.pop(key, None)
        return {
            **fields,
            "average_accuracy": self.average_accuracy,
            "forgetting": None if math.isnan(fg) else fg,
            "per_task_forgetting": self.per_task_forgetting,
        }

    def summary(self) -> str:
        """A few lines: the accuracy matrix, average accuracy and forgetting."""
        width = max(8, *(len(t) for t in self.tasks))
        head = " " * 14 + "".join(f"{t:>{width + 1}}" for t in self.tasks)
        rows = [
            f"after task {i:<3d}" + "".join(f"{a:>{width + 1}.1f}" for a in row)
            for i, row in enumerate(self.accuracy)
        ]
        fg = self.forgetting
        tail = f"average accuracy {self.average_accuracy:.1f}%, forgetting " + (
            "n/a" if math.isnan(fg) else f"{fg:.1f} points"
        )
        return "\n".join([f"{self.method} ({self.scenario}-incremental)", head, *rows, tail])

    def plot_heatmap(self, file: str | Path, *, title: str | None = None) -> Path:
        """Write the accuracy matrix as a PNG heat map (needs matplotlib) and return the path."""
        r = np.asarray(self.accuracy)
        n = r.shape[0]
        with png_figure(file, figsize=(2.6 + 0.9 * n, 1.4 + 0.8 * n)) as (fig, ax):
            im = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j, i, f"{r[i, j]:.1f}", ha="center", va="center",
                        color="white" if r[i, j] < 60 else "black", fontsize=8,
                    )  # fmt: skip
            labels = [", ".join(map(str, c)) for c in self.task_classes]
            ax.set_xticks(range(n), labels, fontsize=7)
            ax.set_yticks(range(n), [f"after {i}" for i in range(n)], fontsize=7)
            ax.set_xlabel("evaluated on task (classes)")
            ax.set_ylabel("trained through task")
            fg = self.forgetting
            ax.set_title(
                title
                or f"{self.method}, {self.scenario}-incr.: avg {self.average_accuracy:.1f}%"
                + ("" if math.isnan(fg) else f", forgetting {fg:.1f}"),
                fontsize=9,
            )
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
        return Path(file)
