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
install "geomstats==2.8.*" "numpy<2.4" autograd``, plus torch pinned to riemfip's
for the ``pytorch`` backend), one subprocess per operation and dimension with a
time limit (``--geomstats-timeout``; a run that does not finish is recorded as a
lower bound); it is never a riemfip dependency. Its backend is ``pytorch`` by
default (``--backend autograd`` for the other one that can differentiate; pytorch
measured 10x faster at d = 16: exp 13.2 s against 130 s), its solvers the defaults
of ``PullbackMetric``: ``ExpODESolver`` with 100 explicit Euler steps and
``LogShootingSolver`` (scipy L-BFGS-B on :math:`\|\exp(v) - w_1\|^2` with autodiff
gradients). riemfip: ``WeightSpace.expmap`` and ``manifolds.geodesic.shoot``
(exact-Jacobian Newton), float64, one thread, in two settings: fixed RK4 steps,
each of ``--steps`` (default 4, 8, 32: the geomstats error is matched or beaten by
far at every one of them) for both exp and log (shooting on the same steps), and
the adaptive Dormand–Prince flow at each of ``--tols`` (default 1e-6, 1e-8) for
exp only (shooting always runs on fixed steps). riemfip runs first, then
geomstats, never both at once. Times are the best of ``--repeat`` runs after one
warm-up call (riemfip; ``--clock cpu`` for process CPU time instead of wall time)
and of ``--gs-repeat`` runs (geomstats, default 1: its d = 16 log takes minutes).

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
def geomstats_worker(spec_file: str, d: int, op: str, repeat: int) -> None:
    """Runs inside the geomstats venv: one operation (``exp`` or ``log``) at one ``d``;
    prints ``{"d", "op", "seconds", "error", "backend"}`` as JSON on stdout."""
    import geomstats.backend as gs
    from geomstats.geometry.base import ImmersedSet
    from geomstats.geometry.euclidean import Euclidean

    spec = next(s for s in json.loads(Path(spec_file).read_text()) if s["d"] == d)
    a, c = gs.array(spec["A"]), gs.array(spec["c"])

    class Tanh(ImmersedSet):
        def _define_embedding_space(self):
            return Euclidean(2 * d + 4)

        def immersion(self, point):
            return gs.concatenate(
                [point, gs.tanh(gs.einsum("ij,...j->...i", a, point) + c)], axis=-1
            )

    space = Tanh(d)
    w0, v, w1 = gs.array(spec["w0"]), gs.array(spec["v"]), gs.array(spec["w1"])
    if op == "exp":
        run, target = (lambda: space.metric.exp(v, w0)), spec["w1"]
    else:
        run, target = (lambda: space.metric.log(w1, w0)), spec["v"]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    error = float(np.linalg.norm(np.asarray(out, dtype=float) - np.asarray(target)))
    res = {"d": d, "op": op, "seconds": min(times), "error": error}
    res["backend"] = os.environ.get("GEOMSTATS_BACKEND")
    print(json.dumps(res))


def ensure_venv(venv: Path, backend: str) -> Path:
    """Create the throwaway geomstats environment if it is not there; return its python.

    The ``pytorch`` backend gets torch pinned to the version riemfip is tested with
    (an unpinned install would pull the newest torch with its CUDA packages)."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "geomstats==2.8.*",
                "numpy<2.4",
                "autograd",
            ],
            check=True,
        )
    if backend == "pytorch":
        probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
        if probe.returncode:
            import torch

            pin = f"torch=={torch.__version__.split('+')[0]}"
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", pin], check=True)
    return py


def geomstats_side(args, spec_file: Path) -> tuple[list[dict], str]:
    """Each (d, op) in its own subprocess under ``--geomstats-timeout``: a run that does not
    finish is recorded with ``<op>_timed_out_after`` (a lower bound on its time) instead of
    taking the whole benchmark down with it."""
    py = ensure_venv(args.venv, args.backend)
    env = dict(os.environ, GEOMSTATS_BACKEND=args.backend, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    rows = []
    for d in args.dims:
        row: dict = {"d": d, "backend": args.backend}
        for op in ("exp", "log"):
            cmd = [str(py), __file__, "--geomstats-worker", str(spec_file)]
            cmd += ["--worker-d", str(d), "--worker-op", op, "--repeat", str(args.gs_repeat)]
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    env=env,
                    check=True,
                    timeout=args.geomstats_timeout,
                )
            except subprocess.TimeoutExpired:
                row[f"{op}_seconds"] = None
                row[f"{op}_error"] = None
                row[f"{op}_timed_out_after"] = args.geomstats_timeout
                print(f"geomstats d={d} {op}: no result in {args.geomstats_timeout} s", flush=True)
                continue
            except subprocess.CalledProcessError as exc:
                return rows, f"geomstats side failed at d={d} {op}: {exc}"
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"{op}_seconds"], row[f"{op}_error"] = res["seconds"], res["error"]
            print(
                f"geomstats d={d} {op}: {res['seconds']:.3f} s, error {res['error']:.2e}",
                flush=True,
            )
        rows.append(row)
    return rows, ""


# ----------------------------------------------------------------- riemfip side
def riemfip_side(
    specs: list[dict], repeat: int, steps_list: list[int], tols: list[float], clock: str
) -> list[dict]:
    """exp (and, on fixed steps, log) at each setting: ``{"setting": "rk4 8"}`` for 8 fixed RK4
    steps, ``{"setting": "dopri5 1e-08"}`` for the adaptive flow at tol 1e-8."""
    import torch

    from manifolds import PullbackMetric, WeightSpace
    from manifolds.geodesic import shoot

    torch.set_num_threads(1)
    now = time.process_time if clock == "cpu" else time.perf_counter

    def best(fn, *args, **kwargs):
        times = []
        for _ in range(repeat):
            t0 = now()
            out = fn(*args, **kwargs)
            times.append(now() - t0)
        return min(times), out

    settings = [("rk4", s) for s in steps_list] + [("dopri5", t) for t in tols]
    out = []
    for spec in specs:
        d = spec["d"]
        a = torch.tensor(spec["A"], dtype=torch.float64)
        c = torch.tensor(spec["c"], dtype=torch.float64)

        def fn(w, a=a, c=c):
            return torch.cat([w, torch.tanh(a @ w + c)])

        metric = PullbackMetric(fn)
        w0, v, w1 = (torch.tensor(spec[k], dtype=torch.float64) for k in ("w0", "v", "w1"))
        WeightSpace(metric, expmap_steps=4).expmap(w0, v)  # warm-up: first torch.func calls
        for scheme, value in settings:
            fixed = scheme == "rk4"
            space = WeightSpace(metric, **{"expmap_steps" if fixed else "expmap_tol": value})
            res = {"d": d, "setting": f"{scheme} {value:g}", "steps": value if fixed else None}
            res["exp_seconds"], e = best(space.geodesic, w0, v)
            res["exp_error"] = float((e.end - w1).norm())
            res["exp_accelerations"] = e.solves
            if fixed:
                res["log_seconds"], path = best(shoot, metric, w0, w1, steps=value)
                res["log_error"] = float((path.v0 - v).norm())
                res["log_converged"] = path.converged
                res["log_newton_iterations"] = path.iterations
                res["log_residual"] = path.residual
            out.append(res)
            print(json.dumps(res), flush=True)
    return out


def plot(rows: list[dict], file: Path) -> None:
    """Time and error of exp and log against d, riemfip (each setting) and geomstats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, op in zip(axes, ("exp", "log"), strict=True):
        for setting in dict.fromkeys(_setting(r) for r in rows):
            sel = [r for r in rows if _setting(r) == setting and f"{op}_seconds" in r["riemfip"]]
            if sel:
                ax.loglog(
                    [r["d"] for r in sel],
                    [r["riemfip"][f"{op}_seconds"] for r in sel],
                    "o-",
                    label=f"riemfip {setting}",
                )
        gs_rows = {r["d"]: r["geomstats"] for r in rows if r["geomstats"]}
        if gs_rows:
            ds = sorted(gs_rows)
            done = [d for d in ds if gs_rows[d].get(f"{op}_seconds") is not None]
            ax.loglog(
                done,
                [gs_rows[d][f"{op}_seconds"] for d in done],
                "s--k",
                label=f"geomstats 2.8 ({gs_rows[ds[0]].get('backend', 'autograd')} backend)",
            )
            late = [d for d in ds if gs_rows[d].get(f"{op}_timed_out_after")]
            if late:
                ax.loglog(
                    late,
                    [gs_rows[d][f"{op}_timed_out_after"] for d in late],
                    "^k",
                    label="geomstats: no result by then",
                )
        dims = sorted({r["d"] for r in rows})
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
        ax.set_xlabel("d")
        ax.set_ylabel("seconds")
        ax.set_title(f"{op} (tanh immersion R^d -> R^(2d+4))")
        ax.legend(fontsize=8)
    fig.savefig(file, dpi=110)


def _setting(row: dict) -> str:
    """The riemfip setting of a row (rows written before adaptive steps have only ``steps``)."""
    return row.get("setting") or row["riemfip"].get("setting") or f"rk4 {row['steps']}"


def _speedups(ours: dict, theirs: dict) -> dict:
    """geomstats time / riemfip time per op; a lower bound where geomstats timed out."""
    out = {}
    for op in ("exp", "log"):
        if f"{op}_seconds" not in ours:
            continue
        if theirs.get(f"{op}_seconds") is not None:
            out[f"{op}_speedup"] = theirs[f"{op}_seconds"] / ours[f"{op}_seconds"]
        elif theirs.get(f"{op}_timed_out_after"):
            out[f"{op}_speedup_at_least"] = theirs[f"{op}_timed_out_after"] / ours[f"{op}_seconds"]
    return out


def _fmt_speedup(row: dict, op: str) -> str:
    if f"{op}_speedup" in row:
        return f"{row[f'{op}_speedup']:.0f}x"
    if f"{op}_speedup_at_least" in row:
        return f">{row[f'{op}_speedup_at_least']:.0f}x"
    return "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=3, help="riemfip repeats (best of)")
    parser.add_argument("--gs-repeat", type=int, default=1, help="geomstats repeats (best of)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/gs-venv"))
    parser.add_argument(
        "--backend",
        choices=["pytorch", "autograd"],
        default="pytorch",
        help="geomstats backend (pytorch: measured 10x faster than autograd at d=16)",
    )
    parser.add_argument(
        "--geomstats-timeout",
        type=float,
        default=900.0,
        help="seconds allowed to each geomstats exp or log (a lower bound is recorded beyond)",
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[4, 8, 32], help="riemfip fixed RK4 steps"
    )
    parser.add_argument(
        "--tols", type=float, nargs="*", default=[1e-6, 1e-8], help="riemfip adaptive exp tols"
    )
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="riemfip timer (cpu: CPU time)"
    )
    parser.add_argument("--skip-geomstats", action="store_true")
    parser.add_argument(
        "--geomstats-json", type=Path, help="reuse the geomstats rows of an earlier results file"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "geodesic_vs_geomstats.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out")
    parser.add_argument("--geomstats-worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--worker-d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-op", choices=["exp", "log"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return 0
    if args.geomstats_worker:
        geomstats_worker(args.geomstats_worker, args.worker_d, args.worker_op, args.repeat)
        return 0

    specs = [problem(d) for d in args.dims]
    spec_file = args.out.with_suffix(".problems.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(specs))
    # one side at a time, so that neither is timed while the other loads the machine
    ours = riemfip_side(specs, args.repeat, args.steps, args.tols, args.clock)
    load = os.getloadavg()[0]
    theirs: list[dict] = []
    note = ""
    if args.geomstats_json:
        earlier = json.loads(args.geomstats_json.read_text())["rows"]
        theirs = list({r["d"]: r["geomstats"] for r in earlier if r["geomstats"]}.values())
    elif not args.skip_geomstats:
        try:
            theirs, note = geomstats_side(args, spec_file)
        except (subprocess.CalledProcessError, OSError) as exc:
            note = f"geomstats side failed: {exc}; compare with design.md section 3"
        if note:
            print(note, file=sys.stderr)
    rows = []
    for o in ours:
        t = next((x for x in theirs if x["d"] == o["d"]), None)
        row = {"d": o["d"], "setting": o["setting"], "riemfip": o, "geomstats": t}
        row.update(_speedups(o, t) if t else {})
        rows.append(row)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "note": note,
                "threads": 1,
                "clock": args.clock,
                "load_average_1min_riemfip": load,
            },
            indent=2,
        )
    )
    plot(rows, args.out.with_suffix(".png"))
    print(
        f"{'d':>3} {'setting':>12} | {'exp s (rf / gs)':>20} | {'exp err (rf / gs)':>20} "
        f"| {'log s (rf / gs)':>20} | {'log err (rf / gs)':>20} | speedup exp, log"
    )
    nan = float("nan")
    for r in rows:
        o, t = r["riemfip"], r["geomstats"] or {}
        print(
            f"{r['d']:>3} {_setting(r):>12} "
            f"| {o['exp_seconds']:8.3f} / {t.get('exp_seconds') or nan:8.3f} "
            f"| {o['exp_error']:8.1e} / {t.get('exp_error') or nan:8.1e} "
            f"| {o.get('log_seconds', nan):8.3f} / {t.get('log_seconds') or nan:8.3f} "
            f"| {o.get('log_error', nan):8.1e} / {t.get('log_error') or nan:8.1e} "
            f"| {_fmt_speedup(r, 'exp')}, {_fmt_speedup(r, 'log')}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
