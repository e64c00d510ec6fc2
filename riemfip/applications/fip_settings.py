"""The FIP settings an application run uses: its route's defaults, updated by the user's.

Recorded in each application's JSON so that a checkpoint is resumed only by a run
with the same settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

__all__ = ["resolve_fip_settings"]


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
