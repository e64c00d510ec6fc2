r"""Continual learning: train a network on a sequence of tasks and measure forgetting.

:func:`run_continual` trains one network on tasks ``0, 1, ...`` in turn with a
:class:`~riemfip.applications.continual_base.ContinualMethod` (fine-tuning,
EWC, experience replay, joint training, or a functionally invariant path) and
evaluates it on every task's test set after each one, giving the accuracy matrix
:math:`R_{ij}` = accuracy (%) on task :math:`j` after training task :math:`i`.

Scenarios
---------
``"task"`` (task-incremental)
    The task identity is known: each task owns the output units of its classes
    (``Dataset.classes``), logits of other tasks are masked out in training and
    at evaluation.
``"class"`` (class-incremental)
    One shared head (``num_classes`` units), no task identity: every test image
    is classified among all classes.

Memory
------
``memory_per_class`` training images of each class of each finished task are
stored (chosen at random, once); replay trains on them with their labels, FIP
uses them (inputs only) as the anchor of its metric. Other methods ignore them.

Summary numbers
---------------
*average accuracy*: mean of the last row of :math:`R`. *forgetting*: mean over
the tasks before the last of :math:`\max_{i < T-1} R_{ij} - R_{T-1,j}` (the best
accuracy the task ever had before the final task, minus its final accuracy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from riemfip.data import Dataset

from ..checkpoint import Checkpoint, resume_checkpoint, save_checkpoint
from ..labelled import check_dataset
from ..optim import PathOptimizer, batchnorm_eval
from .continual_methods import (
    EWC,
    ContinualMethod,
    FineTune,
    FIPMethod,
    Heads,
    Joint,
    Memory,
    Replay,
)
from .continual_result import ContinualResult, forgetting
from .gpm import GPM

__all__ = ["METHODS", "ContinualResult", "forgetting", "make_method", "run_continual"]

#: Method names accepted by :func:`run_continual`, with their classes.
METHODS: dict[str, type[ContinualMethod]] = {
    "finetune": FineTune,
    "ewc": EWC,
    "replay": Replay,
    "joint": Joint,
    "fip": FIPMethod,
    "gpm": GPM,
}

_SCENARIOS = ("task", "class")


def make_method(method: str | ContinualMethod) -> ContinualMethod:
    """A method instance from its name (default hyperparameters), or an instance passed through."""
    if isinstance(method, ContinualMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(
        f"unknown method {method!r}; expected one of {sorted(METHODS)} or a ContinualMethod"
    )


def _check_tasks(tasks: Sequence[Dataset]) -> list[Dataset]:
    if isinstance(tasks, Dataset) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError("tasks must be a non-empty sequence of Dataset (see riemfip.data)")
    for i, t in enumerate(tasks):
        check_dataset(t, name=f"task {i}")
        if t.num_classes != tasks[0].num_classes:
            raise ValueError(
                f"task {i} has num_classes={t.num_classes}, task 0 {tasks[0].num_classes}: "
                "tasks must share one label space (split_tasks(..., relabel=False))"
            )
    return list(tasks)


def _check_run_arguments(model_fn, scenario: str, epochs: int, batch_size: int, lr: float) -> float:
    """Check :func:`run_continual`'s settings; ``lr`` as a float."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if scenario not in _SCENARIOS:
        raise ValueError(f"scenario must be one of {_SCENARIOS}, got {scenario!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    return lr


def _heads(tasks: list[Dataset], scenario: str) -> Heads:
    if scenario == "class":
        return Heads(None)
    mask = torch.zeros(len(tasks), tasks[0].num_classes, dtype=torch.bool)
    for i, t in enumerate(tasks):
        mask[i, list(t.labels)] = True
    return Heads(mask.to(tasks[0].y_train.device))


@torch.no_grad()
def evaluate(
    model: nn.Module, tasks: Sequence[Dataset], heads: Heads, batch_size: int = 1000
) -> list[float]:
    """Test accuracy (%) on each task, through its head; the model is left in its mode."""
    was_training = model.training
    model.eval()
    try:
        accs = []
        for j, task in enumerate(tasks):
            correct = 0
            for s in range(0, len(task.x_test), batch_size):
                x, y = task.x_test[s : s + batch_size], task.y_test[s : s + batch_size]
                tid = torch.full_like(y, j)
                correct += int((heads.logits(model(x), tid).argmax(1) == y).sum())
            accs.append(100.0 * correct / len(task.x_test))
        return accs
    finally:
        model.train(was_training)


def _task_seed(seed: int, t: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (t + 1)) % (2**63 - 1)


def run_continual(
    tasks: Sequence[Dataset],
    method: str | ContinualMethod,
    model_fn: Callable[[], nn.Module],
    *,
    memory_per_class: int = 50,
    scenario: str = "task",
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> ContinualResult:
    """Train one network on ``tasks`` in order with ``method``; evaluate after each task.

    Parameters
    ----------
    tasks : sequence of Dataset
        The tasks, sharing one label space (e.g. :func:`riemfip.data.split_tasks`
        with ``relabel=False``); ``Dataset.classes`` gives each task's head.
    method : str or ContinualMethod
        ``"finetune"``, ``"ewc"``, ``"replay"``, ``"joint"``, ``"fip"`` (default hyperparameters;
        see :data:`METHODS`) or a configured instance, e.g. ``EWC(lam=1e3)``.
        The instance's cross-task state is filled in by the run.
    model_fn : callable
        ``() -> nn.Module`` with ``num_classes`` outputs; called once, under
        ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).
        The model is moved to the device and floating dtype of the task inputs.
    memory_per_class : int
        Training images kept of each class of each finished task (see module notes).
    scenario : {"task", "class"}
        Task-incremental (masked per-task heads) or class-incremental (shared head).
    epochs, lr, batch_size
        Training settings of every task.
    seed : int
        Seeds the initialisation, and each task's shuffling and memory choice
        (per task, so that a resumed run is identical to an uninterrupted one).
    checkpoint_dir : str or Path, optional
        After each task the state is saved to ``checkpoint_dir/task_NN.pt``
        (:func:`riemfip.checkpoint.save_checkpoint`); a later call with the same
        settings resumes after the last saved task. A checkpoint written with
        different settings raises :class:`~riemfip.checkpoint.SettingsMismatchError`
        (a ``ValueError`` naming the setting).
    progress : bool
        Show a tqdm progress bar over the training steps.

    Returns
    -------
    ContinualResult
    """
    tasks = _check_tasks(tasks)
    method = make_method(method)
    lr = _check_run_arguments(model_fn, scenario, epochs, batch_size, lr)
    model = _build_model(model_fn, tasks[0].x_train, seed)
    heads = _heads(tasks, scenario)
    memory = Memory(memory_per_class)
    config = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "memory_per_class": memory_per_class,
        "num_classes": tasks[0].num_classes,
        "model": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    settings = {
        "method": method.name,
        "method_config": method.config(),
        "scenario": scenario,
        "tasks": [t.name for t in tasks],
        **config,
    }
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
    device = tasks[0].x_train.device
    history, start_task = _resume(ckpt, len(tasks), settings, device, model, method, memory)
    steps = _steps_left(method, tasks, memory, start_task, epochs, batch_size)
    bar = tqdm(total=steps, disable=not progress, desc=f"{method.name}/{scenario}", leave=False)
    try:
        for t in range(start_task, len(tasks)):
            tic, cpu_tic = time.perf_counter(), time.process_time()
            n_steps = _learn_task(
                model, method, tasks, t, memory, heads, epochs, lr, batch_size, seed, bar
            )
            seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
            history.add(seconds, cpu_seconds, n_steps, evaluate(model, tasks, heads), method)
            bar.set_postfix_str(f"task {t}: {history.rows[-1][t]:.1f}%")
            if ckpt is not None:
                _save_task(ckpt, t, settings, model, method, memory, history)
    finally:
        bar.close()
    return ContinualResult(
        method=method.name,
        method_config=method.config(),
        scenario=scenario,
        tasks=[t.name for t in tasks],
        task_classes=[list(t.labels) for t in tasks],
        accuracy=np.asarray(history.rows, dtype=float),
        config=config,
        seconds=history.seconds,
        cpu_seconds=history.cpu_seconds,
        steps=history.steps,
        diagnostics=history.diagnostics,
    )


def _build_model(model_fn, x: torch.Tensor, seed: int) -> nn.Module:
    """``model_fn()`` under ``torch.manual_seed(seed)`` (the global RNG state restored), on
    the device and floating dtype of the inputs ``x``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    model.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    return model


@dataclass
class _History:
    """What a run has measured, one entry per finished task; saved in each checkpoint."""

    rows: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)

    def add(self, seconds, cpu_seconds, steps, accuracy, method) -> None:
        """Record a finished task: its times and steps, the accuracy on every task after it,
        and the method's diagnostics (read now)."""
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu_seconds)
        self.steps.append(steps)
        self.rows.append(accuracy)
        self.diagnostics.append(method.diagnostics())

    def state(self) -> dict:
        """The checkpointed part of a run's state."""
        return {
            "rows": self.rows,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "steps": self.steps,
            "diagnostics": self.diagnostics,
        }


def _resume(folder, num_tasks, settings, device, model, method, memory) -> tuple[_History, int]:
    """The history so far and the first task to train: from the last checkpoint in
    ``folder`` (restoring ``model``, ``method`` and ``memory`` from it), else empty and 0."""
    saved = _latest_checkpoint(folder, num_tasks, settings, device)
    if saved is None:
        return _History(), 0
    for part, holder in (("model", model), ("method", method), ("memory", memory)):
        holder.load_state_dict(saved.state[part])
    history = _History(
        rows=saved.state["rows"],
        seconds=saved.state["seconds"],
        cpu_seconds=list(saved.state.get("cpu_seconds", [])),
        steps=list(saved.state.get("steps", [])),
        diagnostics=saved.state["diagnostics"],
    )
    return history, saved.step


def _steps_left(method, tasks, memory, start_task, epochs, batch_size) -> int:
    """The optimizer steps of tasks ``start_task, ...`` (the progress bar's total)."""
    steps = 0
    for t in range(start_task, len(tasks)):
        x, _, _ = method.training_data(t, tasks, memory)
        steps += epochs * math.ceil(len(x) / batch_size)
    return steps


def _learn_task(model, method, tasks, t, memory, heads, epochs, lr, batch_size, seed, bar) -> int:
    """Train task ``t`` under its own seed (the global RNG state restored afterwards), then
    let the method and the memory close it; the number of optimizer steps taken."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_task_seed(seed, t))
        gen = torch.Generator().manual_seed(_task_seed(seed, t))
        n_steps = _train_task(
            model, method, tasks, t, memory, heads, epochs, lr, batch_size, gen, bar
        )
        method.end_task(model, tasks[t], t, heads)
        memory.add_task(tasks[t], t, gen)
    return n_steps


def _save_task(folder: Path, t: int, settings: dict, model, method, memory, history) -> None:
    """Checkpoint the run after task ``t`` (:func:`~riemfip.checkpoint.save_checkpoint`)."""
    state = {
        "model": model.state_dict(),
        "method": method.state_dict(),
        "memory": memory.state_dict(),
        **history.state(),
    }
    save_checkpoint(_task_file(folder, t), state, settings=settings, step=t + 1)


def _train_task(model, method, tasks, t, memory, heads, epochs, lr, batch_size, gen, bar) -> int:
    """Train task ``t``; the number of optimizer steps taken."""
    x, y, tid = method.training_data(t, tasks, memory)
    steps = 0
    opt = method.optimizer(model, lr, t, memory)
    model.train()
    if isinstance(opt, PathOptimizer):  # BatchNorm by the old task's statistics, kept and used
        batchnorm_eval(model)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen, device=gen.device).to(x.device)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            loss = method.loss(model, x[idx], y[idx], tid[idx], t, memory, heads, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{method.name}: the training loss became {loss.item()} during task {t}; "
                    "lower lr (or the method's penalty weight)"
                )
            loss.backward()
            opt.step()
            method.after_step(model, lr)
            bar.update(1)
            steps += 1
    return steps


def _task_file(folder: Path, t: int) -> Path:
    return folder / f"task_{t:02d}.pt"


def _latest_checkpoint(
    folder: Path | None, num_tasks: int, settings: dict, device: torch.device
) -> Checkpoint | None:
    """The checkpoint of the last finished task in ``folder``, checked against ``settings``."""
    if folder is None:
        return None
    for t in reversed(range(num_tasks)):
        saved = resume_checkpoint(_task_file(folder, t), settings, map_location=device)
        if saved is not None:
            return saved
    return None
