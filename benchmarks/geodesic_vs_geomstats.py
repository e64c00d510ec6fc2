r"""riemfip vs geomstats 2.8: exp and log of a pullback metric on the same immersion.

The immersion :math:`F:\mathbb{R}^d \to \mathbb{R}^{2d+4}`,
:math:`F(w) = (w, \tanh(Aw + c))` with :math:`A \in \mathbb{R}^{(d+4)\times d}` and
:math:`c` fixed random (seed 0, entries :math:`\mathcal N(0, 4/d)` and :math:`\mathcal N(0, 1/4)`),
pulled back with the Euclidean metric: :math:`g = J^\top J` (no damping). For each
:math:`d \in \{2, 4, 8, 16\}`: a base point :math:`w_0`, a velocity :math:`v` of
metric length 1, and :math:`w_1 = \exp_{w_0}(v)` from an independent reference
(scipy ``solve_ivp``, DOP853, rtol = atol = 1e-13, closed-form Jacobian and second
derivative of :math:`F`). Each library computes :math:`\exp_{w_0}(v)` and
:math:`\log_{w_0}(w_1)`; the errors are Euclidean distances to :math:`w_1` and
:math:`v`.

geomstats 2.8 needs numpy < 2.4, so it runs in its own throwaway virtual
environment (created on first use at ``--venv``, default ``/tmp/gs-venv``: ``pip
install "geomstats==2.8.*" "numpy<2.4" autograd``) in a subprocess of this
script; it is never a riemfip dependency. Its backend is ``autograd`` (the log
solver needs automatic differentiation), its solvers the defaults of
``PullbackMetric``: ``ExpODESolver`` with 100 explicit Euler steps and
``LogShootingSolver`` (scipy L-BFGS-B on :math:`\|\exp(v) - w_1\|^2` with autodiff
gradients). riemfip: ``WeightSpace.expmap`` (RK4, 32 steps) and
``riemfip.geodesic.shoot`` (exact-Jacobian Newton) with the same RK4 steps, for
each of ``--steps`` (default 4, 8, 32: the geomstats error is matched or beaten
by far at every one of them), float64, one thread. Times are the best of
``--repeat`` runs after one warm-up call.

Usage::

    python benchmarks/geodesic_vs_geomstats.py [--dims 2 4 8 16] [--repeat 3]

Writes ``benchmarks/results/geodesic_vs_geomstats.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------- the problem
def problem(d: int) -> dict:
    """The immersion's parameters, the base point, the velocity and the reference end point."""
    rng = np.random.default_rng(1000 + d)
    a = rng.normal(0.0, 2.0 / np.sqrt(d), size=(d + 4, d))
    c = rng.normal(0.0, 0.5, size=d + 4)
    w0 = rng.normal(0.0, 0.3, size=d)
    v = rng.normal(size=d)
    jac = _jacobian(a, c, w0)
    v = v / np.sqrt(v @ (jac.T @ jac) @ v)  # unit metric length
    w1 = reference_exp(a, c, w0, v)
    return {
        "d": d,
        "A": a.tolist(),
        "c": c.tolist(),
        "w0": w0.tolist(),
        "v": v.tolist(),
        "w1": w1.tolist(),
    }


def _jacobian(a, c, w):
    t = np.tanh(a @ w + c)
    return np.vstack([np.eye(w.size), (1 - t * t)[:, None] * a])


def reference_exp(a, c, w0, v) -> np.ndarray:
    r""":math:`\exp_{w_0}(v)` by DOP853 on :math:`\ddot w = -(J^\top J)^{-1} J^\top D^2F[\dot w, \dot w]`."""
    from scipy.integrate import solve_ivp

    d = w0.size

    def rhs(_t, y):
        w, u = y[:d], y[d:]
        t = np.tanh(a @ w + c)
        jac = np.vstack([np.eye(d), (1 - t * t)[:, None] * a])
        au = a @ u
        h = np.concatenate([np.zeros(d), -2 * t * (1 - t * t) * au * au])
        acc = -np.linalg.solve(jac.T @ jac, jac.T @ h)
        return np.concatenate([u, acc])

    sol = solve_ivp(
        rhs, (0.0, 1.0), np.concatenate([w0, v]), method="DOP853", rtol=1e-13, atol=1e-13
    )
    return sol.y[:d, -1]


# ----------------------------------------------------------------- geomstats side
def geomstats_worker(spec_file: str, repeat: int) -> None:
    """Runs inside the geomstats venv: reads problems, writes timings and results as JSON to stdout."""
    os.environ.setdefault("GEOMSTATS_BACKEND", "autograd")
    import geomstats.backend as gs
    from geomstats.geometry.base import ImmersedSet
    from geomstats.geometry.euclidean import Euclidean

    out = []
    for spec in json.loads(Path(spec_file).read_text()):
        d = spec["d"]
        a, c = gs.array(spec["A"]), gs.array(spec["c"])

        class Tanh(ImmersedSet):
            def _define_embedding_space(self, d=d):
                return Euclidean(2 * d + 4)

            def immersion(self, point, a=a, c=c):
                return gs.concatenate(
                    [point, gs.tanh(gs.einsum("ij,...j->...i", a, point) + c)], axis=-1
                )

        space = Tanh(d)
        w0, v, w1 = gs.array(spec["w0"]), gs.array(spec["v"]), gs.array(spec["w1"])
        res = {"d": d}
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            e = space.metric.exp(v, w0)
            times.append(time.perf_counter() - t0)
        res["exp_seconds"] = min(times)
        res["exp_error"] = float(np.linalg.norm(np.asarray(e) - np.asarray(w1)))
        times = []
        for _ in range(max(1, repeat if d <= 4 else 1)):
            t0 = time.perf_counter()
            lg = space.metric.log(w1, w0)
            times.append(time.perf_counter() - t0)
        res["log_seconds"] = min(times)
        res["log_error"] = float(np.linalg.norm(np.asarray(lg) - np.asarray(v)))
        out.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    print(json.dumps(out))


def ensure_venv(venv: Path) -> Path:
    """Create the throwaway geomstats environment if it is not there; return its python."""
    py = venv / "bin" / "python"
    if py.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "geomstats==2.8.*", "numpy<2.4", "autograd"],
        check=True,
    )
    return py


# ----------------------------------------------------------------- riemfip side
def riemfip_side(specs: list[dict], repeat: int, steps_list: list[int]) -> list[dict]:
    import torch

    from manifolds import PullbackMetric, WeightSpace
    from riemfip.geodesic import shoot

    torch.set_num_threads(1)
    out = []
    for spec in specs:
        d = spec["d"]
        a = torch.tensor(spec["A"], dtype=torch.float64)
        c = torch.tensor(spec["c"], dtype=torch.float64)

        def fn(w, a=a, c=c):
            return torch.cat([w, torch.tanh(a @ w + c)])

        metric = PullbackMetric(fn)
        w0, v, w1 = (torch.tensor(spec[k], dtype=torch.float64) for k in ("w0", "v", "w1"))
        space = WeightSpace(metric, expmap_steps=steps_list[0])
        space.expmap(w0, v)  # warm-up: first calls of torch.func transforms are slow
        for steps in steps_list:
            space = WeightSpace(metric, expmap_steps=steps)
            res = {"d": d, "steps": steps}
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                e = space.expmap(w0, v)
                times.append(time.perf_counter() - t0)
            res["exp_seconds"] = min(times)
            res["exp_error"] = float((e - w1).norm())
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                path = shoot(metric, w0, w1, steps=steps)
                times.append(time.perf_counter() - t0)
            res["log_seconds"] = min(times)
            res["log_error"] = float((path.v0 - v).norm())
            res["log_converged"] = path.converged
            res["log_newton_iterations"] = path.iterations
            res["log_residual"] = path.residual
            out.append(res)
            print(json.dumps(res), flush=True)
    return out


def plot(rows: list[dict], file: Path) -> None:
    """Time and error of exp and log against d, riemfip (each RK4 step count) and geomstats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, op in zip(axes, ("exp", "log"), strict=True):
        for steps in sorted({r["steps"] for r in rows}):
            sel = [r for r in rows if r["steps"] == steps]
            ax.loglog(
                [r["d"] for r in sel],
                [r["riemfip"][f"{op}_seconds"] for r in sel],
                "o-",
                label=f"riemfip RK4 {steps} steps",
            )
        gs_rows = {r["d"]: r["geomstats"] for r in rows if r["geomstats"]}
        if gs_rows:
            ds = sorted(gs_rows)
            ax.loglog(ds, [gs_rows[d][f"{op}_seconds"] for d in ds], "s--k", label="geomstats 2.8")
        ax.set_xlabel("d")
        ax.set_ylabel("seconds")
        ax.set_title(f"{op} (tanh immersion R^d -> R^(2d+4))")
        ax.legend(fontsize=8)
    fig.savefig(file, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/gs-venv"))
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[4, 8, 32], help="riemfip RK4 steps"
    )
    parser.add_argument("--skip-geomstats", action="store_true")
    parser.add_argument(
        "--geomstats-json", type=Path, help="reuse the geomstats rows of an earlier results file"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "geodesic_vs_geomstats.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out")
    parser.add_argument("--geomstats-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return 0
    if args.geomstats_worker:
        geomstats_worker(args.geomstats_worker, args.repeat)
        return 0

    specs = [problem(d) for d in args.dims]
    spec_file = args.out.with_suffix(".problems.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(specs))
    ours = riemfip_side(specs, args.repeat, args.steps)
    theirs: list[dict] = []
    note = ""
    if args.geomstats_json:
        earlier = json.loads(args.geomstats_json.read_text())["rows"]
        theirs = list({r["d"]: r["geomstats"] for r in earlier if r["geomstats"]}.values())
    elif not args.skip_geomstats:
        try:
            py = ensure_venv(args.venv)
            env = dict(os.environ, GEOMSTATS_BACKEND="autograd", OMP_NUM_THREADS="1")
            env.pop("PYTHONPATH", None)
            proc = subprocess.run(
                [
                    str(py),
                    __file__,
                    "--geomstats-worker",
                    str(spec_file),
                    "--repeat",
                    str(args.repeat),
                ],
                stdout=subprocess.PIPE,  # progress lines go to stderr, shown as they come
                text=True,
                env=env,
                check=True,
            )
            theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        except (subprocess.CalledProcessError, OSError) as exc:
            note = f"geomstats side failed: {exc}; compare with design.md section 3"
            print(note, file=sys.stderr)
    rows = []
    for o in ours:
        t = next((x for x in theirs if x["d"] == o["d"]), None)
        row = {"d": o["d"], "steps": o["steps"], "riemfip": o, "geomstats": t}
        if t:
            row["exp_speedup"] = t["exp_seconds"] / o["exp_seconds"]
            row["log_speedup"] = t["log_seconds"] / o["log_seconds"]
        rows.append(row)
    load = os.getloadavg()[0]
    args.out.write_text(
        json.dumps({"rows": rows, "note": note, "threads": 1, "load_average_1min": load}, indent=2)
    )
    plot(rows, args.out.with_suffix(".png"))
    print(
        f"{'d':>3} {'rk4':>4} | {'exp s (rf / gs)':>20} | {'exp err (rf / gs)':>20} | {'log s (rf / gs)':>20} "
        f"| {'log err (rf / gs)':>20} | speedup exp, log"
    )
    for r in rows:
        o, t = r["riemfip"], r["geomstats"] or {}
        print(
            f"{r['d']:>3} {r['steps']:>4} | {o['exp_seconds']:8.3f} / {t.get('exp_seconds', float('nan')):8.3f} "
            f"| {o['exp_error']:8.1e} / {t.get('exp_error', float('nan')):8.1e} "
            f"| {o['log_seconds']:8.3f} / {t.get('log_seconds', float('nan')):8.3f} "
            f"| {o['log_error']:8.1e} / {t.get('log_error', float('nan')):8.1e} "
            f"| {r.get('exp_speedup', float('nan')):6.1f}x, {r.get('log_speedup', float('nan')):6.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
