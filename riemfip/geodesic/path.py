r"""The result of a geodesic boundary-value solve: a discretised path with its diagnostics.

A :class:`GeodesicPath` is to the geodesic solvers what :class:`scipy.optimize.OptimizeResult`
is to :func:`scipy.optimize.minimize`: the answer (points, velocities, the initial
velocity :math:`v_0 = \log_{w_0} w_1`) together with how trustworthy it is
(``residual``, ``converged``, ``message``, ``iterations``). A solver never returns a
wrong path silently: it returns ``converged=False`` with the residual and a message
saying what failed, or raises :class:`~manifolds.validation.NotConvergedError` when
called with ``strict=True`` (equivalently, call :meth:`GeodesicPath.raise_if_failed`).

The path is parametrised on :math:`t \in [0, 1]` with :math:`w(0) = w_0`,
:math:`w(1) = w_1`; for an exact geodesic the speed :math:`\|\dot w\|_g` is
constant, so ``length`` :math:`= \|v_0\|_{g(w_0)}` and ``energy``
:math:`= \tfrac12 \int_0^1 \|\dot w\|_g^2\,dt = \tfrac12\,\text{length}^2`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

from manifolds.validation import NotConvergedError

__all__ = ["GeodesicPath"]

_TENSOR_FIELDS = ("t", "points", "velocities", "v0")
_SCALAR_FIELDS = ("length", "energy", "residual", "tol", "converged", "message", "iterations")


@dataclass
class GeodesicPath:
    r"""A discrete geodesic from ``points[0]`` to ``points[-1]`` on :math:`t \in [0, 1]`.

    Attributes
    ----------
    t : torch.Tensor
        Times, shape ``(K,)``, increasing from 0 to 1.
    points : torch.Tensor
        :math:`w(t_k)`, shape ``(K, n)``.
    velocities : torch.Tensor
        :math:`\dot w(t_k)`, shape ``(K, n)``.
    v0 : torch.Tensor
        The initial velocity, :math:`\log_{w_0}(w_1)` when converged.
    length : float
        :math:`\int_0^1 \|\dot w\|_{g(w)}\,dt` (how each solver evaluates it is in
        ``metadata["length_rule"]``).
    energy : float
        :math:`\tfrac12 \int_0^1 \|\dot w\|_{g(w)}^2\,dt`.
    residual : float
        How far the path is from solving the boundary-value problem. For
        ``shoot`` and ``collocation``: the Euclidean endpoint mismatch
        :math:`\|\exp_{w_0}(v_0) - w_1\|` with :math:`\exp` the RK4 flow of
        :func:`manifolds.integrate_geodesic` (``metadata["steps"]`` steps). For
        ``relax``: the Euclidean norm of the gradient of the discrete path energy
        over the interior points (see :func:`riemfip.geodesic.relax`).
    tol : float
        The tolerance ``residual`` was held to.
    converged : bool
        ``residual <= tol`` (and the solver reports success).
    message : str
        What happened, in words; on failure, what to try.
    iterations : int
        Outer iterations (Newton steps, L-BFGS iterations, or collocation mesh
        refinements).
    method : str
        ``"shoot"``, ``"relax"`` or ``"collocation"``.
    metadata : dict
        Solver-specific diagnostics (plain Python numbers, strings, lists).
    """

    t: torch.Tensor
    points: torch.Tensor
    velocities: torch.Tensor
    v0: torch.Tensor
    length: float
    energy: float
    residual: float
    tol: float
    converged: bool
    message: str
    iterations: int
    method: str = ""
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

    # ------------------------------------------------------------ views
    @property
    def start(self) -> torch.Tensor:
        """:math:`w(0)`."""
        return self.points[0]

    @property
    def end(self) -> torch.Tensor:
        """:math:`w(1)`."""
        return self.points[-1]

    def __repr__(self) -> str:
        return (
            f"GeodesicPath(method={self.method!r}, K={self.points.shape[0]}, "
            f"n={self.points.shape[1]}, length={self.length:.6g}, residual={self.residual:.3e}, "
            f"converged={self.converged}, iterations={self.iterations}, message={self.message!r})"
        )

    def raise_if_failed(self) -> GeodesicPath:
        """Return ``self`` if converged, else raise :class:`~manifolds.validation.NotConvergedError`
        carrying the message, residual and iterations."""
        if not self.converged:
            raise NotConvergedError(
                f"{self.method} did not converge: {self.message} "
                f"(residual {self.residual:.3e} > tol {self.tol:.1e})",
                self.residual,
                self.iterations,
            )
        return self

    def at(self, t: float | torch.Tensor) -> torch.Tensor:
        r"""The path at time(s) ``t`` by cubic Hermite interpolation of points and velocities.

        On :math:`[t_k, t_{k+1}]` with :math:`h = t_{k+1} - t_k`, :math:`s = (t - t_k)/h`,

        .. math::

            w(t) = h_{00}(s) w_k + h_{10}(s) h \dot w_k + h_{01}(s) w_{k+1} + h_{11}(s) h \dot w_{k+1},

        :math:`h_{00} = 2s^3 - 3s^2 + 1`, :math:`h_{10} = s^3 - 2s^2 + s`,
        :math:`h_{01} = -2s^3 + 3s^2`, :math:`h_{11} = s^3 - s^2`: exact at the
        nodes, :math:`O(h^4)` between them for a smooth path.

        Parameters
        ----------
        t : float or tensor
            A time or a 1-D tensor of times in :math:`[t_0, t_{K-1}]`.

        Returns
        -------
        torch.Tensor
            Shape ``(n,)`` for a scalar ``t``, else ``(len(t), n)``.
        """
        scalar = not isinstance(t, torch.Tensor) or t.ndim == 0
        tt = torch.as_tensor(t, dtype=self.t.dtype, device=self.t.device).reshape(-1)
        if not bool(torch.isfinite(tt).all()):
            raise ValueError("t must be finite")
        lo, hi = float(self.t[0]), float(self.t[-1])
        eps = 1e-12 * max(1.0, abs(hi))
        if bool((tt < lo - eps).any()) or bool((tt > hi + eps).any()):
            raise ValueError(
                f"t must lie in [{lo}, {hi}], got values in [{float(tt.min())}, {float(tt.max())}]"
            )
        k = torch.searchsorted(self.t, tt, right=True).sub(1).clamp(0, self.t.numel() - 2)
        h = (self.t[k + 1] - self.t[k]).unsqueeze(-1)
        s = ((tt - self.t[k]).unsqueeze(-1) / h).clamp(0.0, 1.0)
        s2, s3 = s * s, s * s * s
        out = (
            (2 * s3 - 3 * s2 + 1) * self.points[k]
            + (s3 - 2 * s2 + s) * h * self.velocities[k]
            + (-2 * s3 + 3 * s2) * self.points[k + 1]
            + (s3 - s2) * h * self.velocities[k + 1]
        )
        return out[0] if scalar else out

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings only (no metric, no network, no data)."""
        state = {name: getattr(self, name).detach().cpu() for name in _TENSOR_FIELDS}
        for name in _SCALAR_FIELDS + ("method",):
            state[name] = getattr(self, name)
        state["metadata"] = dict(self.metadata)
        state["format"] = "riemfip.GeodesicPath/1"
        return state

    def save(self, file: str | os.PathLike) -> None:
        """Write the path with :func:`torch.save` (plain tensors and numbers; reloadable with
        ``weights_only=True``)."""
        torch.save(self.state_dict(), file)

    @classmethod
    def load(cls, file: str | os.PathLike, *, map_location=None) -> GeodesicPath:
        """Read a path written by :meth:`save` (``torch.load(..., weights_only=True)``)."""
        state = torch.load(file, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "riemfip.GeodesicPath/1":
            raise ValueError(f"{file} does not hold a GeodesicPath written by GeodesicPath.save")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})
