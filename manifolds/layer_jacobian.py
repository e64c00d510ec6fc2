r"""The exact output Jacobian of a network's layers, in factored form.

For flat weights :math:`w` holding an ordered subset of a network's parameters (a
*parameter group*; all of them for :class:`~manifolds.pullback.PullbackMetric`), let
:math:`F = N^{-1/2}(\phi(f(w; x_b)))_b \in \mathbb{R}^{m}`, :math:`m = NC`, be the embedded
outputs (:meth:`~manifolds.pullback.PullbackMetric.embed`) and :math:`J = \partial F /
\partial w`. When every parameter of the group belongs to a layer whose output is an affine
function of that parameter, the rows of :math:`J` factor through the layer:

.. math::

    J_{bc,\,l} = \frac{\partial F_{bc}}{\partial z^l_b}\,\frac{\partial z^l_b}{\partial w_l}
    = \sum_t \delta^l_{bct} \otimes (\text{what multiplies } w_l \text{ at position } t),

with :math:`z^l_b` the layer's output on sample :math:`b` and
:math:`\delta^l_{bc} = \partial F_{bc} / \partial z^l_b`. One forward pass records each
layer's input, and one backward pass per output unit :math:`c` (all :math:`C` batched, with
:math:`c`'s one-hot cotangent on every sample at once) gives every :math:`\delta^l`. Layer
kinds (one factor class each, with the same three methods ``gram``, ``jvp``, ``vjp``):

* ``nn.Linear`` (inputs ``(N, d_in)`` or ``(N, ..., d_in)``) and ``nn.Conv2d`` (any stride,
  padding, dilation, groups; with or without bias): :class:`~manifolds.affine_factors.AffineFactor`,
  the patches being the inputs or the unfolded receptive fields;
* ``nn.BatchNorm1d/2d/3d`` (running statistics), ``nn.LayerNorm``, ``nn.GroupNorm``,
  ``nn.RMSNorm``: :class:`~manifolds.normalization_factors.NormalizationFactor`.

:class:`FactoredJacobian` sums them: :math:`K = JJ^\top` (``m x m``), :math:`JV` and
:math:`J^\top Z` are small matrix products, with no further pass through the network and no
:math:`n`-sized matrix.

Assumptions, checked where they can be
--------------------------------------
* **Samples do not interact** (eval mode): :math:`F_{bc}` depends on sample :math:`b`'s
  input only, so the batched backward of :math:`\sum_b F_{bc}` gives each
  :math:`\delta_{bc}` separately. A BatchNorm anywhere in the network that runs on batch
  statistics (train mode, or ``track_running_stats=False``) breaks this: no factored route.
* Each layer of the group is applied exactly once per forward call, to a tensor whose first
  axis is the sample axis of the network's outputs (checked by shape where possible; a
  layer fed a ``(T, N, d)`` tensor with :math:`T = N` cannot be told apart).
* The layer's input is not changed in place afterwards (checked by its version counter).
  Its output may be (``ReLU(inplace=True)``): the hook hands the network a copy.

Anything else (another layer kind, a parameter shared between modules, a module whose
``forward`` is overridden, a layer called twice) gives ``None``, and callers take the
generic autograd route.

Memory: :math:`\delta^l` holds :math:`C` times the layer's output per sample, as the batched
backward produces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .affine_factors import conv2d_factors, linear_factors
from .flat import FlatModule
from .jacobian import JacobianOperator
from .normalization_factors import (
    batch_norm_factors,
    group_norm_factors,
    layer_norm_factors,
    rms_norm_factors,
)
from .output_metrics import OutputMetric
from .task_data import ModuleOutputs

__all__ = [
    "FactoredJacobian",
    "LayerPlan",
    "LayerSlots",
    "factored_layers",
    "layer_jacobian",
    "module_jacobian",
]

#: Layer kinds with a factored Jacobian: the class whose ``forward`` the module must use, and
#: the builder of its factors ``(module, offsets, inputs, deltas) -> list | None``.
_KINDS: tuple[tuple[type[nn.Module], Callable], ...] = (
    (nn.Linear, linear_factors),
    (nn.Conv2d, conv2d_factors),
    (nn.BatchNorm1d, batch_norm_factors),
    (nn.BatchNorm2d, batch_norm_factors),
    (nn.BatchNorm3d, batch_norm_factors),
    (nn.LayerNorm, layer_norm_factors),
    (nn.GroupNorm, group_norm_factors),
    (nn.RMSNorm, rms_norm_factors),
)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _builder(module: nn.Module) -> Callable | None:
    for kind, build in _KINDS:
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return build
    return None


@dataclass(frozen=True)
class LayerSlots:
    """One layer of a parameter group: the module, the flat offsets of its held parameters
    (``{"weight": ..., "bias": ...}``, either may be missing) and its factor builder."""

    module: nn.Module
    offsets: dict[str, int]
    build: Callable


@dataclass(frozen=True)
class LayerPlan:
    """The layers of a parameter group of ``module`` (:func:`factored_layers`)."""

    module: nn.Module
    layers: list[LayerSlots]


def factored_layers(module: nn.Module, names: Sequence[str]) -> LayerPlan | None:
    """The layers holding ``module``'s parameters ``names`` (flat weights hold them in this
    order), with their flat offsets; ``None`` when some parameter is not the weight or bias of
    a supported layer, or is shared between modules.

    Raises
    ------
    ValueError
        A name that is not one of ``module``'s parameters.
    """
    params = dict(module.named_parameters())
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for kind, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod, kind))
    layers: dict[nn.Module, dict[str, int]] = {}
    offset = 0
    for name in names:
        if name not in params:
            raise ValueError(f"{name!r} is not a parameter of {type(module).__name__}")
        hit = owners.get(id(params[name]), [])
        if len(hit) != 1 or hit[0][1] not in ("weight", "bias") or _builder(hit[0][0]) is None:
            return None
        layers.setdefault(hit[0][0], {})[hit[0][1]] = offset
        offset += params[name].numel()
    slots = [LayerSlots(mod, offsets, _builder(mod)) for mod, offsets in layers.items()]
    return LayerPlan(module, slots)


class FactoredJacobian(JacobianOperator):
    r""":math:`J = \partial F / \partial w` at one point, held as per-layer factors.

    Attributes
    ----------
    embedded : torch.Tensor
        :math:`F(w)`, flat, length :math:`m = NC` (sample-major).
    samples, width : int
        :math:`N` and :math:`C`.
    numel : int
        :math:`n`, the length of the flat weights.
    factors : list
        One factor per layer (per channel group for a grouped convolution).
    """

    def __init__(self, embedded: torch.Tensor, factors: list, samples: int, width: int, numel: int):
        self.embedded, self.factors = embedded, factors
        self.samples, self.width, self.numel = samples, width, numel

    def _zeros(self, *shape: int) -> torch.Tensor:
        return self.embedded.new_zeros(shape)

    def _check(self, name: str, t: object, size: int, what: str) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {type(t).__name__}")
        if t.ndim != 2 or t.shape[1] != size:
            raise ValueError(f"{name} must have shape (k, {size}) ({what}), got {tuple(t.shape)}")
        if t.dtype != self.embedded.dtype or t.device != self.embedded.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}, the Jacobian "
                f"{self.embedded.dtype} on {self.embedded.device}"
            )

    def gram(self) -> torch.Tensor:
        r""":math:`K = JJ^\top`, shape ``(m, m)``, rows and columns ordered ``(b, c)``."""
        n, c = self.samples, self.width
        gram = self._zeros(n, c, n, c)
        for factor in self.factors:
            factor.gram(gram)
        gram = gram.view(n * c, n * c)
        return 0.5 * (gram + gram.T)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`J v` for flat tangents ``v`` of shape ``(k, n)``; returns ``(k, m)``."""
        self._check("v", v, self.numel, "flat weights")
        out = self._zeros(v.shape[0], self.samples, self.width)
        for factor in self.factors:
            factor.jvp(v, out)
        return out.reshape(v.shape[0], -1)

    def vjp(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`J^\top z` for output-space vectors ``z`` of shape ``(k, m)``; returns ``(k, n)``."""
        self._check("z", z, self.samples * self.width, "embedded outputs")
        zz = z.reshape(z.shape[0], self.samples, self.width)
        out = self._zeros(z.shape[0], self.numel)
        for factor in self.factors:
            factor.vjp(zz, out)
        return out


class _Recorder:
    """Forward hooks that record each planned layer's input and output per call, and whether
    any BatchNorm of the network ran on batch statistics."""

    def __init__(self, plan: LayerPlan):
        self.plan = plan
        self.calls: list[list] = [[] for _ in plan.layers]
        self.broken = False
        self.mixing = False

    def __enter__(self) -> _Recorder:
        self.handles = [
            slot.module.register_forward_hook(self._layer_hook(i))
            for i, slot in enumerate(self.plan.layers)
        ]
        self.handles += [
            mod.register_forward_hook(self._batch_norm_hook)
            for mod in self.plan.module.modules()
            if isinstance(mod, _BATCH_NORMS)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _layer_hook(self, i: int):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                self.broken = True
                return None
            if not isinstance(output, torch.Tensor) or inputs[0].ndim == 0:
                self.broken = True
                return None
            x = inputs[0]
            self.calls[i].append((x.detach(), x._version, output))
            return output.clone()  # in-place ops downstream change the copy, not `output`

        return hook

    def _batch_norm_hook(self, module, inputs, output) -> None:
        self.mixing |= module.training or module.running_mean is None

    def usable(self, outputs: list[torch.Tensor]) -> bool:
        """Whether the recorded calls can be factored for these network outputs."""
        if self.broken or self.mixing or any(y.ndim != 2 for y in outputs):
            return False
        for calls in self.calls:
            if len(calls) != len(outputs):
                return False
            for (x, version, z), y in zip(calls, outputs, strict=True):
                if x._version != version or not z.requires_grad:
                    return False
                if x.shape[0] != y.shape[0] or z.ndim == 0 or z.shape[0] != y.shape[0]:
                    return False
        return True


def _output_gradients(calls: list[list], outputs: list[torch.Tensor], metric: OutputMetric):
    r"""Embedded outputs :math:`F` and, per layer, :math:`\delta` ``(N, C, *layer output)``."""
    n = sum(y.shape[0] for y in outputs)
    embedded, deltas = [], [[] for _ in calls]
    for i, y in enumerate(outputs):
        with torch.enable_grad():
            emb = metric.embed_samples(y, samples=n).reshape(y.shape[0], -1)
        width = emb.shape[1]
        eye = torch.eye(width, dtype=emb.dtype, device=emb.device)
        outs = [layer[i][2] for layer in calls]
        grads = [None] * len(outs)
        if outs and emb.requires_grad:
            cotangents = eye[:, None, :].expand(width, y.shape[0], width)
            grads = torch.autograd.grad(
                emb, outs, cotangents, is_grads_batched=True, allow_unused=True
            )
        for layer, g, z in zip(deltas, grads, outs, strict=True):
            layer.append(z.new_zeros(width, *z.shape) if g is None else g)
        embedded.append(emb.detach())
    deltas = [(torch.cat(d, dim=1) if len(d) > 1 else d[0]).transpose(0, 1) for d in deltas]
    return torch.cat(embedded).reshape(-1), deltas


def layer_jacobian(
    plan: LayerPlan,
    forward: Callable[[], list[torch.Tensor]],
    metric: OutputMetric,
    numel: int,
) -> FactoredJacobian | None:
    r"""Run ``forward`` (which returns the network's outputs as a list of ``(N_i, C)`` batches)
    with hooks on the plan's layers and return the factored :math:`J` of the embedded outputs
    :math:`F = N^{-1/2}(\phi(y_b))_b`, :math:`N = \sum_i N_i`; ``None`` when an assumption of
    the module docstring fails. The graph must reach the layers' outputs (``forward`` runs
    under :func:`torch.enable_grad`, with weights that require grad).
    """
    with _Recorder(plan) as recorder, torch.enable_grad():
        outputs = forward()
    if not outputs or not recorder.usable(outputs):
        return None
    embedded, deltas = _output_gradients(recorder.calls, outputs, metric)
    factors = []
    dtype = embedded.dtype  # layers run in a lower precision (autocast): factors in this one
    for i, (slot, calls) in enumerate(zip(plan.layers, recorder.calls, strict=True)):
        inputs = torch.cat([x for x, _, _ in calls]).to(dtype)
        built = slot.build(slot.module, slot.offsets, inputs, deltas[i].to(dtype))
        if built is None:
            return None
        factors.extend(built)
        deltas[i] = None  # the factor keeps what it needs (a copy, or only its rows)
    samples = sum(y.shape[0] for y in outputs)
    return FactoredJacobian(embedded, factors, samples, embedded.numel() // samples, numel)


def module_jacobian(
    flat: FlatModule,
    batches: list[torch.Tensor],
    w: torch.Tensor,
    metric: OutputMetric,
    precision=None,
) -> FactoredJacobian | None:
    r"""The factored :math:`J` of ``flat``'s outputs on ``batches`` (eval mode) at flat
    weights ``w``, or ``None`` where the network has no factored route. With a
    :class:`~manifolds.precision.MixedPrecision`, the passes run in its ``products`` dtype
    and the factors are kept in the weights' dtype."""
    plan = factored_layers(flat.module, flat.names)
    if plan is None:
        return None
    wp = w.detach().requires_grad_(True)
    outputs = ModuleOutputs(flat, batches, precision)
    return layer_jacobian(plan, lambda: outputs.per_batch(wp), metric, flat.dim)
