"""The FIP settings an application run uses: its route's defaults, updated by the user's,
and the anchor inputs its path keeps.

The settings are recorded in each application's JSON and checkpoints, so that a
checkpoint is resumed only by a run with the same settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

__all__ = ["random_anchor", "resolve_fip_settings"]


def random_anchor(x: torch.Tensor, anchor_size: int, seed: int) -> torch.Tensor:
    """``anchor_size`` rows of ``x`` drawn without replacement by a generator seeded with
    ``seed``: the inputs whose outputs an application's FIP keeps.

    Raises
    ------
    ValueError
        ``anchor_size`` is not an integer in ``[2, len(x)]``.
    """
    integer = isinstance(anchor_size, int) and not isinstance(anchor_size, bool)
    if not (integer and 2 <= anchor_size <= len(x)):
        raise ValueError(f"anchor_size must be an integer in [2, {len(x)}], got {anchor_size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return x[torch.randperm(len(x), generator=gen, device=gen.device)[:anchor_size].to(x.device)]


def resolve_fip_settings(
    route: Callable,
    names: Sequence[str],
    settings: dict | None,
    default_fip_options: dict,
) -> dict:
    """Defaults of ``route``'s keyword arguments ``names``, updated by ``settings``.

    A ``fip_options`` left at ``None`` becomes a copy of ``default_fip_options``.

    Raises
    ------
    ValueError
        ``settings`` names an argument outside ``names``.
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"unknown fip_settings {unknown}; expected some of {tuple(names)}")
    params = inspect.signature(route).parameters
    out = {k: params[k].default for k in names}
    out.update(settings)
    if out.get("fip_options", ()) is None:
        out["fip_options"] = dict(default_fip_options)
    return out
