r"""How every solver in :mod:`manifolds` says how it ended: an integer status, as scipy does.

A result carries a :class:`Status` and a message. ``converged`` is
``status == Status.CONVERGED``, decided by the solver when it stops and never read
back from the message text. The message says the same thing in words, with the
numbers and what to try; :data:`MESSAGES` gives the generic sentence for each status.

Statuses
--------
``CONVERGED`` (0)
    The solver's own tolerance rule is met (each solver documents its rule).
``MAX_ITERATIONS`` (1)
    The iteration (or evaluation) budget ran out first.
``BREAKDOWN`` (2)
    No further progress was possible: a direction of zero curvature in conjugate
    gradients, a line search that found no decrease.
``NON_FINITE`` (3)
    The computation produced NaN or Inf (a flow that blew up, an overflow).
``INACCURATE`` (4)
    The solver met its tolerance on its own model of the problem, but the
    independent check of the answer did not (e.g. multiple-shooting segments that
    meet while one flow from :math:`v_0` misses :math:`w_1`).
"""

from __future__ import annotations

import enum

__all__ = ["MESSAGES", "Status"]


class Status(enum.IntEnum):
    """Outcome of a solve; ``0`` is success, as for :func:`scipy.optimize.minimize`."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    BREAKDOWN = 2
    NON_FINITE = 3
    INACCURATE = 4


#: The generic sentence for each status.
MESSAGES = {
    Status.CONVERGED: "converged",
    Status.MAX_ITERATIONS: "iteration limit reached before the tolerance",
    Status.BREAKDOWN: "no further progress possible",
    Status.NON_FINITE: "the computation produced non-finite values",
    Status.INACCURATE: "the solver's own criterion is met but the independent check is not",
}
