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
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from .conjugate_gradient import (
    SolveResult,
    conjugate_gradient,
    default_tolerance,
    report_failure,
    status_of,
)
from .flat import FlatModule
from .layer_jacobian import module_jacobian
from .output_metrics import OutputMetric, get_output_metric
from .validation import check_finite, check_vector

__all__ = ["PullbackMetric", "as_batches"]

_METHODS = ("auto", "dense", "output", "cg")


def as_batches(data: torch.Tensor | Iterable) -> list[torch.Tensor]:
    """Materialise input data as a list of input tensors.

    ``data`` is a tensor (one batch) or an iterable of batches, each a tensor or
    an ``(inputs, targets, ...)`` tuple/list whose first item is taken (a
    :class:`torch.utils.data.DataLoader` works).

    Raises
    ------
    TypeError, ValueError
        Nothing iterable, non-tensor batches, no batches, NaN/Inf, or batches on
        different devices.
    """
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(
                f"inputs must be a tensor or an iterable of batches, got {type(data).__name__}"
            ) from None
        batches = []
        for i, item in enumerate(items):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batch {i} is a {type(x).__name__}, expected a tensor")
            batches.append(x)
    if not batches:
        raise ValueError("inputs hold no batches")
    for i, x in enumerate(batches):
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"batch {i} has shape {tuple(x.shape)}: expected (batch, ...)")
        check_finite(f"inputs (batch {i})", x)
        if x.device != batches[0].device:
            raise ValueError(f"batch {i} is on {x.device}, batch 0 on {batches[0].device}")
    return batches


class _ModuleOutputs:
    """``w -> module(x)`` over all batches, concatenated along the sample axis, in eval mode.

    A class rather than a closure so that a metric built from a module pickles
    (for multi-process use) whenever the module does.
    """

    def __init__(self, flat: FlatModule, batches: list[torch.Tensor]):
        self.flat = flat
        self.batches = batches

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        outs = [self.flat(w, x, train=False) for x in self.batches]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


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
    that keeps the primal's autograd graph, plus one backward pass of the tangent.
    Measured on 2 CPU cores (``benchmarks/matvec.py``, 1 thread, CPU time): the product
    costs 1.7–1.9× a loss forward+backward for an MLP 784-300-100-10 at batch 256 and
    about 2.1× for VGG11 at 32×32, batch 32; the floor by counting matrix products is
    about 1.5 and 1.7.

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
        if solver not in _METHODS:
            raise ValueError(f"solver must be one of {_METHODS}, got {solver!r}")
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

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        inputs: torch.Tensor | Iterable,
        *,
        output_metric: str | OutputMetric = "euclidean",
        damping: float = 0.0,
        **options,
    ) -> PullbackMetric:
        r"""The pullback metric of a network's outputs on ``inputs``.

        Parameters
        ----------
        module : torch.nn.Module
            The network. Flat weights are ordered as
            ``torch.nn.utils.parameters_to_vector(module.parameters())``.
        inputs : tensor or iterable of batches
            Task data (see :func:`as_batches`); with several batches :math:`g` is the
            average over all their samples. The batches are kept (as references).
        output_metric, damping, **options
            As for :class:`PullbackMetric`.

        Notes
        -----
        The network is evaluated with :func:`torch.func.functional_call` in **eval
        mode** (flags restored after each call): BatchNorm uses the module's
        running-statistics buffers as they are at call time, and Dropout is off,
        so :math:`g` is a deterministic function of :math:`w`. The module's own
        parameters are never read or written by the metric.
        """
        flat = FlatModule(module)
        batches = as_batches(inputs)
        metric = cls(
            _ModuleOutputs(flat, batches),
            output_metric=output_metric,
            damping=damping,
            dim=flat.dim,
            **options,
        )
        metric.module = flat
        metric.inputs = batches
        return metric

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
        """
        y = self.fn(w)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"fn must return a tensor, got {type(y).__name__}")
        if y.ndim <= 1:
            y = y.reshape(1, -1)
        n_samples = y.shape[0]
        e = self.output_metric.embed(y).reshape(-1) * (1.0 / math.sqrt(n_samples))
        self._output_dim = e.numel()
        return e

    def output_dim(self, w: torch.Tensor) -> int:
        """:math:`m`, the number of embedded outputs (one forward pass the first time)."""
        if self._output_dim is None:
            with torch.no_grad():
                self.embed(self.check_point(w))
        return self._output_dim

    def _jvp(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(self.embed, (w,), (v,))[1]

    def _vjp(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return vjp(self.embed, w)[1](u)[0]

    def _jvp2(self, w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`(Jv, D^2F[v, v])` by forward-over-forward differentiation."""
        return jvp(lambda x: self._jvp(x, v), (w,), (v,))

    # ------------------------------------------------------------ products
    def _matvec(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`J^\top J v + \lambda v` for a checked point and tangent.

        One dual-number forward pass (:mod:`torch.autograd.forward_ad`) at
        :math:`w + \varepsilon v` gives :math:`F(w)` with its reverse-mode graph and
        the tangent :math:`Jv`; one backward pass of the primal outputs with
        cotangent :math:`Jv` gives :math:`J^\top (Jv)`. Products in which one
        operand does not depend on :math:`w` (the input batch of a first layer)
        get their tangent as one product, :math:`B(x, \dot W)`, instead of
        PyTorch's :math:`B(\dot x, W) + B(x, \dot W)` with a materialised zero
        :math:`\dot x`, and elementwise ``*``, ``/`` by constants skip PyTorch's slow
        zero-tangent path (see :class:`_ConstantOperands`). Works under
        :func:`torch.no_grad` and for weights that require grad (both are
        detached here); the result is a fresh tensor.
        """
        with torch.enable_grad():
            wp = w.detach().requires_grad_(True)
            with fwAD.dual_level(), _ConstantOperands():
                out = self.embed(fwAD.make_dual(wp, v))
                primal, tangent = fwAD.unpack_dual(out)
            if tangent is None or not primal.requires_grad:
                gv = torch.zeros_like(v)  # outputs do not depend on w
            else:
                (gv,) = torch.autograd.grad(primal, wp, tangent.detach(), allow_unused=True)
                gv = torch.zeros_like(v) if gv is None else gv
        if not self.damping:
            return gv
        # gv was made here from a fresh cotangent; unless autograd handed back a
        # broadcast view (e.g. the gradient of a sum), it can take +lambda v in place.
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
            return out + self.damping * torch.dot(u, v) if self.damping else out

    def norm(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\|v\|_{g(w)}` (0-D tensor)."""
        return self.inner(w, v).clamp_min(0).sqrt()

    # ------------------------------------------------------------ dense references
    def jacobian(self, w: torch.Tensor) -> torch.Tensor:
        r"""Dense :math:`J_F(w)`, shape ``(m, n)``. For small problems and tests only."""
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

    # ------------------------------------------------------------ solves
    def _method(self, w: torch.Tensor, method: str | None) -> str:
        method = self.solver if method is None else method
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if method != "auto":
            return method
        if w.numel() <= self.dense_max:
            return "dense"
        if self.output_dim(w) <= self.output_max:
            return "output"
        return "cg"

    def _output_gram(self, w: torch.Tensor, chunk: int = 64):
        r"""Eigendecomposition of :math:`K = JJ^\top` (``m x m``); returns
        ``(eigenvalues, eigenvectors, vjp_fn)``.

        For a metric :meth:`from_module` whose weights all belong to layers with a factored
        Jacobian (``nn.Linear``, ``nn.Conv2d``, normalisation layers in eval mode),
        :math:`K` is built exactly from the layers' inputs and output gradients
        (:mod:`manifolds.layer_jacobian`: one forward pass and one batched backward pass
        per output unit); otherwise column block by column block as :math:`J(J^\top E)`
        without forming :math:`J` (:math:`m` reverse- and :math:`m` forward-mode products).
        """
        if self.module is not None:
            jac = module_jacobian(self.module, self.inputs, w, self.output_metric)
            if jac is not None:
                evals, evecs = torch.linalg.eigh(jac.gram())
                return evals, evecs, lambda u: (jac.vjp(u.reshape(1, -1))[0],)
        e, vjp_fn = vjp(self.embed, w)
        m = e.numel()
        eye = torch.eye(m, dtype=e.dtype, device=e.device)
        cols = []
        for start in range(0, m, chunk):
            rows = vmap(lambda u: vjp_fn(u)[0])(eye[start : start + chunk])
            cols.append(vmap(lambda r: self._jvp(w, r))(rows))
        gram = torch.cat(cols, dim=0)
        gram = 0.5 * (gram + gram.T)
        evals, evecs = torch.linalg.eigh(gram)
        return evals, evecs, vjp_fn

    def _inverse_spectrum(self, evals: torch.Tensor, power: int) -> torch.Tensor:
        """``1/(evals + damping)**power`` with a pseudo-inverse cut-off when undamped."""
        shifted = evals.clamp_min(0) + self.damping
        cut = shifted.max().clamp_min(torch.finfo(evals.dtype).tiny) * (
            evals.numel() * torch.finfo(evals.dtype).eps
        )
        inv = torch.where(shifted > cut, shifted.reciprocal(), torch.zeros_like(shifted))
        return inv**power

    def _dense_solve(self, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
        return torch.linalg.pinv(g, hermitian=True) @ b

    def _residual(self, w, x, b, gx=None) -> float:
        gx = self._matvec(w, x) if gx is None else gx
        bnorm = float(torch.linalg.vector_norm(b))
        return 0.0 if bnorm == 0 else float(torch.linalg.vector_norm(b - gx)) / bnorm

    def _tolerance(self, dtype: torch.dtype, tol: float | None) -> float:
        if tol is not None:
            return float(tol)
        return self.tol if self.tol is not None else default_tolerance(dtype)

    def _solve(self, w, b, method, tol, maxiter, x0) -> SolveResult:
        tol = self._tolerance(b.dtype, tol)
        method = self._method(w, method)
        with torch.no_grad():
            if method == "cg":
                res = conjugate_gradient(
                    lambda v: self._matvec(w, v),
                    b,
                    x0=x0,
                    tol=tol,
                    maxiter=self.maxiter if maxiter is None else maxiter,
                )
            elif method == "dense":
                g = self.dense(w)
                x = self._dense_solve(g, b)
                r = self._residual(w, x, b, g @ x)
                res = SolveResult(
                    x,
                    r,
                    0,
                    status_of(r, _direct_tol(tol, b.dtype)),
                    "dense",
                    _direct_tol(tol, b.dtype),
                )
            else:
                evals, evecs, vjp_fn = self._output_gram(w)
                jb = evecs.T @ self._jvp(w, b)
                if self.damping:
                    # Woodbury: (J^T J + l I)^{-1} b = (b - J^T (K + l I)^{-1} J b) / l
                    x = (
                        b - vjp_fn(evecs @ (self._inverse_spectrum(evals, 1) * jb))[0]
                    ) / self.damping
                else:
                    # pseudo-inverse: (J^T J)^+ b = J^T K^{-2} J b
                    x = vjp_fn(evecs @ (self._inverse_spectrum(evals, 2) * jb))[0]
                r = self._residual(w, x, b)
                res = SolveResult(
                    x,
                    r,
                    0,
                    status_of(r, _direct_tol(tol, b.dtype)),
                    "output",
                    _direct_tol(tol, b.dtype),
                )
        report_failure(res, self.on_failure)
        return res

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
        The output route uses Woodbury,
        :math:`(J^\top J + \lambda I)^{-1} = \lambda^{-1}(I - J^\top (JJ^\top + \lambda I)^{-1} J)`,
        with :math:`JJ^\top` built from :math:`m` products; undamped, it returns
        :math:`(J^\top J)^+ b`. A solve that misses its tolerance warns or raises
        (``on_failure``) with its residual.
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
        w = self.check_point(w)
        b = self.check_tangent("b", b, w)
        if x0 is not None:
            x0 = self.check_tangent("x0", x0, w)
        return self._solve(w, b, method, tol, maxiter, x0)

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
        (:math:`-J^\top (JJ^\top + \lambda I)^{-1} h`) or by CG (warm-started from
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
        w = self.check_point(w)
        v = self.check_tangent("v", v, w)
        if x0 is not None:
            x0 = self.check_tangent("x0", x0, w)
        return self._acceleration(w, v, method, tol, maxiter, x0)

    def _acceleration(self, w, v, method=None, tol=None, maxiter=None, x0=None) -> SolveResult:
        method = self._method(w, method)
        with torch.no_grad():
            if method == "dense":
                a = self.dense_acceleration(w, v)
                _, h = self._jvp2(w, v)
                r = self._residual(w, a, -self._vjp(w, h))
            elif method == "cg":
                _, h = self._jvp2(w, v)
                return self._solve(w, -self._vjp(w, h), method, tol, maxiter, x0)
            else:
                # -J^T (K + l I)^{-1} h: no weight-space solve at all.
                _, h = self._jvp2(w, v)
                evals, evecs, vjp_fn = self._output_gram(w)
                a = -vjp_fn(evecs @ (self._inverse_spectrum(evals, 1) * (evecs.T @ h)))[0]
                r = self._residual(w, a, -vjp_fn(h)[0])
        tol = _direct_tol(self._tolerance(v.dtype, tol), v.dtype)
        res = SolveResult(a, r, 0, status_of(r, tol), method, tol)
        report_failure(res, self.on_failure)
        return res

    def dense_acceleration(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r""":math:`-g^{-1}J^\top D^2F[v, v]` by dense algebra, as a pure tensor function.

        No checks and no Python-side branching on values, so it can be differentiated
        and batched by :mod:`torch.func` (``vmap`` of a whole batch of flows, ``jacfwd``
        for collocation). For small :math:`n` only. :math:`J` and :math:`D^2F[v, v]` come
        from one batched forward-over-forward JVP in the :math:`n + 1` directions
        :math:`(e_1, \dots, e_n, v)`. The solve is in weight space (:math:`n \times n`)
        when :math:`n \le m` or :math:`\lambda = 0` (least squares, so a singular
        :math:`g` gives the minimum-norm answer), else in output space,
        :math:`-J^\top (JJ^\top + \lambda I)^{-1} h`.
        """
        n = w.numel()

        def inner(x):
            return jvp(self.embed, (x,), (v,))

        def outer(u):
            return jvp(inner, (w,), (u,))[1]

        dirs = torch.cat([torch.eye(n, dtype=w.dtype, device=w.device), v.unsqueeze(0)])
        ju, huv = vmap(outer)(dirs)
        jac, h = ju[:n].T, huv[n]
        m = jac.shape[0]
        lam = self.damping
        # LAPACK must not see NaN/Inf (lstsq aborts with an internal error on them, which
        # would end a shooting solve whose trial flow blew up). Solve with finite stand-ins
        # and let the non-finite values through to the answer instead, where the flow's
        # own check reports them; no data-dependent branch, so this stays vmap-able.
        poison = 0.0 * (jac.sum() + h.sum())
        jac, h = torch.nan_to_num(jac, 0.0, 0.0, 0.0), torch.nan_to_num(h, 0.0, 0.0, 0.0)
        if n <= m or lam == 0.0:
            g = jac.T @ jac
            if lam:
                g = g + lam * torch.eye(n, dtype=w.dtype, device=w.device)
            return poison - torch.linalg.lstsq(g, (jac.T @ h).unsqueeze(-1)).solution.squeeze(-1)
        k = jac @ jac.T + lam * torch.eye(m, dtype=w.dtype, device=w.device)
        return poison - jac.T @ torch.linalg.solve(k, h)


#: Operations :math:`B(a, b)` linear in each of their first two arguments.
_PRODUCTS = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.mul,
        torch.Tensor.mul,
        torch.Tensor.__mul__,
        torch.Tensor.__rmul__,
    }
)
#: Those that also add a bias :math:`c` (third argument): :math:`B(a, b) + c`.
_WITH_BIAS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})
#: :math:`a / b`, linear in :math:`a` (true division only).
_DIVISIONS = frozenset(
    {
        torch.div,
        torch.Tensor.div,
        torch.Tensor.__truediv__,
        torch.true_divide,
        torch.Tensor.true_divide,
    }
)
#: Those of the above that accept a Python number as either operand.
_NUMBER_OPERANDS = frozenset(
    {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__} | _DIVISIONS
)


class _ConstantOperands(TorchFunctionMode):
    r"""Dual-number products and quotients with a constant operand, at the cost of one op.

    PyTorch's forward-mode rule for a product :math:`B(a, b)` (linear,
    convolution, matmul, elementwise ``*``) is
    :math:`\dot y = B(\dot a, b) + B(a, \dot b)`. When :math:`a` carries no
    tangent, :math:`\dot a` is an "efficient zero tensor", and torch (2.x, CPU)
    pays for it in full: a product by zero is materialised (the data entering a
    first layer: two full products instead of one), and an elementwise
    ``*`` or ``/`` by a constant goes through a meta-tensor shape computation in
    Python (about 0.2 ms a call, whatever the tensor's size). Inside this mode
    such calls compute

    .. math::

        y = B(a, b_p) + c_p \ \text{(recorded for reverse mode)}, \qquad
        \dot y = B(a, \dot b) + \dot c \ \text{(not recorded)},

    likewise :math:`\dot y = \dot a / b` for :math:`y = a / b` with constant
    :math:`b`, and return the dual number :math:`(y, \dot y)`. Every other call,
    and every call whose operands all carry tangents, goes to PyTorch unchanged.
    Exact: the tangent is the same operation applied to the same numbers, minus
    the terms that are zero. The tangent is not recorded in the reverse-mode
    graph, which :meth:`PullbackMetric._matvec` never differentiates.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        if func in _PRODUCTS or func in _DIVISIONS:
            split = _split_constant_operand(func, args, kwargs)
            if split is not None:
                primal_args, tangent_args, options = split
                primal = func(*primal_args, **options)
                with torch.no_grad():
                    tangent = func(*tangent_args, **options)
                return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


def _unpack(x):
    """``(primal, tangent)`` at the current dual level; a Python number is a constant."""
    return fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else (x, None)


def _split_constant_operand(func, args, kwargs):
    """Arguments for :math:`y` and :math:`\\dot y` of a call whose first two
    operands are one carrying a tangent and one constant: ``(primal_args,
    tangent_args, options)``, ``options`` being the keyword arguments less
    ``bias``; ``None`` for any other call."""
    if len(args) < 2 or "out" in kwargs or kwargs.get("rounding_mode") is not None:
        return None
    a, b = args[0], args[1]
    numbers = func in _NUMBER_OPERANDS
    for x in (a, b):
        if not (isinstance(x, torch.Tensor) or (numbers and type(x) in (int, float))):
            return None
    a_p, a_t = _unpack(a)
    b_p, b_t = _unpack(b)
    if (a_t is None) == (b_t is None) or (func in _DIVISIONS and a_t is None):
        return None
    primal, tangent = ((a, b_p), (a, b_t)) if a_t is None else ((a_p, b), (a_t, b))
    rest, options = args[2:], dict(kwargs)
    if func not in _WITH_BIAS:
        return (*primal, *rest), (*tangent, *rest), options
    bias = rest[0] if rest else options.pop("bias", None)
    rest = rest[1:]
    if bias is None:
        return (*primal, None, *rest), (*tangent, None, *rest), options
    if not isinstance(bias, torch.Tensor):
        return None
    c_p, c_t = fwAD.unpack_dual(bias)
    return (*primal, c_p, *rest), (*tangent, c_t, *rest), options


def _direct_tol(tol: float, dtype: torch.dtype) -> float:
    return max(tol, 1e3 * torch.finfo(dtype).eps)
