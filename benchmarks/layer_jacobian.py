r"""Cost of building the output-space Gram matrix :math:`K = JJ^\top` of a CNN: the factored
Jacobian (:mod:`manifolds.layer_jacobian`) against the generic autograd route.

For each model and number of anchor samples :math:`N` (``m = 10 N`` embedded outputs,
softmax-Fisher output metric, float32, random weights and inputs) this times, with one
thread and CPU time, after one untimed call of each route (first calls of batched
backward and forward-mode AD set up caches):

``factored``
    :func:`manifolds.layer_jacobian.module_jacobian` (one forward pass with hooks, one
    backward pass batched over the 10 outputs) then :meth:`FactoredJacobian.gram`: what
    ``PullbackMetric.output_gram`` now does before its eigendecomposition (median of
    ``--repeats``);
``generic``
    the route ``output_gram`` takes for any other network: :math:`m` reverse-mode products
    :math:`J^\top e_i` and :math:`m` forward-mode products :math:`J(J^\top e_i)` under
    :func:`torch.func.vmap`, as the generic route (:class:`manifolds.AutogradJacobian`) does, but
    :math:`\min(64, \lfloor 400/N \rfloor)` columns at a time instead of its 64 (memory: each
    column runs the whole batch). Where ``--generic-columns`` is below :math:`m`, only that many columns are
    built and the time is scaled by :math:`m / \text{columns}` (marked ``extrapolated``);
``eigh``
    :func:`torch.linalg.eigh` of :math:`K` (values and vectors), which :class:`manifolds.OutputGram` then
    pays on either route;
``kfac refresh``, ``kfac solve``
    for comparison, the Kronecker-factored approximation
    (:class:`manifolds.KroneckerMetric`): the factored Jacobian's hooks, the factors and
    their eigendecompositions (one refresh, median of ``--repeats``); then one
    :meth:`~manifolds.KroneckerMetric.solve` with the factors in hand (median of 5).

Agreement: where the generic route built all of :math:`K`, the largest difference of the
two spectra relative to the largest eigenvalue; otherwise the relative difference of the
columns it built. Results go to ``benchmarks/results/layer_jacobian.json``.

Usage::

    python benchmarks/layer_jacobian.py [--samples 25,100] [--models lenet5,vgg]
        [--generic-columns 250] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from manifolds import KroneckerMetric, PullbackMetric
from manifolds.layer_jacobian import module_jacobian
from riemfip import networks


def lenet5() -> tuple[nn.Module, tuple[int, ...]]:
    """LeNet-5 on 1x28x28 (:func:`riemfip.networks.lenet5`)."""
    return networks.lenet5(), (1, 28, 28)


def vgg() -> tuple[nn.Module, tuple[int, ...]]:
    """A small VGG with BatchNorm on 3x32x32: [32, 32, M, 64, 64, M, 128, 128, M], fc 10."""
    layers, channels = [], 3
    for width in (32, 32, "M", 64, 64, "M", 128, 128, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
    return net.eval(), (3, 32, 32)


MODELS = {"lenet5": lenet5, "vgg": vgg}


def timed(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def generic_columns(metric: PullbackMetric, w: torch.Tensor, columns: int, chunk: int):
    """The first ``columns`` columns of K by m VJPs and m JVPs (the generic route's)."""
    e, vjp_fn = vjp(metric.embed, w)
    eye = torch.eye(e.numel(), dtype=e.dtype)
    cols = []
    for start in range(0, columns, chunk):
        rows = vmap(lambda u: vjp_fn(u)[0])(eye[start : min(columns, start + chunk)])
        cols.append(vmap(lambda r: jvp(metric.embed, (w,), (r,))[1])(rows))
    return torch.cat(cols)


def kfac_times(metric: PullbackMetric, w: torch.Tensor, repeats: int) -> tuple[float, float]:
    """CPU seconds of a KroneckerMetric refresh (hooks, factors, eigendecompositions) and of
    one solve after it."""
    b = torch.randn(w.numel())

    def refresh():
        jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
        kfac = KroneckerMetric.from_jacobian(jac)
        kfac.solve(b, 1.0)  # the first solve eigendecomposes every factor
        return kfac

    times = [timed(refresh)[1] for _ in range(repeats)]
    kfac = refresh()
    lam = 0.1 * kfac.trace() / kfac.dim
    solves = [timed(lambda: kfac.solve(b, lam))[1] for _ in range(5)]
    return statistics.median(times), statistics.median(solves)


def run_case(model: str, samples: int, max_columns: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net, shape = MODELS[model]()
    x = torch.randn(samples, *shape)
    metric = PullbackMetric.from_module(net, x, output_metric="fisher")
    w = metric.module.flatten()
    m = 10 * samples

    def factored():
        jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
        return jac.gram()

    columns = min(m, max_columns)
    chunk = max(1, min(64, 400 // samples))
    with torch.no_grad():
        factored()  # warm-up: first calls of vmap'd backward and forward-mode AD set up caches
        generic_columns(metric, w, chunk, chunk)
        times = []
        for _ in range(repeats):
            gram, seconds = timed(factored)
            times.append(seconds)
        (evals, _), t_eigh = timed(lambda: torch.linalg.eigh(gram))
        cols, t_generic = timed(lambda: generic_columns(metric, w, columns, chunk))
    t_refresh, t_solve = kfac_times(metric, w, repeats)
    row = {
        "model": model,
        "weights": w.numel(),
        "samples": samples,
        "m": m,
        "factored_s": statistics.median(times),
        "generic_s": t_generic * m / columns,
        "generic_extrapolated": columns < m,
        "generic_columns": columns,
        "eigh_s": t_eigh,
        "kfac_refresh_s": t_refresh,
        "kfac_solve_s": t_solve,
    }
    if columns == m:
        other = torch.linalg.eigvalsh(0.5 * (cols + cols.T))
        row["spectrum_rel_diff"] = float((evals - other).abs().max() / evals.abs().max())
    else:
        row["columns_rel_diff"] = float((cols - gram[:columns]).norm() / cols.norm())
    row["speedup"] = row["generic_s"] / row["factored_s"]
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = [
        "| model | weights | N | m | factored (s) | generic (s) | speed-up | eigh (s) | agreement "
        "| kfac refresh (s) | kfac solve (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        star = " (extrapolated)" if r["generic_extrapolated"] else ""
        agree = r.get("spectrum_rel_diff", r.get("columns_rel_diff"))
        lines.append(
            f"| {r['model']} | {r['weights']:,} | {r['samples']} | {r['m']} | "
            f"{r['factored_s']:.3g} | {r['generic_s']:.3g}{star} | {r['speedup']:.0f}x | "
            f"{r['eigh_s']:.3g} | {agree:.1e} | {r['kfac_refresh_s']:.3g} | "
            f"{r['kfac_solve_s']:.3g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", default="25,100")
    parser.add_argument("--models", default="lenet5,vgg")
    parser.add_argument("--generic-columns", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/layer_jacobian.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        run_case(model, int(n), args.generic_columns, args.repeats)
        for model in args.models.split(",")
        for n in args.samples.split(",")
    ]
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "clock": "process_time (CPU)",
        "dtype": "float32",
        "output_metric": "fisher",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
