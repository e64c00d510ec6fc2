r"""The gradient projection of Gradient Projection Memory (:mod:`riemfip.applications.gpm`):
SGD that moves each protected layer's weights only off its stored basis.

Projection
----------
While later tasks train, every protected layer's gradient (in the layout of
:mod:`~riemfip.applications.gpm_basis`) is

.. math::

    G \leftarrow G - (G M) M^\top ,

so an SGD step :math:`\Delta W = -\eta G` satisfies :math:`\Delta W M = 0`: the
outputs on inputs in the span of :math:`M` do not move, and on the stored
representation :math:`\|\Delta W R\|_F \le \eta \|G\|_F \sqrt{1 - \varepsilon}\,\|R\|_F`.
When :math:`k > d/2` the same projection is applied as :math:`G Q Q^\top`, :math:`Q` an
orthonormal basis of the complement (:math:`d - k` columns), whichever is cheaper.
"""

from __future__ import annotations

import torch
from torch import nn

from .gpm_basis import BasisMemory, protected_layers

__all__ = ["ProjectedSGD"]


class ProjectedSGD(torch.optim.SGD):
    r"""SGD whose ``step`` first projects each protected layer's gradient off its basis.

    :math:`G \leftarrow G - (GM)M^\top` (or :math:`GQQ^\top` with the complement
    :math:`Q` when that is cheaper) for every layer of ``memory.bases``; parameters
    outside the projected set get no gradient (see :mod:`riemfip.applications.gpm`). The
    projectors are built once, here, in the parameters' dtype and device.

    Parameters
    ----------
    model : nn.Module
        The network; all its parameters are optimised.
    memory : BasisMemory
        Bases from earlier tasks.
    lr, momentum : float
        As for :class:`torch.optim.SGD` (no weight decay: it would undo the projection).
    free_rows : torch.Tensor, optional
        Boolean mask over the output units of ``memory.head``: rows left unprojected
        (the output units of tasks not yet finished, task-incremental).

    Raises
    ------
    ValueError
        A basis for a layer that ``model`` lacks, or of the wrong input dimension.
    """

    def __init__(
        self,
        model: nn.Module,
        memory: BasisMemory,
        *,
        lr: float,
        momentum: float = 0.0,
        free_rows: torch.Tensor | None = None,
    ):
        super().__init__(model.parameters(), lr=lr, momentum=momentum)
        layers = protected_layers(model)
        self._projectors = []
        projected = set()
        for name, basis in memory.bases.items():
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"the memory holds a basis for layer {name!r}, not in this model")
            with_bias = memory.bias == "augment" and layer.bias is not None
            if basis.shape[0] != layer.weight[0].numel() + with_bias:
                raise ValueError(
                    f"layer {name!r} takes {layer.weight[0].numel() + with_bias} input values, "
                    f"its stored basis has {basis.shape[0]}"
                )
            free = free_rows if name == memory.head else None
            self._projectors.append((layer, with_bias, free, *_projector(basis, layer.weight)))
            projected.add(layer.weight)
            if with_bias:
                projected.add(layer.bias)
        head = layers.get(memory.head) if free_rows is not None else None
        self._head_bias = None if head is None or head.bias is None else (head.bias, free_rows)
        self._frozen = [p for p in model.parameters() if p not in projected]

    @torch.no_grad()
    def project_(self) -> None:
        """Project the gradients in place (what :meth:`step` does before the SGD update)."""
        for p in self._frozen:
            if self._head_bias is not None and p is self._head_bias[0] and p.grad is not None:
                p.grad.mul_(self._head_bias[1].to(p.grad.dtype))
            else:
                p.grad = None
        for layer, with_bias, free, kind, mat in self._projectors:
            w = layer.weight
            if w.grad is None:
                continue
            if not w.grad.is_contiguous():
                w.grad = w.grad.contiguous()
            g = w.grad.view(len(w), -1)
            if with_bias:
                g = torch.cat([g, layer.bias.grad.unsqueeze(1)], dim=1)
            _project_rows_(g, kind, mat, free)
            if with_bias:
                w.grad.copy_(g[:, :-1].reshape(w.shape))
                layer.bias.grad.copy_(g[:, -1])

    def step(self, closure=None):
        self.project_()
        return super().step(closure)


def _project_rows_(
    g: torch.Tensor, kind: str, mat: torch.Tensor, free: torch.Tensor | None
) -> None:
    r"""In place: :math:`G \leftarrow G - (GM)M^\top` or :math:`G \leftarrow GQQ^\top`, rows ``free`` kept."""
    kept = None if free is None else g[free]
    if kind == "basis":
        g.addmm_(g @ mat, mat.T, alpha=-1.0)
    else:
        torch.mm(g @ mat, mat.T, out=g)
    if kept is not None:
        g[free] = kept


def _projector(basis: torch.Tensor, weight: torch.Tensor) -> tuple[str, torch.Tensor]:
    """``("basis", M)`` or ``("complement", Q)``, whichever has fewer columns, as ``weight``'s dtype."""
    d, k = basis.shape
    if k <= d - k:
        return "basis", basis.to(weight)
    q = torch.linalg.qr(basis, mode="complete")[0][:, k:]
    return "complement", q.to(weight)
