"""Optimizers that walk functionally invariant paths in weight space.

:class:`FIP` is a Riemannian optimizer (geoopt's ``OptimMixin``) over the weight-space
manifold whose metric is the anchor metric: it descends a secondary objective while keeping
a network's outputs on anchor inputs where they were. :class:`FIPPenalty` is the authors'
penalty formulation. Both share the anchor (:mod:`.anchor`), the policy objects
(:mod:`.policies`) and the drift certificate (:class:`PathStepInfo`).
"""

from .anchor import Anchor, AnchorDrift
from .anchor_transforms import GaussianNoise, NeighbourNoise, RandomShift, ScaledNoise
from .anchored import PathOptimizer, PathStepInfo
from .batchnorm import BatchNormWarning, batchnorm_eval
from .fip import FIP
from .kronecker_direction import Kronecker
from .modes import MODES, path_optimizer
from .penalty import FIPPenalty
from .policies import AnchorSampling, DriftGuard, Exact, PullBack

__all__ = [
    "FIP",
    "Anchor",
    "AnchorDrift",
    "AnchorSampling",
    "BatchNormWarning",
    "DriftGuard",
    "Exact",
    "FIPPenalty",
    "GaussianNoise",
    "Kronecker",
    "MODES",
    "NeighbourNoise",
    "PathOptimizer",
    "PathStepInfo",
    "PullBack",
    "RandomShift",
    "ScaledNoise",
    "batchnorm_eval",
    "path_optimizer",
]
