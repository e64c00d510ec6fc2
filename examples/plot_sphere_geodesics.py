r"""
Geodesics on the sphere
=======================

The smallest pullback metric: two "weights" :math:`w = (\theta, \varphi)` and the
"network" :math:`f(w) = (\sin\theta\cos\varphi, \sin\theta\sin\varphi, \cos\theta)`, the
unit sphere's embedding in :math:`\mathbb{R}^3`. With the Euclidean output metric the
pullback is the round metric :math:`g = \operatorname{diag}(1, \sin^2\theta)`, whose
geodesics are great circles. The same code runs on a network's weights; here every
answer has a closed form to check it against.
"""

# %%
# The metric and a fan of geodesics
# ---------------------------------
# :class:`~manifolds.PullbackMetric` takes any function of a flat weight vector.
# :func:`~manifolds.integrate_geodesic` integrates
# :math:`\ddot w = -\Gamma_w(\dot w, \dot w)` by adaptive Dormand–Prince steps.
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from manifolds import PullbackMetric, integrate_geodesic
from manifolds.geodesic import shoot


def sphere(w):
    theta, phi = w
    return torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()])


metric = PullbackMetric(sphere)
w0 = torch.tensor([1.1, 0.2], dtype=torch.float64)
print("g(w0) =", metric.dense(w0).diagonal(), " sin^2(theta) =", math.sin(1.1) ** 2)

fan = []
for angle in np.linspace(0, np.pi, 4, endpoint=False) + np.pi / 8:
    # a unit-speed initial velocity in the direction `angle` (orthonormal frame of g)
    v0 = torch.tensor(
        [math.cos(angle), math.sin(angle) / math.sin(1.1)], dtype=torch.float64
    )
    path = integrate_geodesic(metric, w0, 2.5 * v0, tol=1e-6, record=True, speeds=True)
    fan.append(path)
drift = max(p.speed_drift for p in fan)
print(f"largest speed drift along the fan: {drift:.1e} (0 on a geodesic)")

# %%
# A boundary-value problem: shooting between two points
# -----------------------------------------------------
# :func:`~manifolds.geodesic.shoot` solves :math:`\exp_{w_0}(v) = w_1` by Newton's
# method. Its length is the great-circle angle :math:`\arccos\langle f(w_0), f(w_1)\rangle`;
# the straight line in the chart is longer.
w1 = torch.tensor([2.2, 2.6], dtype=torch.float64)
bvp = shoot(metric, w0, w1, steps=16)
angle = math.acos(float(sphere(w0) @ sphere(w1)))
print(bvp.message)
print(f"geodesic length {bvp.length:.6f}, great-circle angle {angle:.6f}")

t = torch.linspace(0, 1, 65, dtype=torch.float64)
chart_line = w0 + t[:, None] * (w1 - w0)
line_length = sum(
    float(metric.norm(a, b - a))
    for a, b in zip(chart_line[:-1], chart_line[1:], strict=True)
)
print(f"straight line in (theta, phi): length {line_length:.6f}")

# %%
# The picture
# -----------
# Geodesics leave :math:`w_0` as great circles; the shooting solution (red) is the short
# great-circle arc, the chart's straight line (dashed) is not a geodesic.
fig = plt.figure(figsize=(6, 6.4))
ax = fig.add_subplot(projection="3d")
u, v = np.mgrid[0 : np.pi : 30j, 0 : 2 * np.pi : 60j]
ax.plot_wireframe(
    np.sin(u) * np.cos(v), np.sin(u) * np.sin(v), np.cos(u), color="0.85", linewidth=0.4
)


def curve(points):
    return torch.stack([sphere(p) for p in points]).numpy().T


for path in fan:
    ax.plot(*curve(path.points), color="tab:blue", linewidth=1.2)
ax.plot(*curve(bvp.points), color="tab:red", lw=2.5, label="shoot: geodesic w0 → w1")
ax.plot(*curve(chart_line), "k--", linewidth=1.5, label="straight line in the chart")
ax.scatter(*curve([w0, w1]), color="k", s=30)
ax.set_box_aspect((1, 1, 1), zoom=1.35)
ax.set_axis_off()
ax.view_init(elev=20, azim=40)
ax.legend(loc="upper left")
ax.set_title("Geodesics of the pullback of the round sphere")
fig.subplots_adjust(left=0, right=1, bottom=0, top=0.95)
plt.show()
