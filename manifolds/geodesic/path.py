r"""A discretised geodesic with its diagnostics: the one result type of every geodesic solver.

A :class:`GeodesicPath` is to the geodesic solvers what :class:`scipy.optimize.OptimizeResult`
is to :func:`scipy.optimize.minimize`: the answer (points, velocities, the initial
velocity :math:`v_0`) together with how trustworthy it is (``status``, ``residual``,
``tol``, ``message``, ``iterations``). It comes from the initial-value problem
(:func:`~manifolds.geodesic.integrate_geodesic`, ``method="flow"``) and from the
boundary-value solvers (``"shoot"``, ``"relax"``, ``"collocation"``). A solver never returns
a wrong path silently: ``status`` is not :attr:`~manifolds.status.Status.CONVERGED`, the
message says what failed and what to try, and :meth:`GeodesicPath.raise_if_failed` (or
``strict=True``) raises. ``converged`` is ``status == Status.CONVERGED``, decided by the
solver, never read from the message.

The path is parametrised on :math:`t \in [t_0, t_{K-1}]` (:math:`[0, 1]` for the
boundary-value solvers); for an exact geodesic the speed :math:`\|\dot w\|_g` is
constant, so ``length`` :math:`= t_1\|v_0\|_{g(w_0)}` and ``energy``
:math:`= \tfrac12 \int_0^{t_1} \|\dot w\|_g^2\,dt`. Between the nodes the path is the cubic
Hermite interpolant of points and velocities (:meth:`GeodesicPath.at`,
:meth:`GeodesicPath.velocity_at`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from ..status import Status
from ..validation import NotConvergedError

__all__ = ["GeodesicPath", "NonFiniteError", "hermite"]

FORMAT = "riemfip.GeodesicPath/2"
_FORMAT_1 = "riemfip.GeodesicPath/1"
_TENSOR_FIELDS = ("t", "points", "velocities", "v0")
_SCALAR_FIELDS = (
    "length",
    "energy",
    "residual",
    "tol",
    "message",
    "iterations",
    "method",
    "solves",
    "max_solve_residual",
)


class NonFiniteError(NotConvergedError, FloatingPointError):
    """A geodesic computation produced NaN or Inf (a flow that blew up or left the chart).

    Both a :class:`~manifolds.validation.NotConvergedError` (the solve failed) and a
    :class:`FloatingPointError` (what a blown-up computation raises)."""


@dataclass
class GeodesicPath:
    r"""A discrete geodesic from ``points[0]`` to ``points[-1]``.

    Attributes
    ----------
    t : torch.Tensor
        Times, shape ``(K,)``, strictly increasing.
    points : torch.Tensor
        :math:`w(t_k)`, shape ``(K, n)``. A flow that failed ends in a row of NaN at the
        final time (never a finite point that is not the answer).
    velocities : torch.Tensor
        :math:`\dot w(t_k)`, shape ``(K, n)``.
    v0 : torch.Tensor, optional
        The initial velocity (:math:`\log_{w_0}(w_1)` for a converged boundary-value
        solve); default ``velocities[0]``.
    length : float
        :math:`\int \|\dot w\|_{g(w)}\,dt` (how each solver evaluates it is in
        ``metadata["length_rule"]``).
    energy : float
        :math:`\tfrac12 \int \|\dot w\|_{g(w)}^2\,dt`.
    residual : float
        What the solver's tolerance rule measures (see :mod:`manifolds.geodesic`): the
        endpoint mismatch :math:`\|\exp_{w_0}(v_0) - w_1\|` for ``shoot`` and
        ``collocation``, the energy-gradient norm for ``relax``, the largest local error
        estimate :math:`\|e\|/(1 + |y|)` of an accepted step for an adaptive ``flow``
        (NaN for fixed steps, which have no estimate).
    tol : float
        The tolerance ``residual`` was held to (NaN for a fixed-step flow).
    status : Status
        How the solver ended (:class:`~manifolds.status.Status`).
    message : str
        What happened, in words; on failure, what to try.
    iterations : int
        Outer iterations (Newton steps, L-BFGS iterations, collocation mesh nodes,
        accepted flow steps).
    method : str
        ``"flow"``, ``"shoot"``, ``"relax"`` or ``"collocation"``.
    speeds : torch.Tensor, optional
        :math:`\|\dot w(t_k)\|_g`, shape ``(K,)``, when asked for.
    solves : int
        Acceleration evaluations spent by the flow (4 per RK4 step, 6 per Dormand–Prince step).
    max_solve_residual : float
        Largest relative residual of the linear solves inside those accelerations.
    metadata : dict
        Solver-specific diagnostics (plain Python numbers, strings, lists).
    """

    t: torch.Tensor
    points: torch.Tensor
    velocities: torch.Tensor
    v0: torch.Tensor | None = None
    length: float = math.nan
    energy: float = math.nan
    residual: float = math.nan
    tol: float = math.nan
    status: Status = Status.CONVERGED
    message: str = "converged"
    iterations: int = 0
    method: str = ""
    speeds: torch.Tensor | None = None
    solves: int = 0
    max_solve_residual: float = 0.0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.points.ndim != 2 or self.velocities.shape != self.points.shape:
            raise ValueError(
                f"points and velocities must both have shape (K, n), got "
                f"{tuple(self.points.shape)} and {tuple(self.velocities.shape)}"
            )
        if self.t.ndim != 1 or self.t.numel() != self.points.shape[0]:
            raise ValueError(
                f"t must have shape ({self.points.shape[0]},), got {tuple(self.t.shape)}"
            )
        if self.t.numel() < 2 or bool((self.t[1:] <= self.t[:-1]).any()):
            raise ValueError("t must hold at least two strictly increasing times")
        self.status = Status(self.status)
        if self.v0 is None:
            self.v0 = self.velocities[0].clone()

    # ------------------------------------------------------------ views
    @property
    def converged(self) -> bool:
        """``status == Status.CONVERGED``."""
        return self.status == Status.CONVERGED

    @property
    def start(self) -> torch.Tensor:
        """:math:`w(t_0)`."""
        return self.points[0]

    @property
    def end(self) -> torch.Tensor:
        """:math:`w(t_{K-1})` (NaN for a flow that failed)."""
        return self.points[-1]

    @property
    def speed_drift(self) -> float:
        r""":math:`\max_k |s_k - s_0| / s_0`, the relative drift of the recorded speeds
        (0 if not recorded): exactly 0 for an exact geodesic."""
        if self.speeds is None or self.speeds.numel() == 0:
            return 0.0
        s0 = float(self.speeds[0])
        if s0 == 0.0:
            return float(self.speeds.abs().max())
        return float((self.speeds - s0).abs().max()) / s0

    def __repr__(self) -> str:
        return (
            f"GeodesicPath(method={self.method!r}, K={self.points.shape[0]}, "
            f"n={self.points.shape[1]}, length={self.length:.6g}, residual={self.residual:.3e}, "
            f"status={self.status.name}, iterations={self.iterations}, message={self.message!r})"
        )

    def raise_if_failed(self) -> GeodesicPath:
        """Return ``self`` if converged, else raise :class:`~manifolds.validation.NotConvergedError`
        (:class:`NonFiniteError`, also a :class:`FloatingPointError`, when the status is
        ``NON_FINITE``) carrying the message, residual and iterations."""
        if self.converged:
            return self
        error = NonFiniteError if self.status == Status.NON_FINITE else NotConvergedError
        raise error(
            f"{self.method} did not converge ({self.status.name}): {self.message} "
            f"(residual {self.residual:.3e}, tol {self.tol:.1e})",
            self.residual,
            self.iterations,
        )

    # ------------------------------------------------------------ interpolation
    def at(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""The path at time(s) ``t``: the cubic Hermite interpolant (see :func:`hermite`).

        Parameters
        ----------
        t : float or tensor
            A time or a 1-D tensor of times in :math:`[t_0, t_{K-1}]`.

        Returns
        -------
        torch.Tensor
            Shape ``(n,)`` for a scalar ``t``, else ``(len(t), n)``.
        """
        return hermite(self.t, self.points, self.velocities, t)

    def velocity_at(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""The derivative of :meth:`at`: :math:`\dot w(t)` of the Hermite interpolant
        (equal to ``velocities`` at the nodes)."""
        return hermite(self.t, self.points, self.velocities, t, derivative=True)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings only (no metric, no network, no data)."""
        state = {name: getattr(self, name).detach().cpu() for name in _TENSOR_FIELDS}
        state["speeds"] = None if self.speeds is None else self.speeds.detach().cpu()
        for name in _SCALAR_FIELDS:
            state[name] = getattr(self, name)
        state["status"] = int(self.status)
        state["metadata"] = dict(self.metadata)
        state["format"] = FORMAT
        return state

    def save(self, file: str | os.PathLike) -> None:
        """Write the path with :func:`torch.save` (plain tensors and numbers; reloadable with
        ``weights_only=True``)."""
        torch.save(self.state_dict(), file)

    @classmethod
    def load(cls, file: str | os.PathLike, *, map_location=None) -> GeodesicPath:
        """Read a path written by :meth:`save` (``torch.load(..., weights_only=True)``).

        Files of the first format (``riemfip.GeodesicPath/1``, before ``status``) load too:
        a converged path gets ``CONVERGED``; a failed one, which recorded only
        ``converged=False``, gets ``NON_FINITE`` when its residual is not finite and
        ``MAX_ITERATIONS`` otherwise, and ``metadata["loaded_from"]`` names the old format.
        """
        state = torch.load(file, map_location=map_location, weights_only=True)
        return cls.from_state_dict(state, source=str(file))

    @classmethod
    def from_state_dict(cls, state: dict, *, source: str = "the state") -> GeodesicPath:
        """The path :meth:`state_dict` describes (either format, as :meth:`load` reads);
        ``source`` names where the state came from in the error for one of another kind."""
        tag = state.get("format") if isinstance(state, dict) else None
        if tag == _FORMAT_1:
            state = _upgrade_format_1(state)
        elif tag != FORMAT:
            raise ValueError(
                f"{source} does not hold a GeodesicPath written by GeodesicPath.save (format "
                f"tag {tag!r}; this version reads {FORMAT!r} and {_FORMAT_1!r})"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def _upgrade_format_1(state: dict) -> dict:
    """A format-1 state (``converged`` flag, no ``status``) with the status that flag allows."""
    state = dict(state)
    converged = bool(state.pop("converged"))
    residual = float(state.get("residual", math.nan))
    if converged:
        status = Status.CONVERGED
    else:
        status = Status.MAX_ITERATIONS if math.isfinite(residual) else Status.NON_FINITE
    state["status"] = status
    state["metadata"] = dict(state.get("metadata", {})) | {"loaded_from": _FORMAT_1}
    return state


def hermite(
    t_nodes: torch.Tensor,
    points: torch.Tensor,
    velocities: torch.Tensor,
    t: float | torch.Tensor,
    *,
    derivative: bool = False,
) -> torch.Tensor:
    r"""Cubic Hermite interpolation of points and velocities at time(s) ``t``, or its derivative.

    On :math:`[t_k, t_{k+1}]` with :math:`h = t_{k+1} - t_k`, :math:`s = (t - t_k)/h`,

    .. math::

        w(t) = h_{00}(s) w_k + h_{10}(s) h \dot w_k + h_{01}(s) w_{k+1} + h_{11}(s) h \dot w_{k+1},

    :math:`h_{00} = 2s^3 - 3s^2 + 1`, :math:`h_{10} = s^3 - 2s^2 + s`,
    :math:`h_{01} = -2s^3 + 3s^2`, :math:`h_{11} = s^3 - s^2`: exact at the nodes,
    :math:`O(h^4)` between them for a smooth path. With ``derivative=True``,
    :math:`\dot w(t) = (h_{00}' w_k + h_{01}' w_{k+1})/h + h_{10}' \dot w_k + h_{11}' \dot w_{k+1}`.

    Parameters
    ----------
    t_nodes : torch.Tensor
        Node times, shape ``(K,)``, increasing.
    points, velocities : torch.Tensor
        Shape ``(K, n)``.
    t : float or tensor
        A time or a 1-D tensor of times in :math:`[t_0, t_{K-1}]`.
    derivative : bool
        Return :math:`\dot w(t)` instead of :math:`w(t)`.

    Returns
    -------
    torch.Tensor
        Shape ``(n,)`` for a scalar ``t``, else ``(len(t), n)``.
    """
    scalar = not isinstance(t, torch.Tensor) or t.ndim == 0
    tt = torch.as_tensor(t, dtype=t_nodes.dtype, device=t_nodes.device).reshape(-1)
    if not bool(torch.isfinite(tt).all()):
        raise ValueError("t must be finite")
    lo, hi = float(t_nodes[0]), float(t_nodes[-1])
    eps = 1e-12 * max(1.0, abs(hi))
    if bool((tt < lo - eps).any()) or bool((tt > hi + eps).any()):
        raise ValueError(
            f"t must lie in [{lo}, {hi}], got values in [{float(tt.min())}, {float(tt.max())}]"
        )
    k = torch.searchsorted(t_nodes, tt, right=True).sub(1).clamp(0, t_nodes.numel() - 2)
    h = (t_nodes[k + 1] - t_nodes[k]).unsqueeze(-1)
    s = ((tt - t_nodes[k]).unsqueeze(-1) / h).clamp(0.0, 1.0)
    s2 = s * s
    if derivative:
        d00, d10, d11 = 6 * s2 - 6 * s, 3 * s2 - 4 * s + 1, 3 * s2 - 2 * s
        out = d00 * (points[k] - points[k + 1]) / h + d10 * velocities[k] + d11 * velocities[k + 1]
    else:
        s3 = s2 * s
        out = (
            (2 * s3 - 3 * s2 + 1) * points[k]
            + (s3 - 2 * s2 + s) * h * velocities[k]
            + (-2 * s3 + 3 * s2) * points[k + 1]
            + (s3 - s2) * h * velocities[k + 1]
        )
    return out[0] if scalar else out
