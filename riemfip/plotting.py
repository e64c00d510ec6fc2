"""Headless matplotlib for the PNG plots that results write.

matplotlib is an optional dependency (``pip install "riemfip[plot]"``); it is
imported only when a plot is asked for, with the non-interactive Agg backend so
that plotting works on machines without a display.
"""

from __future__ import annotations

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a clear ``ImportError`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plotting needs matplotlib: pip install "riemfip[plot]"') from err
    return plt
