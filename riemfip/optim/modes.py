"""The two forms of a functionally invariant path optimizer, by name, for settings that are
written as data (application options, JSON records, configuration files)."""

from __future__ import annotations

from .anchored import PathOptimizer
from .fip import FIP
from .penalty import FIPPenalty

__all__ = ["MODES", "path_optimizer"]

#: ``"natural"``: :class:`FIP`; ``"penalty"``: :class:`FIPPenalty`.
MODES = {"natural": FIP, "penalty": FIPPenalty}


def path_optimizer(params, *, mode: str = "natural", **options) -> PathOptimizer:
    """``FIP(params, **options)`` or ``FIPPenalty(params, **options)`` by ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode](params, **options)
