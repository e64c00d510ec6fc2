"""Headless matplotlib for the PNG plots that results write.

matplotlib is an optional dependency (``pip install "riemfip[plot]"``); it is
imported only when a plot is asked for, with the non-interactive Agg backend so
that plotting works on machines without a display. :func:`png_figure` is the one
way a result draws a PNG: it makes the figure, lets the caller draw, then lays it
out, writes it (creating folders) and closes it, also when drawing fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["png_figure", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a clear ``ImportError`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plotting needs matplotlib: pip install "riemfip[plot]"') from err
    return plt


@contextlib.contextmanager
def png_figure(
    path: str | Path,
    *,
    nrows: int = 1,
    ncols: int = 1,
    figsize: tuple[float, float] = (6, 4),
    dpi: int = 120,
    squeeze: bool = True,
    title: str | None = None,
) -> Iterator[tuple[Any, Any]]:
    """A figure to draw on, written to ``path`` as a PNG when the ``with`` block ends.

    Parameters
    ----------
    path : str or Path
        The PNG file; its folder is created.
    nrows, ncols, figsize, squeeze
        As for :func:`matplotlib.pyplot.subplots`.
    dpi : int
        Resolution of the written file.
    title : str, optional
        A title over all panels (``fig.suptitle``).

    Yields
    ------
    (figure, axes)
        What :func:`matplotlib.pyplot.subplots` returns.

    Examples
    --------
    >>> with png_figure("out/acc.png") as (fig, ax):  # doctest: +SKIP
    ...     ax.plot([0, 1], [90, 95])
    """
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
