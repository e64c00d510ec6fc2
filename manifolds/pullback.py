r"""The task-induced pullback metric on weight space.

For weights :math:`w \in \mathbb{R}^n`, outputs :math:`y_b = f_b(w)` on a batch of
:math:`N` samples, and an output metric :math:`G` (see
:mod:`manifolds.output_metrics`),

.. math::

    g(w) = \frac{1}{N} \sum_{b=1}^{N} J_b^\top G(y_b) J_b + \lambda I,
    \qquad J_b = \partial y_b / \partial w .

Writing :math:`G = D\phi^\top D\phi` and
:math:`F(w) = N^{-1/2}\,(\phi(f_1(w)), \dots, \phi(f_N(w))) \in \mathbb{R}^m`, this is
:math:`g = J_F^\top J_F + \lambda I`: every operation below is an operation on the
Jacobian :math:`J = J_F` of the *embedded outputs* :math:`F` (see :meth:`PullbackMetric.embed`),
and none builds an :math:`n \times n` matrix except :meth:`PullbackMetric.dense`.

Geodesic equation
-----------------
With :math:`E = \tfrac12 \int \dot w^\top g(w) \dot w\,dt`, the terms from
:math:`\partial J` cancel (:math:`\partial_j J_{ik} = \partial_k J_{ij}`), leaving

.. math::

    (J^\top J + \lambda I)\,\ddot w = -J^\top D^2F(w)[\dot w, \dot w],

so :math:`\ddot w = -\Gamma(\dot w, \dot w) = -g^{-1} J^\top h` with :math:`h` a
forward-over-forward JVP, and :math:`g^{-1}J^\top h = J^\top (JJ^\top + \lambda I)^{-1} h`.
Because :math:`F` includes :math:`\phi`, :math:`h` already carries the output
metric's own Christoffel term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vjp

from . import pullback_solves as solves
from .conjugate_gradient import SolveResult
from .data_parallel import DataParallel
from .dense_acceleration import dense_acceleration
from .flat import FlatModule
from .forward_ad import gram_vector_product
from .gram import OutputGram
from .jacobian import AutogradJacobian, JacobianOperator, jacobian_at
from .layer_jacobian import module_jacobian
from .output_metrics import OutputMetric, get_output_metric
from .precision import MixedPrecision
from .spectrum import Spectrum, lanczos
from .task_data import ModuleOutputs, as_batches, check_module_takes
from .validation import check_vector

__all__ = ["PullbackMetric"]


class PullbackMetric:
    r"""Riemannian metric on flat weights pulled back from outputs on task data.

    .. math::

        g(w) = \frac1N \sum_b J_b^\top G(y_b) J_b + \lambda I

    Parameters
    ----------
    fn : callable
        ``w -> outputs`` for a flat 1-D weight tensor ``w``. A 0-D or 1-D output
        is one sample; an output of shape ``(N, ...)`` is ``N`` samples, the
        output metric acting on the last axis.
    output_metric : {"euclidean", "fisher", "bhattacharyya"} or OutputMetric
        The metric :math:`G` on one sample's outputs. ``"fisher"`` and
        ``"bhattacharyya"`` read outputs as logits.
    damping : float
        :math:`\lambda \ge 0`. With :math:`\lambda = 0` and more weights than
        embedded outputs the metric is singular; solves then return the
        minimum-norm (pseudo-inverse) solution and say so through the residual.
    dim : int, optional
        Number of weights :math:`n`; when given, every vector is checked against it.
    solver : {"auto", "dense", "output", "cg"}
        How :meth:`solve` and :meth:`acceleration` invert :math:`g`: ``"dense"``
        builds :math:`g` (only for small :math:`n`); ``"output"`` works in the
        :math:`m`-dimensional space of embedded outputs through
        :math:`JJ^\top` (Woodbury); ``"cg"`` runs conjugate gradients on
        :meth:`matvec`. ``"auto"`` takes ``"dense"`` for :math:`n \le 256`,
        else ``"output"`` for :math:`m \le 256`, else ``"cg"``.
    tol, maxiter : optional
        Conjugate-gradient relative tolerance (default 1e-10 in float64, 1e-5
        otherwise) and iteration cap (default ``min(10 n, 1000)``).
    on_failure : {"warn", "raise", "ignore"}
        What a solve that misses ``tol`` does: a :class:`~manifolds.validation.ConvergenceWarning`
        with the residual, a :class:`~manifolds.validation.NotConvergedError`, or nothing
        (the residual is still in :meth:`solve_result`).

    Notes
    -----
    :meth:`matvec` costs one dual-number forward pass (:mod:`torch.autograd.forward_ad`)
    that keeps the primal's autograd graph, plus one backward pass of the tangent; its
    measured cost against a loss's forward and backward pass is in ``benchmarks/README.md``.

    Examples
    --------
    The round sphere as a pullback of its embedding in :math:`\mathbb{R}^3`:

    >>> def sphere(w):
    ...     th, ph = w
    ...     return torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()])
    >>> g = PullbackMetric(sphere)
    >>> w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    >>> g.dense(w).diagonal()            # diag(1, sin^2 theta)
    tensor([1.0000, 0.7081], dtype=torch.float64)
    """

    dense_max = 256
    output_max = 256

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        output_metric: str | OutputMetric = "euclidean",
        damping: float = 0.0,
        dim: int | None = None,
        solver: str = "auto",
        tol: float | None = None,
        maxiter: int | None = None,
        on_failure: str = "warn",
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        damping = float(damping)
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        if solver not in solves.METHODS:
            raise ValueError(f"solver must be one of {solves.METHODS}, got {solver!r}")
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        self.fn = fn
        self.output_metric = get_output_metric(output_metric)
        self.damping = damping
        self.dim = None if dim is None else int(dim)
        self.solver = solver
        self.tol = tol
        self.maxiter = maxiter
        self.on_failure = on_failure
        self.module: FlatModule | None = None
        self.inputs: list[torch.Tensor] | None = None
        self._output_dim: int | None = None
        #: The process group the task data is split over (:mod:`manifolds.data_parallel`),
        #: or ``None``: set by :meth:`from_module` with a ``process_group``.
        self.data_parallel: DataParallel | None = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        inputs: torch.Tensor | Iterable,
        *,
        params: Iterable[torch.Tensor] | None = None,
        output_metric: str | OutputMetric = "euclidean",
        damping: float = 0.0,
        check_inputs: bool = True,
        process_group=None,
        precision: MixedPrecision | None = None,
        **options,
    ) -> PullbackMetric:
        r"""The pullback metric of a network's outputs on ``inputs``.

        Parameters
        ----------
        module : torch.nn.Module
            The network.
        inputs : tensor or iterable of batches
            Task data (see :func:`as_batches`); with several batches :math:`g` is the
            average over all their samples. The batches are kept (as references).
        params : iterable of parameters, optional
            The weights the metric lives on, in flat order (a parameter group; the
            module's other parameters are held at their values at call time). Default:
            all, ordered as ``torch.nn.utils.parameters_to_vector(module.parameters())``.
        output_metric, damping, **options
            As for :class:`PullbackMetric`.
        check_inputs : bool
            Feed the first batch to the network now, so that inputs it cannot take fail
            here (:func:`~manifolds.task_data.check_module_takes`); ``False`` for callers
            that have checked them already (one forward pass saved).
        process_group : torch.distributed.ProcessGroup, optional
            Data parallelism (:mod:`manifolds.data_parallel`): ``inputs`` are this rank's
            shard of the task data, every rank of the group holds the same network and
            weights, and :math:`g` is the average over the samples of all ranks,
            :math:`g = N^{-1}\sum_r \sum_{b \in S_r} J_b^\top G J_b + \lambda I` with
            :math:`N = \sum_r N_r`. Every rank must build the metric and then make the
            same calls with the same ``w`` (each product, solve, spectrum, acceleration and
            :meth:`inner` runs collectives), and every rank gets the same answer. Solves
            and accelerations run CG on the all-reduced :meth:`matvec` (``solver="auto"``
            picks it; ``"dense"`` and ``"output"`` raise ``ValueError``, since they need the
            Jacobian rows of all ranks in one place), and :meth:`spectrum` runs Lanczos on it.
        precision : MixedPrecision, optional
            Mixed precision (:mod:`manifolds.precision`): the network passes under
            :func:`torch.autocast` in ``precision.products`` (e.g. bfloat16), the
            output-space Gram matrices factored and solved in ``precision.solves`` (e.g.
            float64), every returned vector in the weights' dtype (float32 or float64). The
            solve tolerance then defaults to ``precision.tolerance``, the residual such
            products can show. Default: everything in the weights' dtype.

        Notes
        -----
        The network is evaluated with :func:`torch.func.functional_call` in **eval
        mode** (flags restored after each call): BatchNorm uses the module's
        running-statistics buffers as they are at call time, and Dropout is off,
        so :math:`g` is a deterministic function of :math:`w`. The module's own
        parameters are never read or written by the metric.
        """
        flat = module if isinstance(module, FlatModule) else FlatModule(module, params)
        batches = as_batches(inputs)
        if precision is not None:
            if not isinstance(precision, MixedPrecision):
                raise TypeError(
                    f"precision must be a MixedPrecision, got {type(precision).__name__}"
                )
            precision.check_weights(flat.flatten().dtype)
            if options.get("tol") is None:
                options["tol"] = precision.tolerance
        # the collective check first: a shard that fails it fails on every rank at once
        data_parallel = (
            None if process_group is None else DataParallel.over(process_group, batches, flat.dim)
        )
        if check_inputs:
            check_module_takes(flat, batches)
        metric = cls(
            ModuleOutputs(flat, batches, precision),
            output_metric=output_metric,
            damping=damping,
            dim=flat.dim,
            **options,
        )
        metric.module = flat
        metric.inputs = batches
        metric.data_parallel = data_parallel
        return metric

    @property
    def precision(self) -> MixedPrecision | None:
        """The :class:`~manifolds.precision.MixedPrecision` of the network passes and the
        output-space solves (:meth:`from_module`'s ``precision``), or ``None``: everything in
        the weights' dtype."""
        return getattr(self.fn, "precision", None)

    def __repr__(self) -> str:
        src = type(self.module.module).__name__ if self.module is not None else "fn"
        return (
            f"PullbackMetric({src}, output_metric={self.output_metric.name!r}, "
            f"damping={self.damping}, dim={self.dim}, solver={self.solver!r})"
        )

    # ------------------------------------------------------------------ checks
    def check_point(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` checked as a point (flat, floating, finite, of length :attr:`dim`, on the task
        inputs' device and dtype), detached. Raises ``TypeError``/``ValueError`` naming the problem."""
        check_vector("w", w, dim=self.dim)
        if self.inputs is not None:
            x = self.inputs[0]
            if w.device != x.device:
                raise ValueError(f"weights are on {w.device} but the task inputs are on {x.device}")
            if x.is_floating_point() and x.dtype != w.dtype:
                raise TypeError(
                    f"weights have dtype {w.dtype} but the task inputs have dtype {x.dtype}; "
                    "convert one of them"
                )
        return w.detach()

    def check_tangent(self, name: str, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``v`` checked as a tangent vector at the checked point ``w`` (same length, dtype and
        device, finite), detached; ``name`` is used in the error message."""
        return check_vector(name, v, dim=w.numel(), like=w).detach()

    # ------------------------------------------------------------ the map F
    def embed(self, w: torch.Tensor) -> torch.Tensor:
        r"""Embedded outputs :math:`F(w) = N^{-1/2}(\phi(f_b(w)))_b`, flat, length :math:`m`.

        :math:`g(w) = J_F^\top J_F + \lambda I`, so :math:`\|F(w') - F(w)\|` is the
        first-order functional distance between two nearby weight vectors.

        With a process group, this rank's part :math:`F_r` of :math:`F`: its own samples,
        scaled by the global :math:`N^{-1/2}` (:mod:`manifolds.data_parallel`).
        """
        y = self.fn(w)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"fn must return a tensor, got {type(y).__name__}")
        dp = self.data_parallel
        e = self.output_metric.embed_samples(y, None if dp is None else dp.samples)
        self._output_dim = e.numel()
        return e

    def output_dim(self, w: torch.Tensor) -> int:
        """:math:`m`, the number of embedded outputs (one forward pass the first time); with a
        process group, this rank's."""
        if self._output_dim is None:
            with torch.no_grad():
                self.embed(self.check_point(w))
        return self._output_dim

    def _jvp(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(self.embed, (w,), (v,))[1]

    def _second_derivative(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:math:`D^2F[v, v]` by forward-over-forward differentiation."""
        return jvp(lambda x: self._jvp(x, v), (w,), (v,))[1]

    # ------------------------------------------------------------ the Jacobian at a point
    def jacobian_operator(self, w: torch.Tensor) -> JacobianOperator:
        r""":math:`J` at a checked point ``w`` as an operator (:mod:`manifolds.jacobian`): held
        exactly in factored form when every moved weight belongs to a supported layer,
        else through :mod:`torch.func`. Not with a process group (``ValueError``)."""
        self._single_process("the Jacobian operator (output-space routes)")
        return jacobian_at(self.embed, w, self._factored_jacobian, dual=self._dual_products)

    def autograd_jacobian(self, w: torch.Tensor) -> AutogradJacobian:
        r""":math:`J` at ``w`` through :mod:`torch.func` (:class:`~manifolds.AutogradJacobian`),
        never factored: the route for a few products, e.g. one :math:`J^\top r` and one
        :math:`Jp` (one forward pass here, one backward or dual-number pass per product)."""
        return AutogradJacobian(self.embed, w, dual=self._dual_products)

    @property
    def _dual_products(self) -> bool:
        """Whether dual-number passes may run this metric's products (not under autocast)."""
        return self.precision is None or self.precision.products is None

    def _single_process(self, what: str) -> None:
        """Raise ``ValueError`` for ``what`` on a data-parallel metric: routes that need the
        whole output Jacobian :math:`J` (the rows of every rank) in one process."""
        if self.data_parallel is not None:
            raise ValueError(
                f"{what} needs the whole output Jacobian, whose rows are split over the "
                f"{self.data_parallel.world_size} ranks of the process group; with a "
                "process_group use the CG routes: solver/method 'cg' or 'auto' (and "
                "jacobian='krylov' for manifolds.geodesic.shoot; collocation needs one process)"
            )

    def _factored_jacobian(self, w: torch.Tensor) -> JacobianOperator | None:
        """:math:`J` held exactly as layer inputs and output gradients
        (:mod:`manifolds.layer_jacobian`), or ``None`` where the network's layers do not allow
        it (or the metric was not built from a module)."""
        if self.module is None:
            return None
        return module_jacobian(self.module, self.inputs, w, self.output_metric, self.precision)

    def output_gram(self, w: torch.Tensor) -> OutputGram:
        r""":math:`K = JJ^\top` at ``w`` with this metric's :math:`\lambda`, factored on first use
        (:class:`~manifolds.gram.OutputGram`): output-space solves, Gauss–Newton steps, spectra."""
        return self.gram_of(self.jacobian_operator(self.check_point(w)))

    def gram_of(self, jacobian: JacobianOperator) -> OutputGram:
        r"""The output-space Gram of a Jacobian of this metric, with its :math:`\lambda`, factored
        in the solve dtype of its :attr:`precision`."""
        solves = None if self.precision is None else self.precision.solves
        return OutputGram(jacobian, self.damping, solves)

    # ------------------------------------------------------------ products
    def _matvec(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`J^\top J v + \lambda v` for a checked point and tangent
        (:func:`~manifolds.forward_ad.gram_vector_product`: one dual forward pass, one
        backward pass)."""
        if self.precision is not None and self.precision.products is not None:
            # torch.autograd.forward_ad does not apply autocast's casts to both operands of
            # a product; torch.func does, at one more forward pass
            gv = vjp(self.embed, w)[1](self._jvp(w, v))[0]
        else:
            gv = gram_vector_product(self.embed, w, v)
        if self.data_parallel is not None:  # sum_r J_r^T J_r v
            gv = self.data_parallel.all_reduce_sum(gv)
        if not self.damping:
            return gv
        # gv was made from a fresh cotangent; unless autograd handed back a broadcast
        # view (e.g. the gradient of a sum), it can take +lambda v in place.
        return gv.add_(v, alpha=self.damping) if gv.is_contiguous() else gv + self.damping * v

    def matvec(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`g(w)\,v = J^\top J v + \lambda v`: one dual forward pass and one backward pass."""
        w = self.check_point(w)
        return self._matvec(w, self.check_tangent("v", v, w))

    def inner(
        self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        r""":math:`\langle u, v\rangle_{g(w)} = (Ju)^\top (Jv) + \lambda\, u^\top v` (0-D tensor)."""
        w = self.check_point(w)
        u = self.check_tangent("u", u, w)
        v = u if v is None else self.check_tangent("v", v, w)
        with torch.no_grad():
            ju = self._jvp(w, u)
            jv = ju if v is u else self._jvp(w, v)
            out = torch.dot(ju, jv)
            if self.data_parallel is not None:  # sum_r (J_r u)^T (J_r v)
                out = self.data_parallel.all_reduce_sum(out.reshape(1)).reshape(())
            return out + self.damping * torch.dot(u, v) if self.damping else out

    def norm(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\|v\|_{g(w)}` (0-D tensor)."""
        return self.inner(w, v).clamp_min(0).sqrt()

    # ------------------------------------------------------------ dense references
    def jacobian(self, w: torch.Tensor) -> torch.Tensor:
        r"""Dense :math:`J_F(w)`, shape ``(m, n)``. For small problems and tests only; not with
        a process group."""
        self._single_process("the dense Jacobian")
        w = self.check_point(w)
        m, n = self.output_dim(w), w.numel()
        with torch.no_grad():
            return (jacfwd if n <= m else jacrev)(self.embed)(w).reshape(m, n)

    def dense(self, w: torch.Tensor) -> torch.Tensor:
        r"""Dense :math:`g(w) = J^\top J + \lambda I`, shape ``(n, n)``. Small problems only."""
        jac = self.jacobian(w)
        g = jac.T @ jac
        if self.damping:
            g.diagonal().add_(self.damping)
        return g

    # ------------------------------------------------------------ spectrum
    def spectrum(self, w: torch.Tensor, k: int, *, tol: float = 0.0) -> Spectrum:
        r"""The top ``k`` eigenpairs of :math:`g(w)` (:class:`~manifolds.spectrum.Spectrum`:
        ``eigenvalues`` descending, ``eigenvectors`` of shape ``(n, k)``, and
        :meth:`~manifolds.spectrum.Spectrum.fraction` of a direction in their span).

        From the output-space Gram when :math:`m` is at most ``output_max`` (exact; at most
        :math:`\operatorname{rank} J` pairs, the rest of the spectrum being :math:`\lambda`),
        else by Lanczos on :meth:`matvec` (:func:`~manifolds.spectrum.lanczos`, ``tol`` its
        eigenvalue accuracy). With a process group always by Lanczos on the all-reduced
        :meth:`matvec`, from the same fixed start vector on every rank (so that every
        rank's iterations, and answer, are the same).
        """
        w = self.check_point(w)
        if self.data_parallel is not None:
            start = torch.randn(
                w.numel(),
                generator=torch.Generator().manual_seed(0),
                dtype=torch.float64,
                device="cpu",
            )
            return lanczos(
                lambda v: self._matvec(w, v), w, k, tol=tol, damping=self.damping, v0=start
            )
        if self.output_dim(w) <= self.output_max:
            with torch.no_grad():
                return self.output_gram(w).spectrum(k)
        return lanczos(lambda v: self._matvec(w, v), w, k, tol=tol, damping=self.damping)

    # ------------------------------------------------------------ solves
    def _method(self, w: torch.Tensor, method: str | None) -> str:
        """The solve route at ``w`` (:func:`~manifolds.pullback_solves.choose_method`)."""
        return solves.choose_method(self, w, method)

    def solve(
        self,
        w: torch.Tensor,
        b: torch.Tensor,
        *,
        method: str | None = None,
        tol: float | None = None,
        maxiter: int | None = None,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`g(w)^{-1} b`; :meth:`solve_result` for the residual and status.

        Parameters
        ----------
        w, b : torch.Tensor
            Point and right-hand side (a cotangent, e.g. a Euclidean gradient).
        method : {"auto", "dense", "output", "cg"}, optional
            Overrides the metric's ``solver``.
        tol, maxiter, x0 : optional
            Relative tolerance (the rule of :mod:`manifolds.conjugate_gradient`), CG
            iteration cap and warm start.

        Notes
        -----
        The output route uses Woodbury (:meth:`~manifolds.gram.OutputGram.weight_solve`),
        :math:`(J^\top J + \lambda I)^{-1} = \lambda^{-1}(I - J^\top (JJ^\top + \lambda I)^{-1} J)`;
        undamped, it returns :math:`(J^\top J)^+ b`. A solve that misses its tolerance warns
        or raises (``on_failure``) with its residual.
        """
        return self.solve_result(w, b, method=method, tol=tol, maxiter=maxiter, x0=x0).x

    def solve_result(
        self,
        w: torch.Tensor,
        b: torch.Tensor,
        *,
        method: str | None = None,
        tol: float | None = None,
        maxiter: int | None = None,
        x0: torch.Tensor | None = None,
    ) -> SolveResult:
        """:meth:`solve` with its :class:`~manifolds.conjugate_gradient.SolveResult`
        (solution, residual, iterations, status, method)."""
        return solves.solve(self, *self._checked(w, "b", b, x0), method, tol, maxiter)

    def acceleration(
        self,
        w: torch.Tensor,
        v: torch.Tensor,
        *,
        method: str | None = None,
        tol: float | None = None,
        maxiter: int | None = None,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Geodesic acceleration :math:`\ddot w = -\Gamma_w(v, v) = -g^{-1} J^\top D^2F[v, v]`.

        :math:`D^2F[v, v]` comes from a forward-over-forward JVP; the solve is
        dense (:meth:`dense_acceleration`), in output space
        (:math:`-J^\top (JJ^\top + \lambda I)^{-1} h`,
        :meth:`~manifolds.gram.OutputGram.least_squares_step`) or by CG (warm-started from
        ``x0``, e.g. the previous step's acceleration). Arguments as for :meth:`solve`;
        :meth:`acceleration_result` for the residual and status.
        """
        return self.acceleration_result(w, v, method=method, tol=tol, maxiter=maxiter, x0=x0).x

    def acceleration_result(
        self,
        w: torch.Tensor,
        v: torch.Tensor,
        *,
        method: str | None = None,
        tol: float | None = None,
        maxiter: int | None = None,
        x0: torch.Tensor | None = None,
    ) -> SolveResult:
        """:meth:`acceleration` with its :class:`~manifolds.conjugate_gradient.SolveResult`."""
        w, v, x0 = self._checked(w, "v", v, x0)
        return solves.acceleration(self, w, v, method, tol, maxiter, x0)

    def _checked(self, w, name, b, x0):
        """The point, a tangent called ``name`` and an optional warm start, checked."""
        w = self.check_point(w)
        b = self.check_tangent(name, b, w)
        return w, b, None if x0 is None else self.check_tangent("x0", x0, w)

    def dense_acceleration(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`-g^{-1}J^\top D^2F[v, v]` by dense algebra, as a pure tensor function
        (:func:`~manifolds.dense_acceleration.dense_acceleration`): differentiable and
        batchable by :mod:`torch.func`, for small :math:`n` only; no checks. Not with a
        process group."""
        self._single_process("the dense acceleration")
        return dense_acceleration(self.embed, self.damping, w, v)
