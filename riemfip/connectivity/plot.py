"""PNG of a :class:`~riemfip.connectivity.ConnectivityReport`: loss and accuracy against t.

matplotlib (``pip install "riemfip[plot]"``) is imported only when a plot is drawn, through
:func:`riemfip.plotting.png_figure` (Agg backend), so nothing else needs it or a display.
"""

from __future__ import annotations

from pathlib import Path

from ..plotting import png_figure

__all__ = ["plot_report"]

_STYLES = {
    "bezier": dict(color="tab:green", marker="s"),
    "line": dict(color="tab:red", marker="^"),
}
# Every other path (the geodesic first, then e.g. geodesics on other anchor sets), in order.
_OTHERS = ("tab:blue", "tab:purple", "tab:cyan", "tab:olive", "tab:brown", "tab:pink", "0.3")


def plot_report(report, file: str | Path, *, title: str | None = None) -> Path:
    """Two panels (loss, accuracy in %) with one curve per path; returns the PNG path.

    Paths named ``"bezier"`` and ``"line"`` get fixed colours (green, red); the others
    (geodesics) take blue, purple, cyan, ... in order. The dashed grey line in the accuracy panel is the lower
    endpoint accuracy of the first path, to read drops against.
    """
    others = iter(_OTHERS * len(report.paths))
    with png_figure(file, ncols=2, figsize=(10, 4), title=title) as (_, (ax_loss, ax_acc)):
        for name, ev in report.paths.items():
            s = ev.summary()
            label = f"{name} (barrier {s['barrier']:.3f}, max err {100 * s['max_error']:.1f}%)"
            style = _STYLES.get(name) or dict(color=next(others), marker="o")
            ax_loss.plot(ev.s.numpy(), ev.loss.numpy(), label=label, markersize=3, **style)
            ax_acc.plot(ev.s.numpy(), 100 * ev.accuracy.numpy(), label=name, markersize=3, **style)
        first = next(iter(report.paths.values()))
        ax_acc.axhline(
            100 * float(min(first.accuracy[0], first.accuracy[-1])), color="0.6", ls="--", lw=1
        )
        ax_loss.set(xlabel="t", ylabel="cross-entropy", title="loss along the path")
        ax_acc.set(xlabel="t", ylabel="accuracy (%)", title="accuracy along the path")
        for ax in (ax_loss, ax_acc):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return Path(file)
