"""The layers of riemfip (first figure) and the data path of a FIP step and of a geodesic
solve (second figure), drawn with matplotlib for the architecture page."""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

BLUE, GREEN, GREY = "#dbe9f6", "#e8f3e1", "#f1f1f1"


def box(ax, x, y, w, h, title, lines=(), color=GREEN, size=8.4):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            fc=color,
            ec="0.3",
            lw=1,
        )
    )
    ax.text(
        x + w / 2,
        y + h - 0.15,
        title,
        ha="center",
        va="top",
        fontsize=10,
        weight="bold",
    )
    for i, line in enumerate(lines):
        ax.text(
            x + 0.12, y + h - 0.5 - 0.29 * i, line, ha="left", va="top", fontsize=size
        )


def arrow(ax, a, b, color="0.25"):
    ax.add_patch(
        FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.3)
    )


# ---------------------------------------------------------------- layers
fig, ax = plt.subplots(figsize=(10, 6.3))
ax.set(xlim=(0, 10), ylim=(0, 6.3))
ax.axis("off")
ax.text(0.1, 6.12, "riemfip: what you do with the geometry", fontsize=9, style="italic")
ax.text(
    0.1,
    3.6,
    "manifolds: the geometry (imports nothing from riemfip)",
    fontsize=9,
    style="italic",
)
box(
    ax,
    0.1,
    4.1,
    3.1,
    1.85,
    "riemfip.optim",
    [
        "FIP, FIPPenalty (geoopt OptimMixin)",
        "AnchorSampling, PullBack,",
        "DriftGuard; PathStepInfo",
    ],
    BLUE,
)
box(
    ax,
    3.45,
    4.1,
    3.1,
    1.85,
    "riemfip.connectivity",
    ["connect (relax or shoot)", "compare_paths, fit_bezier,", "straight_line"],
    BLUE,
)
box(
    ax,
    6.8,
    4.1,
    3.1,
    1.85,
    "riemfip.applications",
    [
        "continual, sparsify, robust_ensemble",
        "(use optim and connectivity)",
        "data, checkpoint, records",
        "cli, benchmarks/",
    ],
    BLUE,
)
box(
    ax,
    0.1,
    0.15,
    3.1,
    3.25,
    "PullbackMetric",
    [
        r"embed: $F(w) = N^{-1/2}\,\phi(f(w; x_b))_b$",
        r"matvec: $g v = J^\top J v + \lambda v$",
        "    one JVP, one VJP",
        r"solve: $g^{-1}b$ (dense | output | CG)",
        r"acceleration: $-J^\top (K + \lambda I)^{-1} h$",
        "spectrum(w, k) -> Spectrum",
        "output_gram(w) -> OutputGram",
        "jacobian_operator(w)",
    ],
)
box(
    ax,
    3.45,
    1.95,
    3.1,
    1.45,
    "WeightSpace",
    [
        r"egrad2rgrad: $g^{-1}\nabla L$",
        r"retr: $w + v$; transp: identity",
        "expmap, logmap, dist",
    ],
)
box(
    ax,
    3.45,
    0.15,
    3.1,
    1.5,
    "manifolds.geodesic",
    [
        "integrate_geodesic (RK4, DoPri 5(4))",
        "shoot, relax, collocation",
        "-> GeodesicPath with a Status",
    ],
)
box(
    ax,
    6.8,
    0.15,
    3.1,
    3.25,
    "under the metric",
    [
        r"output_metrics: $G = D\phi^\top D\phi$",
        "    euclidean, fisher, bhattacharyya",
        "FlatModule: the net as f(w, x)",
        "jacobian, layer_jacobian:",
        "    J exact, factored per layer",
        r"OutputGram: $K = JJ^\top$, Cholesky",
        "conjugate_gradient, lanczos",
        "SolveResult, Status",
    ],
)
arrow(ax, (1.65, 4.1), (1.65, 3.4))
arrow(ax, (5.0, 4.1), (5.0, 3.4))
arrow(ax, (8.35, 4.1), (8.35, 3.4))
arrow(ax, (5.0, 1.95), (5.0, 1.65))
arrow(ax, (3.45, 2.65), (3.2, 2.65))
arrow(ax, (3.45, 0.9), (3.2, 0.9))
arrow(ax, (6.8, 1.8), (3.2, 1.8), color="0.55")
fig.tight_layout()

# ---------------------------------------------------------------- data paths
fig, ax = plt.subplots(figsize=(10, 4.4))
ax.set(xlim=(0, 10), ylim=(0, 4.4))
ax.axis("off")


def chain(y, title, steps, color):
    ax.text(0.1, y + 1.25, title, fontsize=10, weight="bold")
    width = 9.8 / len(steps)
    for i, (head, lines) in enumerate(steps):
        x = 0.1 + i * width
        box(ax, x, y, width - 0.25, 1.05, head, lines, color, size=7.4)
        if i:
            arrow(ax, (x - 0.25, y + 0.52), (x, y + 0.52))


chain(
    2.75,
    "A FIP step (riemfip.optim.FIP.step)",
    [
        ("gradient", [r"loss.backward(): $\nabla L$", "on the new batch"]),
        ("anchors", ["rotating batch,", "random neighbours"]),
        ("J at w", ["FlatModule + embed", "factored or autograd"]),
        ("output solve", [r"$(K + \lambda I)^{-1}[J\nabla L,\ r]$", "one Cholesky"]),
        (
            "step",
            [r"$-\eta(\nabla L - J^\top z_1)$", r"$-\gamma J^\top z_2$ (pull-back)"],
        ),
        ("certify", ["held-out drift,", "DriftGuard; write w"]),
    ],
    BLUE,
)
chain(
    0.45,
    "A geodesic solve (shoot: Newton on the flow; each flow step)",
    [
        ("v0 guess", ["straight line", "or relax's path"]),
        ("RK stage", [r"$(w, v)$ at the stage"]),
        ("h", [r"$D^2F[v, v]$:", "forward-over-forward"]),
        ("output solve", [r"$z = (K + \lambda I)^{-1} h$", "or CG on g"]),
        ("acceleration", [r"$\ddot w = -J^\top z$", "one VJP"]),
        ("Newton", [r"miss $\exp_{w_0}(v_0) - w_1$", "GMRES; status"]),
    ],
    GREEN,
)
fig.tight_layout()
