r"""Cost of the metric-vector product :math:`g(w)v = J^\top G J v / N + \lambda v`.

For each model and output metric this times, interleaved in one run on the same
batch, float32:

``reference``
    forward + backward of a cross-entropy loss with respect to all weights, as a
    training step does it (``loss_fn(model(x), y).backward()`` after the
    gradients were set to ``None``); every ratio is relative to this.
``loss via flat w``
    the same loss through :class:`manifolds.FlatModule` (``functional_call`` on
    views of one flat weight vector, gradient with respect to that vector): what
    the flat-vector interface costs before any geometry.
``matvec``
    ``PullbackMetric.from_module(model, x, output_metric=...).matvec(w, v)``,
    the public call: input checks, then one dual-number forward pass and one
    backward pass.
``matvec, no input checks``
    ``metric._matvec(w, v)``: the product alone.
``input checks``
    ``metric.check_point(w)`` and ``metric.check_tangent("v", v, w)``: what
    ``matvec`` adds to ``_matvec``.
``finite check by sum``
    not in the library: ``isfinite(w.sum())`` and ``isfinite(v.sum())``, what a
    fast path for the NaN/Inf part of the input checks would cost (a sum is
    finite iff every term is, unless it overflows, when the full check would run).
``stock forward-AD``
    the previous ``_matvec``: the same dual forward and backward with PyTorch's
    own forward-mode rules everywhere, including the first layer, whose data
    operand has no tangent (PyTorch then multiplies by a materialised zero).
``torch.func jvp+vjp``
    :func:`torch.func.jvp` then :func:`torch.func.vjp`: two forward passes.
``double backward``
    :math:`Jv = \partial_u \langle J^\top u, v\rangle` (a backward with
    ``create_graph=True`` and its backward), then a third backward for
    :math:`J^\top (Jv)`.
``inner``
    ``metric.inner(w, v)``: one JVP (:math:`\|Jv\|^2 + \lambda\|v\|^2`).
``CG iteration``
    ``metric.solve(w, b, method="cg", maxiter=k, tol=0)`` divided by ``k``: one
    product plus CG's vector updates, with the solve's fixed cost spread over
    ``k``.

The ratio of a row is the median over repeats of ``time(row) / time(reference)``
within the same repeat (rows run in a fresh random order each repeat). The
``rel diff`` column checks that the variants compute the same thing, as
``||a - b|| / ||b||``: every product against ``matvec`` (``matvec`` against a
second call of itself), ``inner(v, v)`` against :math:`\|Jv\|^2 + \lambda\|v\|^2`
with :math:`Jv` from a plain dual forward pass, and the flat-weight loss
gradient against the reference's. Results go to ``benchmarks/results/matvec.json``.

Usage::

    python benchmarks/matvec.py [--repeats N] [--vgg-repeats M] [--out FILE]
        [--models mlp,vgg11] [--metrics euclidean,fisher] [--threads T]
        [--clock wall|cpu] [--damping L] [--cg-iters K]
    python benchmarks/matvec.py --summary RESULT.json [RESULT2.json ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message=".*jit.script.*", category=FutureWarning)  # geoopt import
from manifolds import PullbackMetric  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "matvec.json"


# ------------------------------------------------------------------ models
def mlp() -> tuple[nn.Module, torch.Tensor]:
    """MLP 784-300-100-10 (ReLU), batch of 256 MNIST-shaped inputs."""
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    return net, torch.randn(256, 1, 28, 28)


def vgg11() -> tuple[nn.Module, torch.Tensor]:
    """torchvision VGG11 (10 classes, random weights), batch of 32 inputs 3x32x32."""
    import torchvision

    return torchvision.models.vgg11(num_classes=10), torch.randn(32, 3, 32, 32)


MODELS = {"mlp": mlp, "vgg11": vgg11}
MODEL_LABELS = {"mlp": "MLP 784-300-100-10, batch 256", "vgg11": "VGG11 3x32x32, batch 32"}


# ------------------------------------------------------------------ the variants
def stock_forward_ad(metric: PullbackMetric, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The previous ``_matvec``: dual forward with PyTorch's rules everywhere, then backward."""
    with torch.enable_grad():
        wp = w.detach().requires_grad_(True)
        with fwAD.dual_level():
            out = metric.embed(fwAD.make_dual(wp, v))
            primal, tangent = fwAD.unpack_dual(out)
        (gv,) = torch.autograd.grad(primal, wp, tangent.detach())
    return gv.add_(v, alpha=metric.damping)


def func_jvp_vjp(metric: PullbackMetric, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`torch.func.jvp` for :math:`Jv`, then :func:`torch.func.vjp` for :math:`J^\top Jv`."""
    jv = jvp(metric.embed, (w,), (v,))[1]
    gv = vjp(metric.embed, w)[1](jv)[0]
    return gv.add_(v, alpha=metric.damping)


def double_backward(metric: PullbackMetric, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""The double-backward trick: :math:`Jv = \partial_u (J^\top u)\cdot v`, then :math:`J^\top Jv`."""
    with torch.enable_grad():
        wp = w.detach().requires_grad_(True)
        e = metric.embed(wp)
        u = torch.zeros_like(e, requires_grad=True)
        (jtu,) = torch.autograd.grad(e, wp, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
        (gv,) = torch.autograd.grad(e, wp, jv)
    return gv.add_(v, alpha=metric.damping)


@dataclass
class Row:
    """One timed quantity: its name, the call, and (for products) the vector it returns."""

    name: str
    call: Callable[[], object]
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    rel_diff: float | None = None
    per_call: int = 1  # the call does this many units of work (CG iterations)


def build_rows(
    model: nn.Module,
    x: torch.Tensor,
    output_metric: str,
    damping: float,
    cg_iters: int,
) -> tuple[list[Row], dict[str, float]]:
    """The rows for one model and output metric, and the agreement of the products."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    params = list(model.parameters())
    metric = PullbackMetric.from_module(
        model, x, output_metric=output_metric, damping=damping, on_failure="ignore"
    )
    w = metric.module.flatten()
    v = torch.randn(w.shape, generator=gen)
    b = torch.randn(w.shape, generator=gen)

    def reference():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    def flat_loss():
        wp = w.detach().requires_grad_(True)
        loss = F.cross_entropy(metric.module(wp, x, train=False), y)
        return torch.autograd.grad(loss, wp)[0]

    def checks():
        metric.check_tangent("v", v, metric.check_point(w))

    def sum_checks():
        # A sum is finite iff every term is, barring overflow (which would fall back to
        # the full check): one read of each vector instead of isfinite's temporaries.
        return bool(torch.isfinite(w.sum())) and bool(torch.isfinite(v.sum()))

    def cg_iteration():
        metric.solve(w, b, method="cg", tol=0.0, maxiter=cg_iters)

    products = {
        "matvec": lambda: metric.matvec(w, v),
        "matvec, no input checks": lambda: metric._matvec(w, v),
        "stock forward-AD": lambda: stock_forward_ad(metric, w, v),
        "torch.func jvp+vjp": lambda: func_jvp_vjp(metric, w, v),
        "double backward": lambda: double_backward(metric, w, v),
    }
    agreement = {}
    with torch.no_grad():
        gv = products["matvec"]()
        scale = float(torch.linalg.vector_norm(gv))
        for name, call in products.items():
            agreement[name] = float(torch.linalg.vector_norm(call() - gv)) / scale
        # inner(v, v) = |Jv|^2 + lambda |v|^2 against Jv from a plain dual forward pass.
        with fwAD.dual_level():
            jv = fwAD.unpack_dual(metric.embed(fwAD.make_dual(w, v))).tangent.double()
        expected = float(jv.square().sum() + damping * v.double().square().sum())
        agreement["inner"] = abs(float(metric.inner(w, v)) - expected) / expected
        del jv
    g_flat = flat_loss()
    reference()
    g_ref = torch.cat([p.grad.reshape(-1) for p in params])
    agreement["loss via flat w"] = float(torch.linalg.vector_norm(g_flat - g_ref)) / float(
        torch.linalg.vector_norm(g_ref)
    )
    del gv, g_flat, g_ref

    rows = [Row("reference", reference), Row("loss via flat w", flat_loss)]
    rows += [Row(name, call) for name, call in products.items()]
    rows += [
        Row("input checks", checks),
        Row("finite check by sum", sum_checks),
        Row("inner", lambda: metric.inner(w, v)),
        Row(f"CG iteration (of {cg_iters})", cg_iteration, per_call=cg_iters),
    ]
    for row in rows:
        row.rel_diff = agreement.get(row.name)
    return rows, agreement


# ------------------------------------------------------------------ timing
def measure(rows: list[Row], repeats: int, warmup: int, clock: Callable[[], float], seed: int):
    """Time every row ``repeats`` times, in a fresh random order each repeat."""
    order = list(rows)
    for _ in range(warmup):
        for row in order:
            row.call()
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for row in order:
            start = clock()
            row.call()
            row.times.append(clock() - start)
    ref = rows[0].times
    for row in rows:
        if row.per_call != 1:
            row.times = [t / row.per_call for t in row.times]
        row.ratios = [t / r for t, r in zip(row.times, ref, strict=True)]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def machine_info(threads: int, clock: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "clock": clock,
        # allocator and threading settings that change these figures (see README)
        "environment": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("MALLOC_", "OMP_", "MKL_"))
            or k in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            info["processor"] = names[0]
    except OSError:
        pass
    return info


def summary(paths: list[Path]) -> str:
    """A markdown table of median ratios, one column per model and output metric,
    the runs in ``paths`` side by side as ``a / b``."""
    runs = [json.loads(Path(p).read_text())["rows"] for p in paths]
    columns = list(dict.fromkeys((r["model"], r["output_metric"]) for r in runs[0]))
    names = list(dict.fromkeys(r["row"] for r in runs[0]))
    ratio = [
        {(r["model"], r["output_metric"], r["row"]): r["ratio_median"] for r in run} for run in runs
    ]
    head = "| row | " + " | ".join(f"{m} {o}" for m, o in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = [
            " / ".join(f"{r[(m, o, name)]:.2f}" if (m, o, name) in r else "-" for r in ratio)
            for m, o in columns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="repeats for the MLP (40)")
    parser.add_argument("--vgg-repeats", type=int, default=3, help="repeats for VGG11 (3)")
    parser.add_argument("--models", default="mlp,vgg11", help="comma list of mlp, vgg11")
    parser.add_argument("--metrics", default="euclidean,fisher", help="comma list")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: process CPU time (steadier on a shared "
        "machine, meaningful with --threads 1)",
    )
    parser.add_argument("--damping", type=float, default=1e-3, help="lambda (1e-3)")
    parser.add_argument("--cg-iters", type=int, default=2, help="CG iterations per timed solve")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    parser.add_argument(
        "--summary",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print a markdown table of the ratios in these result files and exit",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return {}

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    result = {
        "machine": machine_info(torch.get_num_threads(), args.clock),
        "settings": {
            "dtype": "float32",
            "damping": args.damping,
            "cg_iters": args.cg_iters,
            "repeats": {"mlp": args.repeats, "vgg11": args.vgg_repeats},
            "load_average_start": os.getloadavg(),
        },
        "rows": [],
    }
    header = f"{'model':7s} {'metric':9s} {'row':26s} {'median ms':>10s} {'ratio':>6s} {'IQR':>12s} {'rel diff':>9s}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(header)
    print("-" * len(header))
    for model_name in args.models.split(","):
        repeats = args.repeats if model_name == "mlp" else args.vgg_repeats
        for output_metric in args.metrics.split(","):
            torch.manual_seed(0)
            model, x = MODELS[model_name]()
            model.eval()  # the metric sees eval mode; the reference differentiates the same function
            rows, _ = build_rows(model, x, output_metric, args.damping, args.cg_iters)
            measure(rows, repeats, warmup=1 if model_name == "vgg11" else 3, clock=clock, seed=0)
            for row in rows:
                q1, q3 = quartiles(row.ratios)
                rec = {
                    "model": model_name,
                    "model_label": MODEL_LABELS[model_name],
                    "output_metric": output_metric,
                    "row": row.name,
                    "median_s": statistics.median(row.times),
                    "ratio_median": statistics.median(row.ratios),
                    "ratio_q1": q1,
                    "ratio_q3": q3,
                    "rel_diff": row.rel_diff,
                    "repeats": repeats,
                }
                result["rows"].append(rec)
                diff = "" if row.rel_diff is None else f"{row.rel_diff:9.1e}"
                print(
                    f"{model_name:7s} {output_metric:9s} {row.name:26s} "
                    f"{1e3 * rec['median_s']:10.2f} {rec['ratio_median']:6.2f} "
                    f"{q1:5.2f}-{q3:<6.2f} {diff}",
                    flush=True,
                )
            del model, x, rows
    result["settings"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
