"""Optimizers that walk functionally invariant paths in weight space.

:class:`FIP` is a :class:`torch.optim.Optimizer` (geoopt's ``OptimMixin``) that
descends a secondary objective while keeping a network's outputs on anchor
inputs where they were; :mod:`.anchor` holds the anchor, :mod:`.output_solve`
the output-space solves with its pullback metric.
"""

from .anchor import Anchor, GaussianNoise, GroupFunction, NeighbourNoise, RandomShift
from .fip import FIP, AnchorDrift, FIPStepInfo
from .output_solve import AnchorSpectrum, OutputSolve, anchor_spectrum, solve_output_system

__all__ = [
    "FIP",
    "Anchor",
    "AnchorSpectrum",
    "OutputSolve",
    "anchor_spectrum",
    "solve_output_system",
    "AnchorDrift",
    "FIPStepInfo",
    "GaussianNoise",
    "NeighbourNoise",
    "RandomShift",
    "GroupFunction",
]
