"""The networks the commands train, and the checkpoint files that hold them.

A network file (``riemfip train``'s ``model.pt``, ``riemfip demo``'s ``net_a.pt`` and
``net_b.pt``) is a :mod:`riemfip.checkpoint` file: its state is ``{"model": state_dict}``,
its settings say what to rebuild and on which data it was trained::

    {"network": {"name": "mlp", "sizes": [784, 100, 100, 10], "activation": "relu"},
     "data": {"name": "mnist-5k", "root": None},
     "training": {...}}

It is read with ``torch.load(weights_only=True)``: no code in a file runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from riemfip.applications.classifiers import mlp
from riemfip.checkpoint import NotACheckpointError, load_checkpoint, save_checkpoint
from riemfip.data import Dataset

__all__ = [
    "add_network_arguments",
    "build_network",
    "describe",
    "load_network",
    "network_spec",
    "same_architecture",
    "save_network",
]


def add_network_arguments(parser: argparse.ArgumentParser, *, hidden=(100, 100)) -> None:
    """``--hidden`` and ``--activation``: an MLP input-hidden...-classes."""
    group = parser.add_argument_group("network")
    group.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(hidden),
        metavar="WIDTH",
        help="hidden layer widths of the MLP",
    )
    group.add_argument("--activation", choices=("relu", "tanh"), default="relu", help="activation")


def network_spec(hidden, activation: str, data: Dataset) -> dict:
    """The MLP for ``data``: its input width, the hidden widths, its number of classes."""
    sizes = [int(data.x_train.shape[1]), *(int(h) for h in hidden), int(data.num_classes)]
    if min(sizes) < 1:
        raise ValueError(f"--hidden widths must be positive, got {list(hidden)}")
    return {"name": "mlp", "sizes": sizes, "activation": activation}


def build_network(spec: dict) -> nn.Module:
    """A fresh network of ``spec`` (initialised from torch's global generator)."""
    if spec.get("name") != "mlp":
        raise ValueError(f"unknown network {spec.get('name')!r}")
    return mlp(spec["sizes"], activation=spec["activation"])


def describe(spec: dict) -> str:
    """``"MLP 784-100-100-10 (relu)"``."""
    return f"MLP {'-'.join(map(str, spec['sizes']))} ({spec['activation']})"


def save_network(path: Path, net: nn.Module, settings: dict, *, steps: int) -> Path:
    """Write a network file (atomically); ``settings`` holds ``network``, ``data``, ``training``."""
    state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    return save_checkpoint(path, state, settings=settings, step=steps)


def load_network(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The network in a network file, in eval mode on ``device``, and the file's settings.

    Raises
    ------
    FileNotFoundError, NotACheckpointError, CorruptCheckpointError
        As :func:`riemfip.checkpoint.load_checkpoint`; ``NotACheckpointError`` also for a
        riemfip checkpoint that holds no network, or one whose weights do not fit it.
    """
    saved = load_checkpoint(path, map_location=device)
    spec = saved.settings.get("network")
    if not isinstance(spec, dict) or not isinstance(saved.state.get("model"), dict):
        raise NotACheckpointError(
            f"{path} is a riemfip checkpoint but holds no network (it was not written by "
            "`riemfip train` or `riemfip demo`)"
        )
    net = build_network(spec).to(device)
    try:
        net.load_state_dict(saved.state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise NotACheckpointError(
            f"{path}: its weights do not fit the {describe(spec)} it names ({first})"
        ) from None
    return net.eval(), saved.settings


def same_architecture(path_a: Path, spec_a: dict, path_b: Path, spec_b: dict) -> None:
    """Raise ``ValueError`` unless the two files hold networks of one architecture."""
    if spec_a != spec_b:
        raise ValueError(
            f"{path_a} holds an {describe(spec_a)} and {path_b} an {describe(spec_b)}: "
            "both networks must have one architecture"
        )
