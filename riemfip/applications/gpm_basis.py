r"""The input-space bases of Gradient Projection Memory (:mod:`riemfip.applications.gpm`):
each protected layer's input columns, and the basis memory that grows after each task.

The layer view
--------------
A ``Linear`` or ``Conv2d`` layer computes :math:`z = W a` (plus a bias) for each
*input column* :math:`a \in \mathbb R^d`: the layer's input vector for a
``Linear`` layer, one unfolded receptive field (:func:`torch.nn.functional.unfold`:
``C_in * k_h * k_w`` values, channel-major) for a ``Conv2d`` layer, with
:math:`W \in \mathbb R^{\text{out} \times d}` the weight in that layout
(``weight.reshape(out, -1)``). An update :math:`\Delta W` leaves the layer's
output on :math:`a` unchanged iff :math:`\Delta W a = 0`.

Representation and basis
------------------------
After task :math:`t` the layer's input columns on ``samples`` of the task's
training inputs (every output position of a convolution) form the representation
matrix :math:`R \in \mathbb R^{d \times N}`. With :math:`M` (:math:`d \times k`,
orthonormal columns) the basis stored so far, the part of :math:`R` it does not
explain is :math:`\hat R = (I - MM^\top) R` with SVD :math:`\hat R = U\Sigma V^\top`
(:math:`\sigma_1 \ge \sigma_2 \ge \dots`). The smallest :math:`r \ge 0` with

.. math::

    \|MM^\top R\|_F^2 + \sum_{i \le r} \sigma_i^2 \;\ge\; \varepsilon_t \|R\|_F^2
    \qquad (\text{Eq. 9 of the paper; Eq. 5 when } M \text{ is empty})

is taken, and :math:`M \leftarrow [M, u_1, \dots, u_r]`. The threshold grows by a
fixed increment per task, :math:`\varepsilon_t = \min(1, \varepsilon_0 + t\,\delta)`
(the authors' CIFAR-100 defaults :math:`\varepsilon_0 = 0.97`, :math:`\delta = 0.003`).
The paper's criterion is used for the first task too (the authors' code keeps one
direction fewer there, staying just below :math:`\varepsilon_0`). When
:math:`N > d` the SVD is taken through the Gram matrix
:math:`\hat R\hat R^\top = P RR^\top P` (:math:`P = I - MM^\top`, float64), so the
columns never need to be held.

``Conv2d`` layers must have ``groups=1``, zero padding given as numbers, and
``padding_mode="zeros"``; the module raises ``ValueError`` for others.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BasisMemory", "input_columns", "rank_for_energy"]

_BIAS_MODES = ("freeze", "augment")


def protected_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``Linear`` and ``Conv2d`` layers of ``model`` by qualified name; bad convs raise."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(
                    f"GPM supports Conv2d with groups=1, numeric zero padding; layer {name!r} "
                    f"has groups={m.groups}, padding={m.padding!r}, padding_mode={m.padding_mode!r}"
                )
            layers[name] = m
        elif isinstance(m, nn.Linear):
            layers[name] = m
    if not layers:
        raise ValueError("GPM needs a model with at least one nn.Linear or nn.Conv2d layer")
    return layers


def input_columns(layer: nn.Module, a: torch.Tensor, *, augment: bool = False) -> torch.Tensor:
    r"""The input columns :math:`a` of a layer as rows ``(n, d)``: :math:`z = W a (+ b)`.

    Parameters
    ----------
    layer : nn.Linear or nn.Conv2d
    a : torch.Tensor
        What the layer receives: ``(..., in_features)`` or ``(B, C_in, H, W)``.
    augment : bool
        Append a column of ones when the layer has a bias (:math:`[a; 1]`, the bias
        as the weight of a constant input).

    Returns
    -------
    torch.Tensor
        ``(n, d)`` with ``d = in_features`` or ``C_in * k_h * k_w`` (plus 1 with
        ``augment``), in the column order of ``weight.reshape(out, -1)``; for a
        convolution one row per sample and output position.
    """
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(
            a,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,
            stride=layer.stride,
        )
        cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        cols = a.reshape(-1, a.shape[-1])
    if augment and layer.bias is not None:
        cols = torch.cat([cols, cols.new_ones(len(cols), 1)], dim=1)
    return cols


def rank_for_energy(
    energies: torch.Tensor, total: float, threshold: float, kept: float = 0.0
) -> int:
    r"""The smallest :math:`r` with :math:`(\text{kept} + \sum_{i \le r} e_i) / \text{total} \ge \varepsilon`.

    Parameters
    ----------
    energies : torch.Tensor
        :math:`e_i = \sigma_i^2` of the residual representation, in decreasing order.
    total : float
        :math:`\|R\|_F^2`.
    threshold : float
        :math:`\varepsilon \in (0, 1]`.
    kept : float
        :math:`\|MM^\top R\|_F^2`, the energy the stored basis already holds.

    Returns
    -------
    int
        ``r`` (0 when the stored basis already reaches the threshold, or when the
        representation has no energy), never more than the number of energies above
        round-off (:math:`e_i > 10^{-10}\,\text{total}`), so :math:`\varepsilon = 1`
        keeps the numerical rank.
    """
    if total <= 0 or kept >= threshold * total:
        return 0
    significant = int((energies > 1e-10 * total).sum())
    reached = (kept + torch.cumsum(energies.double(), 0)) >= threshold * total
    hits = torch.nonzero(reached).flatten()
    r = int(hits[0]) + 1 if len(hits) else len(energies)
    return min(r, significant)


class _Representation:
    """Input columns of one layer, kept as rows while fewer than ``d``, else as a Gram matrix."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None
        self.count = 0

    def add(self, cols: torch.Tensor) -> None:
        cols = cols.detach().double()
        self.count += len(cols)
        if self.gram is None and self.count <= cols.shape[1]:
            self.rows.append(cols)
            return
        if self.gram is None:
            stacked = torch.cat(self.rows) if self.rows else cols.new_zeros(0, cols.shape[1])
            self.gram, self.rows = stacked.T @ stacked, []
        self.gram += cols.T @ cols

    def residual_spectrum(self, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        r"""``(energies, directions, total)`` of :math:`\hat R = (I - MM^\top)R`, energies decreasing.

        ``directions`` is ``(d, m)``, orthonormal columns; ``total`` is :math:`\|R\|_F^2`.
        Computed on the CPU (the columns are gathered on the model's device).
        """
        if self.gram is None:
            cols = torch.cat(self.rows).cpu()
            total = float(cols.pow(2).sum())
            resid = cols - (cols @ basis) @ basis.T
            _, s, vh = torch.linalg.svd(resid, full_matrices=False)
            return s.pow(2), vh.T, total
        gram = self.gram.cpu()
        total = float(torch.trace(gram))
        proj = torch.eye(len(gram), dtype=gram.dtype, device=gram.device) - basis @ basis.T
        vals, vecs = torch.linalg.eigh(proj @ gram @ proj)
        return vals.flip(0).clamp_min(0), vecs.flip(1), total


def _extend(basis: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``[M, U]`` with ``U`` re-orthonormalised against ``M`` and itself (span of ``U`` kept)."""
    if directions.shape[1] == 0:
        return basis
    directions = directions - basis @ (basis.T @ directions)
    q, _ = torch.linalg.qr(directions)
    return torch.cat([basis, q], dim=1)


class BasisMemory:
    r"""The stored input-space bases :math:`M_l` of every protected layer.

    Parameters
    ----------
    bias : {"freeze", "augment"}
        How biases are treated (:mod:`riemfip.applications.gpm`); ``"augment"`` adds
        the constant input to each layer's columns.

    Attributes
    ----------
    bases : dict of str to torch.Tensor
        Layer name to ``(d, k)`` float64 orthonormal columns on the CPU (empty until
        :meth:`update`).
    head : str or None
        The layer whose output is the model's output, found by :meth:`update`.
    """

    def __init__(self, bias: str = "freeze"):
        if bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
        self.bias = bias
        self.bases: dict[str, torch.Tensor] = {}
        self.head: str | None = None

    def _representations(
        self, model: nn.Module, x: torch.Tensor, batch_size: int = 100
    ) -> dict[str, _Representation]:
        """Every protected layer's input columns on ``x`` (model in eval mode, no grad)."""
        layers = protected_layers(model)
        reps = {name: _Representation() for name in layers}
        outputs: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(module, args, out):
                reps[name].add(input_columns(module, args[0], augment=self.bias == "augment"))
                outputs[name] = out

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(x), batch_size):
                    out = model(x[s : s + batch_size])
                    self.head = next((n for n, o in outputs.items() if o is out), None)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return {n: r for n, r in reps.items() if r.count}

    def update(
        self, model: nn.Module, x: torch.Tensor, threshold: float, *, batch_size: int = 100
    ) -> dict[str, tuple[int, int]]:
        r"""Add the directions of ``x``'s representation that reach ``threshold`` (Eq. 9).

        Returns
        -------
        dict of str to (int, int)
            Each layer's basis size ``(k, d)`` after the update.
        """
        if not isinstance(x, torch.Tensor) or len(x) == 0:
            raise ValueError("x must be a non-empty tensor of inputs (N, ...)")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        for name, rep in self._representations(model, x, batch_size).items():
            d = rep.gram.shape[0] if rep.gram is not None else rep.rows[0].shape[1]
            basis = self.bases.get(name, torch.zeros(d, 0, dtype=torch.float64, device="cpu"))
            energies, directions, total = rep.residual_spectrum(basis)
            kept = total - float(energies.sum())
            r = min(rank_for_energy(energies, total, threshold, kept), d - basis.shape[1])
            self.bases[name] = _extend(basis, directions[:, :r])
        return {n: (b.shape[1], b.shape[0]) for n, b in self.bases.items()}

    def state_dict(self) -> dict:
        return {"bias": self.bias, "bases": dict(self.bases), "head": self.head}

    def load_state_dict(self, state: dict) -> None:
        self.bias = state["bias"]
        self.bases = dict(state["bases"])
        self.head = state["head"]
