r"""Data parallelism for the pullback metric: the task data split across processes.

With a :mod:`torch.distributed` process group of :math:`R` ranks, rank :math:`r` holds its
own shard :math:`S_r` of the task inputs (:math:`N_r` samples) and the *same* weights
:math:`w`. The metric is the one of the union of the shards,

.. math::

    g(w) = \frac1N \sum_{r=1}^{R} \sum_{b \in S_r} J_b^\top G(y_b) J_b + \lambda I,
    \qquad N = \sum_r N_r .

Each rank embeds its own samples with the **global** count,
:math:`F_r(w) = N^{-1/2}(\phi(f_b(w)))_{b \in S_r}`
(:meth:`~manifolds.output_metrics.OutputMetric.embed_samples` with ``samples=N``), so that
with :math:`J_r = \partial F_r/\partial w` every quantity of the metric is a sum of
per-rank terms:

.. math::

    g(w)\,v = \sum_r J_r^\top J_r v + \lambda v, \qquad
    J^\top h = \sum_r J_r^\top h_r, \qquad
    \|F(w') - F(w)\|^2 = \sum_r \|F_r(w') - F_r(w)\|^2 .

One all-reduce (sum) per such quantity gives every rank the same number; everything
computed from replicated vectors afterwards (conjugate-gradient inner products, the
damping term) is then identical on every rank without further communication.

:class:`DataParallel` holds the process group and :math:`N`, and is the one place in
:mod:`manifolds` that calls :mod:`torch.distributed` (gloo on the CPU, NCCL on GPUs: the
collectives run on whatever device the task inputs are on).
"""

from __future__ import annotations

import torch

__all__ = ["DataParallel"]


def _dist():
    """:mod:`torch.distributed`, imported only when data parallelism is asked for."""
    import torch.distributed as dist

    return dist


class DataParallel:
    r"""A process group over which the task data is split, and the global sample count.

    Build it with :meth:`over` (which checks the group and all-gathers the shards' sample
    shapes); the metric then calls :meth:`all_reduce_sum` on its per-rank sums. An optimizer
    that only averages gradients over the ranks builds it with :meth:`checked` (no samples).

    Attributes
    ----------
    group : torch.distributed.ProcessGroup
        The ranks that share the task data.
    samples : int or None
        :math:`N = \sum_r N_r`, the samples of all ranks: the embedding's
        :math:`N^{-1/2}` (``None`` from :meth:`checked`).
    local_samples : int or None
        :math:`N_r`, this rank's samples.
    """

    def __init__(self, group, samples: int | None = None, local_samples: int | None = None):
        self.group = group
        self.samples = None if samples is None else int(samples)
        self.local_samples = None if local_samples is None else int(local_samples)

    @classmethod
    def checked(cls, group) -> DataParallel:
        """``group`` checked to be a process group of an initialized :mod:`torch.distributed`
        (no collective; raises as :meth:`over` does)."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "a process_group was given but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) (or launch with torchrun) first"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD), got {type(group).__name__}"
            )
        return cls(group)

    @classmethod
    def over(cls, group, batches: list[torch.Tensor], dim: int) -> DataParallel:
        r"""Check ``group`` and this rank's input batches against the other ranks', and count
        the samples of all ranks (two small collectives; every rank must call this).

        Parameters
        ----------
        group : torch.distributed.ProcessGroup
            The process group (``torch.distributed.group.WORLD`` for all processes).
        batches : list of torch.Tensor
            This rank's input batches (sample axis first), all of one sample shape.
        dim : int
            The number of weights :math:`n`, which must agree across ranks.

        Raises
        ------
        RuntimeError
            :mod:`torch.distributed` is not available or not initialized.
        TypeError
            ``group`` is not a process group.
        ValueError
            The ranks' samples have different shapes, or their networks different numbers
            of weights (the message lists every rank's).
        """
        cls.checked(group)
        dist = _dist()
        x = batches[0]
        local = sum(int(b.shape[0]) for b in batches)
        # (number of samples, number of weights, ndim of a sample, sample shape padded by -1);
        # the padding width is the largest ndim, agreed on first.
        ndim = torch.tensor([x.ndim - 1], dtype=torch.int64, device=x.device)
        dist.all_reduce(ndim, op=dist.ReduceOp.MAX, group=group)
        row = torch.full((3 + int(ndim),), -1, dtype=torch.int64, device=x.device)
        row[0], row[1], row[2] = local, int(dim), x.ndim - 1
        row[3 : 3 + x.ndim - 1] = torch.tensor(x.shape[1:], dtype=torch.int64)
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        table = [[int(a) for a in r.tolist()] for r in rows]
        shapes = [tuple(r[3 : 3 + r[2]]) for r in table]
        dims = [r[1] for r in table]
        if len(set(shapes)) > 1:
            raise ValueError(
                "the ranks' task inputs have samples of different shapes, by rank: "
                f"{shapes}; every shard must hold samples of one shape"
            )
        if len(set(dims)) > 1:
            raise ValueError(
                f"the ranks' networks have different numbers of weights, by rank: {dims}; "
                "every rank must hold the same network"
            )
        return cls(group, sum(r[0] for r in table), local)

    @property
    def world_size(self) -> int:
        """:math:`R`, the number of ranks."""
        return _dist().get_world_size(self.group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_r t_r` on every rank, for a tensor outside autograd: ``t`` is reduced in
        place when contiguous (else a contiguous copy is), and returned."""
        t = t if t.is_contiguous() else t.contiguous()
        _dist().all_reduce(t, group=self.group)
        return t

    def in_step(self, has_batch: bool, device: torch.device) -> bool:
        """Whether every rank has a next batch (``True``) or none has (``False``), agreed by
        one all-reduce of one number; raises ``ValueError`` on every rank when some have one
        and others not (ranks whose data gives different numbers of batches would otherwise
        wait on each other's collectives forever)."""
        count = torch.tensor([float(has_batch)], dtype=torch.float64, device=device)
        have, world = int(self.all_reduce_sum(count).item()), self.world_size
        if 0 < have < world:
            raise ValueError(
                f"{have} of the {world} ranks have another batch and the others have none: "
                "every rank's data must give the same number of batches per pass (e.g. "
                "equal shards and the same batch size, or a DistributedSampler)"
            )
        return have == world

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`R^{-1}\sum_r t_r` on every rank, a new tensor (``t`` is left as it is),
        outside autograd: the average over ranks of, e.g., a gradient, as
        :class:`~torch.nn.parallel.DistributedDataParallel` takes it."""
        return self.all_reduce_sum(t.detach().clone()).div_(self.world_size)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_r t_r`, differentiable: the gradient flows to this rank's own term
        unchanged (:math:`\partial(\sum_s t_s)/\partial t_r = I`).

        Pair it with :meth:`shared` on the replicated inputs the terms depend on, so that
        their gradient collects every rank's term (see :meth:`shared`)."""
        return _SumOverRanks.apply(t, self)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        r"""``x`` itself, marked as replicated: identical on every rank, with its gradient
        summed over the ranks in the backward pass.

        For :math:`E = \sum_r E_r(x)` with :math:`x` the same on every rank,
        :math:`\partial E/\partial x = \sum_r \partial E_r/\partial x`: rank :math:`r` alone
        can only differentiate its own :math:`E_r`, and this all-reduce supplies the rest.
        So :math:`E` = ``sum(E_r(shared(x)))`` has the same value and the same gradient on
        every rank, and the same as one process holding all the data."""
        return _SharedAcrossRanks.apply(x, self)


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: the identity."""

    @staticmethod
    def forward(ctx, t, data_parallel):
        return data_parallel.all_reduce_sum(t.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedAcrossRanks(torch.autograd.Function):
    """Forward: the identity. Backward: all-reduce sum of the gradient."""

    @staticmethod
    def forward(ctx, x, data_parallel):
        ctx.data_parallel = data_parallel
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.data_parallel.all_reduce_sum(grad.clone()), None
