r"""Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021): learn new tasks in the
weight directions that earlier tasks' inputs do not see.

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

Projection
----------
While later tasks train, every protected layer's gradient (same layout) is

.. math::

    G \leftarrow G - (G M) M^\top ,

so an SGD step :math:`\Delta W = -\eta G` satisfies :math:`\Delta W M = 0`: the
outputs on inputs in the span of :math:`M` do not move, and on the stored
representation :math:`\|\Delta W R\|_F \le \eta \|G\|_F \sqrt{1 - \varepsilon}\,\|R\|_F`.
When :math:`k > d/2` the same projection is applied as :math:`G Q Q^\top`, :math:`Q` an
orthonormal basis of the complement (:math:`d - k` columns), whichever is cheaper.

Biases and normalisation layers
-------------------------------
The paper's networks have no biases; its code trains every one-dimensional
parameter (batch-norm scales and shifts) on the first task and zeroes their
gradients afterwards. Here:

* ``bias="freeze"`` (default, the paper's rule): from the second task on, only the
  projected weights of ``Linear`` and ``Conv2d`` layers move; biases and every other
  parameter (normalisation layers' affine parameters, anything else) are frozen.
* ``bias="augment"``: a bias is the weight of a constant input 1; input columns
  become :math:`[a; 1]`, the gradient :math:`[G_W, g_b]`, and both are projected
  together. Other parameters are still frozen.
* Batch-norm running statistics are frozen after the first task as well (batch-norm
  layers run in eval mode while later tasks train), so old tasks are evaluated with
  the statistics they were learned under. (The paper instead normalises with batch
  statistics at training and test time.)
* Task-incremental heads: the paper gives each task its own unconstrained output
  head. With a shared output layer and masked logits (:class:`Heads`), the rows of
  the output layer for classes that no finished task owns are left unprojected
  (with their biases), which is the same thing; in the class-incremental scenario
  every row is projected.

``Conv2d`` layers must have ``groups=1``, zero padding given as numbers, and
``padding_mode="zeros"``; the module raises ``ValueError`` for others.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .continual_methods import ContinualMethod

__all__ = ["GPM", "BasisMemory", "ProjectedSGD", "input_columns", "rank_for_energy"]

_BIAS_MODES = ("freeze", "augment")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
        proj = torch.eye(len(gram), dtype=gram.dtype) - basis @ basis.T
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
        How biases are treated (module docstring); ``"augment"`` adds the constant
        input to each layer's columns.

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
            basis = self.bases.get(name, torch.zeros(d, 0, dtype=torch.float64))
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


class ProjectedSGD(torch.optim.SGD):
    r"""SGD whose ``step`` first projects each protected layer's gradient off its basis.

    :math:`G \leftarrow G - (GM)M^\top` (or :math:`GQQ^\top` with the complement
    :math:`Q` when that is cheaper) for every layer of ``memory.bases``; parameters
    outside the projected set get no gradient (see the module docstring). The
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


def _check_fraction(name: str, value, low_open: bool) -> float:
    v = float(value)
    if not (math.isfinite(v) and (v > 0 if low_open else v >= 0) and v <= 1):
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")
    return v


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class GPM(ContinualMethod):
    r"""Gradient Projection Memory as a continual-learning method (see the module docstring).

    Task 0 trains with plain SGD. After each task :math:`t`, ``samples`` random
    training inputs of the task extend every layer's basis at threshold
    :math:`\varepsilon_t = \min(1, \varepsilon_0 + t\delta)`; later tasks train with
    :class:`ProjectedSGD`. No replay: the memory of stored images is not used.

    Parameters
    ----------
    threshold : float
        :math:`\varepsilon_0 \in (0, 1]` (default 0.97).
    threshold_increment : float
        :math:`\delta \in [0, 1]` per task (default 0.003).
    samples : int
        Training inputs of each task in its representation matrix (default 300, the
        authors' MLP setting; every output position of a convolution is a column).
    bias : {"freeze", "augment"}
        Biases frozen after the first task (the paper's rule) or projected with the
        weights as the weights of a constant input.
    batch_size : int
        Inputs per forward pass when the representation is collected.
    seed : int
        Seeds the choice of the ``samples`` inputs (per task).
    momentum : float
        SGD momentum, as for :class:`ContinualMethod`.
    """

    name = "gpm"

    def __init__(
        self,
        *,
        threshold: float = 0.97,
        threshold_increment: float = 0.003,
        samples: int = 300,
        bias: str = "freeze",
        batch_size: int = 100,
        seed: int = 0,
        momentum: float = 0.0,
    ):
        super().__init__(momentum=momentum)
        self.threshold = _check_fraction("threshold", threshold, low_open=True)
        self.threshold_increment = _check_fraction(
            "threshold_increment", threshold_increment, low_open=False
        )
        self.samples = _check_count("samples", samples)
        self.batch_size = _check_count("batch_size", batch_size)
        self.seed = int(seed)
        self.memory = BasisMemory(bias)
        self.seen_classes: list[int] = []
        self.task_incremental = False
        self._last: dict = {}

    def config(self) -> dict:
        return {
            **super().config(),
            "threshold": self.threshold,
            "threshold_increment": self.threshold_increment,
            "samples": self.samples,
            "bias": self.memory.bias,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def task_threshold(self, t: int) -> float:
        r""":math:`\varepsilon_t = \min(1, \varepsilon_0 + t\delta)`."""
        return min(1.0, self.threshold + t * self.threshold_increment)

    def free_rows(self, num_outputs: int) -> torch.Tensor | None:
        """Output units no finished task owns (task-incremental), else ``None``."""
        if not self.task_incremental:
            return None
        free = torch.ones(num_outputs, dtype=torch.bool)
        free[self.seen_classes] = False
        return free

    def optimizer(self, model, lr, t, memory):
        if not self.memory.bases:
            return super().optimizer(model, lr, t, memory)
        head = dict(model.named_modules()).get(self.memory.head)
        free = None if head is None else self.free_rows(head.weight.shape[0])
        if free is not None:
            free = free.to(head.weight.device)
        return ProjectedSGD(model, self.memory, lr=lr, momentum=self.momentum, free_rows=free)

    def loss(self, model, x, y, task_ids, t, memory, heads, generator):
        if self.memory.bases:  # running statistics stay those of the first task
            for m in model.modules():
                if isinstance(m, _BATCH_NORMS):
                    m.eval()
        return super().loss(model, x, y, task_ids, t, memory, heads, generator)

    def end_task(self, model, task, t, heads):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        pick = torch.randperm(len(task.x_train), generator=gen)[: self.samples]
        threshold = self.task_threshold(t)
        sizes = self.memory.update(
            model, task.x_train[pick.to(task.x_train.device)], threshold, batch_size=self.batch_size
        )
        self.task_incremental = heads.mask is not None
        self.seen_classes = sorted(set(self.seen_classes) | {int(c) for c in task.labels})
        self._last = {"threshold": threshold, "basis": {n: list(kd) for n, kd in sizes.items()}}

    def diagnostics(self) -> dict:
        """The threshold of the last update and each layer's basis size ``[k, d]``."""
        return dict(self._last)

    def state_dict(self) -> dict:
        return {
            "memory": self.memory.state_dict(),
            "seen_classes": list(self.seen_classes),
            "task_incremental": self.task_incremental,
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.seen_classes = list(state["seen_classes"])
        self.task_incremental = bool(state["task_incremental"])
