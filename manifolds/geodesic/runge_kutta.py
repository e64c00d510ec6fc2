r"""One explicit Runge–Kutta kernel for the geodesic equation, driven by a Butcher tableau.

The geodesic equation is second order; as a first-order system in :math:`y = (w, v)`,

.. math::

    \dot w = v, \qquad \dot v = a(w, v) = -\Gamma_w(v, v).

An explicit :math:`s`-stage method with tableau :math:`(c, A, b)` takes one step of size
:math:`h` as

.. math::

    W_i = w + h \sum_{j<i} A_{ij} V_j, \quad V_i = v + h \sum_{j<i} A_{ij}\, a(W_j, V_j),
    \qquad
    w' = w + h \sum_i b_i V_i, \quad v' = v + h \sum_i b_i\, a(W_i, V_i).

An embedded pair adds weights :math:`e = b - \hat b` of a lower-order method and the error
estimate :math:`(h \sum_i e_i V_i,\; h \sum_i e_i a(W_i, V_i))`; in the pairs here the last
stage is :math:`a(w', v')` ("first same as last": it is the first stage of the next step).

Pieces, as in :mod:`scipy.integrate` (``RK45``, ``RK23``):

:class:`ButcherTableau`, :data:`RK4`, :data:`DORMAND_PRINCE`, :data:`BOGACKI_SHAMPINE`
    The coefficients: classical RK4 (order 4, no estimate) for fixed steps; Dormand–Prince
    5(4) and Bogacki–Shampine 3(2) for adaptive steps.
:func:`rk_step`
    One step of any tableau: pure tensor arithmetic on :math:`(w, v)` and the stages, so
    with a pure acceleration (:meth:`~manifolds.PullbackMetric.dense_acceleration`) it can
    be batched by :func:`torch.func.vmap` and differentiated.
:func:`fixed_step_flow`
    The fixed-step driver (with an optional callback per step).
:func:`error_norm`, :func:`initial_step`, :class:`AdaptiveRungeKutta`
    Step-size control: the mixed absolute/relative error norm over :math:`(w, v)`, the
    starting step of Hairer, Nørsett & Wanner (II.4), and the adaptive driver.

Step-size control (the rule :class:`AdaptiveRungeKutta` enforces): a step is accepted when

.. math::

    \|e\|_{\rm rms} = \Bigl(\frac{1}{2n}\sum_k \Bigl(\frac{e_k}{\text{atol}
        + \text{rtol}\,\max(|y_k|, |y'_k|)}\Bigr)^2\Bigr)^{1/2} \le 1

over the :math:`2n` entries of :math:`(w, v)`, and the next step is
:math:`h \cdot \min(10, \max(0.2, 0.9\,\|e\|^{-1/(q+1)}))` with :math:`q` the order of the
embedded method (no growth right after a rejection). A step whose stages or estimate are not
finite counts as :math:`\|e\| = \infty` (the step shrinks fivefold).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..status import Status

__all__ = [
    "BOGACKI_SHAMPINE",
    "DORMAND_PRINCE",
    "RK4",
    "AdaptiveRungeKutta",
    "ButcherTableau",
    "RKStep",
    "error_norm",
    "fixed_step_flow",
    "initial_step",
    "rk_step",
    "tableau",
]

Acceleration = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ButcherTableau:
    r"""Coefficients of an explicit Runge–Kutta method (with an optional embedded pair).

    Attributes
    ----------
    name : str
    a : tuple of tuples
        Row :math:`i` holds :math:`A_{i0}, \dots, A_{i,i-1}` (row 0 is empty).
    b : tuple
        The weights of the propagated solution, one per stage.
    order : int
        Order of the propagated solution.
    error : tuple, optional
        :math:`e = b - \hat b`, one per stage plus one for the stage :math:`a(w', v')` at the
        new point; ``None`` for a method without an error estimate.
    error_order : int, optional
        Order :math:`q` of the embedded method (sets the step-size exponent :math:`-1/(q+1)`).
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    error: tuple[float, ...] | None = None
    error_order: int | None = None

    @property
    def stages(self) -> int:
        """Number of stages :math:`s` (not counting the new point's)."""
        return len(self.b)

    @property
    def embedded(self) -> bool:
        """Whether the tableau has an error estimate (and so can drive adaptive steps)."""
        return self.error is not None


#: Classical fourth-order Runge–Kutta (no error estimate): the fixed-step flow.
RK4 = ButcherTableau(
    name="rk4",
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
)

#: Dormand–Prince 5(4), first same as last: the adaptive flow's default.
DORMAND_PRINCE = ButcherTableau(
    name="dopri5",
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    order=5,
    error=(-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40),
    error_order=4,
)

#: Bogacki–Shampine 3(2), first same as last.
BOGACKI_SHAMPINE = ButcherTableau(
    name="bs23",
    a=((), (1 / 2,), (0.0, 3 / 4)),
    b=(2 / 9, 1 / 3, 4 / 9),
    order=3,
    error=(5 / 72, -1 / 12, -1 / 9, 1 / 8),
    error_order=2,
)

_TABLEAUS = {t.name: t for t in (RK4, DORMAND_PRINCE, BOGACKI_SHAMPINE)}


def tableau(scheme: str | ButcherTableau) -> ButcherTableau:
    """The tableau named ``scheme`` (``"rk4"``, ``"dopri5"``, ``"bs23"``), or ``scheme`` itself."""
    if isinstance(scheme, ButcherTableau):
        return scheme
    if scheme not in _TABLEAUS:
        raise ValueError(f"scheme must be one of {tuple(_TABLEAUS)}, got {scheme!r}")
    return _TABLEAUS[scheme]


class RKStep(NamedTuple):
    """One Runge–Kutta step: the new state, the error estimate (``None`` without an embedded
    pair) and the acceleration at the new state (``None`` when it was not needed)."""

    w: torch.Tensor
    v: torch.Tensor
    error_w: torch.Tensor | None
    error_v: torch.Tensor | None
    a_new: torch.Tensor | None


def _combine(base: torch.Tensor, h: float, weights, terms) -> torch.Tensor:
    r""":math:`\text{base} + h \sum_j \text{weights}_j\,\text{terms}_j`, skipping zero weights."""
    out = base
    for c, k in zip(weights, terms, strict=False):
        if c:
            out = out + (h * c) * k
    return out


def rk_step(
    method: ButcherTableau,
    accel: Acceleration,
    w: torch.Tensor,
    v: torch.Tensor,
    h: float,
    a_first: torch.Tensor | None = None,
) -> RKStep:
    r"""One explicit Runge–Kutta step of size ``h`` on :math:`\dot w = v`, :math:`\dot v = a(w, v)`.

    Parameters
    ----------
    method : ButcherTableau
    accel : callable
        :math:`(w, v) \mapsto a(w, v)`.
    w, v : torch.Tensor
        The state at the start of the step.
    h : float
        Step size.
    a_first : torch.Tensor, optional
        :math:`a(w, v)` when already known (the last stage of the previous step of a
        first-same-as-last pair); evaluated otherwise.

    Returns
    -------
    RKStep
        For an embedded pair also the error estimate and :math:`a(w', v')`, which costs one
        more acceleration (and is the next step's first stage).
    """
    vs = [v]
    accs = [accel(w, v) if a_first is None else a_first]
    for row in method.a[1:]:
        w_i = _combine(w, h, row, vs)
        v_i = _combine(v, h, row, accs)
        vs.append(v_i)
        accs.append(accel(w_i, v_i))
    w_new = _combine(w, h, method.b, vs)
    v_new = _combine(v, h, method.b, accs)
    if method.error is None:
        return RKStep(w_new, v_new, None, None, None)
    a_new = accel(w_new, v_new)
    vs.append(v_new)
    accs.append(a_new)
    zero_w, zero_v = torch.zeros_like(w), torch.zeros_like(v)
    return RKStep(
        w_new,
        v_new,
        _combine(zero_w, h, method.error, vs),
        _combine(zero_v, h, method.error, accs),
        a_new,
    )


def fixed_step_flow(
    accel: Acceleration,
    w: torch.Tensor,
    v: torch.Tensor,
    t1: float,
    steps: int,
    method: ButcherTableau = RK4,
    on_step: Callable[[float, torch.Tensor, torch.Tensor], bool | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(w, v)` at :math:`t_1` after ``steps`` equal steps of ``method`` (its propagated
    solution only).

    Without ``on_step`` this is a pure tensor function of ``(w, v)`` when ``accel`` is one (no
    checks, no branching on values), so :func:`torch.func.vmap` can batch it over many initial
    conditions. ``on_step(t_k, w_k, v_k)`` is called after each step,
    :math:`t_k = k t_1/\text{steps}`; returning ``False`` stops the flow at that state.
    """
    h = float(t1) / steps
    for k in range(steps):
        step = rk_step(method, accel, w, v, h)
        w, v = step.w, step.v
        if on_step is not None and on_step((k + 1) * h, w, v) is False:
            break
    return w, v


def _weighted_rms(pairs) -> float:
    r""":math:`\bigl(\frac1N \sum (x / s)^2\bigr)^{1/2}` over all ``(x, s)`` pairs together."""
    total = sum(float((x / s).square().sum()) for x, s in pairs)
    count = sum(x.numel() for x, _ in pairs)
    return math.sqrt(total / count)


def error_norm(step: RKStep, w, v, rtol: float, atol: float) -> float:
    r"""The weighted RMS norm of the step's error estimate over the :math:`2n` entries of
    :math:`(w, v)`, with weights :math:`\text{atol} + \text{rtol}\max(|y|, |y'|)`;
    :math:`\infty` when the step or the estimate is not finite."""
    out = _weighted_rms(
        [
            (step.error_w, atol + rtol * torch.maximum(w.abs(), step.w.abs())),
            (step.error_v, atol + rtol * torch.maximum(v.abs(), step.v.abs())),
        ]
    )
    return out if math.isfinite(out) else math.inf


def initial_step(
    accel: Acceleration, w, v, a, t1: float, order: int, rtol: float, atol: float
) -> float:
    r"""A first step size for an adaptive flow (Hairer, Nørsett & Wanner, *Solving ODEs I*,
    II.4; as :mod:`scipy.integrate`): :math:`h_0 = 0.01\,\|y\|/\|f\|`, then
    :math:`h_1 = (0.01 / \max(\|f\|, \|\partial f\|))^{1/(p+1)}` from one Euler step's change in
    :math:`f = (v, a)`; the smaller of :math:`100 h_0`, :math:`h_1` and :math:`t_1`. One
    acceleration."""
    scale_w, scale_v = atol + rtol * w.abs(), atol + rtol * v.abs()
    d0 = _weighted_rms([(w, scale_w), (v, scale_v)])
    d1 = _weighted_rms([(v, scale_w), (a, scale_v)])
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 or not math.isfinite(d1) else 0.01 * d0 / d1
    h0 = min(h0, t1)
    w1, v1 = w + h0 * v, v + h0 * a
    a1 = accel(w1, v1)
    d2 = _weighted_rms([(v1 - v, scale_w), (a1 - a, scale_v)]) / h0
    if not math.isfinite(d2):
        return h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, 1e-3 * h0)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, t1)


class AdaptiveRungeKutta:
    r"""An embedded Runge–Kutta pair on :math:`[0, t_1]` with standard step-size control.

    Call :meth:`step` until :attr:`status` is set; after each accepted step :attr:`t`,
    :attr:`w`, :attr:`v` hold the new state (as :class:`scipy.integrate.RK45` does).

    Parameters
    ----------
    accel : callable
        :math:`(w, v) \mapsto a(w, v)`.
    w, v : torch.Tensor
        Initial state (finite).
    t1 : float
        Final time, > 0.
    method : ButcherTableau
        An embedded pair (:data:`DORMAND_PRINCE` or :data:`BOGACKI_SHAMPINE`).
    rtol, atol : float
        Relative and absolute tolerances of the error norm (see the module notes).
    first_step : float, optional
        Default: :func:`initial_step` (one acceleration).
    max_steps : int
        Attempted steps (accepted and rejected) before giving up.

    Attributes
    ----------
    status : Status or None
        ``None`` while running; ``CONVERGED`` on reaching :math:`t_1`; ``MAX_ITERATIONS``
        after ``max_steps`` attempts; ``NON_FINITE`` when the step size fell below
        :math:`10\,\varepsilon\, t_1` (:math:`\varepsilon` of the state's dtype) after steps
        with non-finite stages; ``BREAKDOWN`` when it fell below that because the error
        estimate kept it small (the flow blows up, or is stiff).
    message : str
    accepted, rejected : int
    max_error : float
        Largest error norm of an accepted step (:math:`\le 1`).
    """

    SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0

    def __init__(
        self,
        accel: Acceleration,
        w: torch.Tensor,
        v: torch.Tensor,
        t1: float,
        *,
        method: ButcherTableau = DORMAND_PRINCE,
        rtol: float,
        atol: float,
        first_step: float | None = None,
        max_steps: int = 10_000,
    ):
        if not method.embedded:
            raise ValueError(f"adaptive steps need an embedded pair, {method.name} has none")
        self.accel, self.method = accel, method
        self.t1, self.rtol, self.atol = float(t1), float(rtol), float(atol)
        self.max_steps = int(max_steps)
        self.t, self.w, self.v = 0.0, w, v
        self.a = accel(w, v)
        if first_step is None:
            first_step = initial_step(accel, w, v, self.a, self.t1, method.error_order, rtol, atol)
        self.h = min(float(first_step), self.t1)
        self.min_step = 10 * torch.finfo(w.dtype).eps * self.t1
        self.status: Status | None = None
        self.message = "running"
        self.accepted = self.rejected = 0
        self.max_error = 0.0
        self.non_finite = False  # whether the last rejected step had non-finite values

    def _stop(self, status: Status, message: str) -> None:
        self.status, self.message = status, message

    def step(self) -> None:
        """Attempt steps until one is accepted or the flow fails (then :attr:`status` says why)."""
        grow = True
        while True:
            if self.accepted + self.rejected >= self.max_steps:
                self._stop(
                    Status.MAX_ITERATIONS,
                    f"{self.max_steps} steps reached at t = {self.t:.6g} of {self.t1:.6g}; "
                    "raise max_steps or tol",
                )
                return
            if self.h < self.min_step:
                self._underflow()
                return
            h = min(self.h, self.t1 - self.t)
            step = rk_step(self.method, self.accel, self.w, self.v, h, self.a)
            err = error_norm(step, self.w, self.v, self.rtol, self.atol)
            if err <= 1.0:
                factor = self.MAX_FACTOR if err == 0 else self.SAFETY * err**self._exponent
                factor = min(self.MAX_FACTOR if grow else 1.0, max(self.MIN_FACTOR, factor))
                self._accept(step, h, err, factor)
                return
            self.rejected += 1
            self.non_finite = not math.isfinite(err)
            grow = False
            factor = 0.0 if self.non_finite else self.SAFETY * err**self._exponent
            self.h = h * max(self.MIN_FACTOR, factor)

    @property
    def _exponent(self) -> float:
        return -1.0 / (self.method.error_order + 1)

    def _accept(self, step: RKStep, h: float, err: float, factor: float) -> None:
        self.t = self.t1 if self.t1 - (self.t + h) <= self.min_step else self.t + h
        self.w, self.v, self.a = step.w, step.v, step.a_new
        self.accepted += 1
        self.non_finite = False
        self.max_error = max(self.max_error, err)
        self.h = h * factor
        if self.t >= self.t1:
            self._stop(Status.CONVERGED, "converged")

    def _underflow(self) -> None:
        where = f"at t = {self.t:.6g} of {self.t1:.6g}"
        if not self.non_finite:
            self._stop(
                Status.BREAKDOWN,
                f"step size underflow {where}: the error estimate asks for ever smaller steps "
                f"(below {self.min_step:.1e}): the flow blows up, leaves the chart or is stiff; "
                "shorten the velocity or raise the damping",
            )
        else:
            self._stop(
                Status.NON_FINITE,
                f"the flow produced non-finite values {where} at every step size down to "
                f"{self.min_step:.1e}; shorten the velocity or raise the damping",
            )
