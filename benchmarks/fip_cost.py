r"""Cost of a whole FIP (or GPM) step against a whole SGD step, same model and batch.

A *step* is what a training loop pays per batch::

    opt.zero_grad(); F.cross_entropy(net(x), y).backward(); opt.step()

The optimizers, each built from its public constructor only:

``fip``
    ``riemfip.optim.FIP(net.parameters(), model=net, anchor_inputs=x_old)``, every
    other option at its default (so this measures whatever FIP is current).
``fip-sketch``
    The same with ``anchors=AnchorSampling(outputs=2)``: two random output directions per
    anchor per step instead of all of them (the default since issue 9's growth rule).
``fip-previous``
    The defaults before that: ``anchors=AnchorSampling(outputs=None), guard=DriftGuard()``
    (every output of each anchor, no growth rule).
``fip-exact2``
    The defaults with ``curvature=Exact(refresh=2)``: the exact anchor metric of a step's
    anchors kept for the next step too.
``fip-kfac``, ``fip-kfac-lazy``, ``fip-kfac-ekfac-r5``, ``fip-kfac-p2-r20``, ...
    The same with ``curvature=Kronecker(...)``: the Kronecker-factored anchor metric of a
    step's anchors, refreshed every 10 steps (``-rN``: every N) with the per-step
    pull-back (``-pK``: every K steps; ``-lazy``: ``pull_every=None``, the anchors' outputs
    pulled back only on refresh steps and by the all-anchor pull-back), KFAC's eigenvalues (``-ekfac``: EKFAC's,
    ``corrected=True``); :mod:`riemfip.optim.kronecker_direction`.
``gpm``
    :class:`riemfip.applications.gpm.ProjectedSGD` with ``lr=0.05`` over the bases that
    :class:`~riemfip.applications.gpm.BasisMemory` builds from the same stored inputs
    ``x_old`` at GPM's first-task threshold (0.97, biases frozen): what
    ``run_continual(..., "gpm")`` steps with on the second task.
``sgd``
    ``torch.optim.SGD(net.parameters(), lr=0.05)``: the reference of every ratio.

Old task: ``anchors_per_class`` stored inputs of each of the ``old_classes`` first
classes (default 50 x 5 = 250); new-task batches come from the other classes. MLP and
LeNet-5 use the offline MNIST subset; VGG11, VGG16 and ResNet-18 use random ``(N, 3, 32, 32)``
inputs with random labels (cost only).

Protocol of one row (model, batch size, method), run in its own subprocess with one
thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) and timed with process CPU
time (``time.process_time``):

1. ``setup``: the method's optimizer is constructed (FIP: anchor outputs, frozen copy;
   GPM: the bases). SGD's construction is not timed.
2. ``first``: one step of the method, then one SGD step, each timed on its own
   (a first step may factor things or warm caches).
3. ``repeats``: each repeat draws a fresh batch and runs one method step and one SGD
   step on it in a random order. Both *continue*: each optimizer keeps stepping its
   own copy of the network (same initial weights), the method's optimizer is never
   rebuilt. Ratio of a repeat = time(method) / time(SGD); the row reports the median
   and quartiles over repeats, and the ratio of the mean times (what a long run pays
   when a few steps are much dearer than the rest, e.g. a refactored metric).
4. ``memory``: one more step of each (untimed), as below.

Memory: before a measured step the process returns free heap memory to the system
(glibc ``malloc_trim(0)``) and resets its peak resident set size (writing ``5`` to
``/proc/self/clear_refs``); after it, ``VmHWM - VmRSS_before`` from
``/proc/self/status`` is the extra resident memory the step needed at its peak
(activations and autograd graph, gradients, the optimizer's temporaries). Measured on
the first steps and on the extra steps of 4, never on timed repeats (the page faults
it causes would be timed). ``setup_mb`` is the resident memory the constructor
kept. Linux only; ``null`` elsewhere.

Time cap: a row's CPU time after imports is capped at ``--max-seconds`` (a watchdog
thread ends the child); repeats stop early when the next would overrun, and a row cut off
before any repeat finished is reported as "over N s" with the phases it finished.
A wall-clock limit of ``4 x max-seconds + 120`` s guards against a stalled child.

Usage::

    PYTHONPATH=. python benchmarks/fip_cost.py [--models mlp,lenet5,vgg11,resnet18]
        [--batches 64,128,256] [--methods fip,gpm] [--repeats 10] [--max-seconds 120]
        [--anchors-per-class 50] [--old-classes 5] [--out FILE]
    PYTHONPATH=. python benchmarks/fip_cost.py --summary RESULT.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fip_cost.json"
MODEL_LABELS = {
    "mlp": "MLP 784-300-100-10",
    "lenet5": "LeNet-5, 1x28x28",
    "vgg11": "VGG11-CIFAR, 3x32x32",
    "vgg16": "VGG16-CIFAR, 3x32x32",
    "resnet18": "ResNet-18, 3x32x32",
}
METHOD_LABELS = {
    "fip": "FIP (defaults)",
    "fip-sketch": "FIP (outputs=2)",
    "fip-previous": "FIP (defaults before the growth rule)",
    "fip-exact2": "FIP (exact metric kept 2 steps)",
    "gpm": "GPM",
}
METHOD_LABELS |= {
    f"fip-kfac{ekfac}{lazy}{r}": (
        f"FIP (Kronecker{', EKFAC' if ekfac else ''}"
        f"{', lazy' if lazy == '-lazy' else ''}{f', pull every {lazy[2:]}' if lazy[:2] == '-p' else ''}, "
        f"refresh {r[2:] or 10})"
    )
    for ekfac in ("", "-ekfac")
    for lazy in ("", "-lazy", "-p2", "-p3")
    for r in ("", "-r5", "-r20")
}


def kronecker_options(method: str) -> dict:
    """``Kronecker`` keyword arguments of a ``fip-kfac[-ekfac][-lazy|-pK][-rN]`` method name."""
    pull, refresh = re.search(r"-p(\d+)", method), re.search(r"-r(\d+)", method)
    options = {"pull_every": None if "-lazy" in method else int(pull[1]) if pull else 1}
    if "-ekfac" in method:
        options["corrected"] = True
    if refresh:
        options["refresh"] = int(refresh[1])
    return options


LR = 0.05
NUM_CLASSES = 10


# ------------------------------------------------------------------ the row (child process)
def build_model(name: str):
    from riemfip.applications.classifiers import mlp
    from riemfip.networks import lenet5, resnet18, vgg11_cifar, vgg16_cifar

    builders = {
        "mlp": lambda: mlp([784, 300, 100, 10]),
        "lenet5": lenet5,
        "vgg11": vgg11_cifar,
        "vgg16": vgg16_cifar,
        "resnet18": resnet18,
    }
    return builders[name]()


def task_data(model: str, batch: int, anchors_per_class: int, old_classes: int, seed: int):
    """``(x_old, next_batch)``: stored old-task inputs and a callable giving new-task batches."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if model in ("mlp", "lenet5"):
        from riemfip.data import mnist_subset

        data = mnist_subset(flatten=model == "mlp")
        x, y = data.x_train, data.y_train
        old = [torch.nonzero(y == c).flatten()[:anchors_per_class] for c in range(old_classes)]
        x_old = x[torch.cat(old)]
        pool = torch.nonzero(y >= old_classes).flatten()

        def next_batch():
            idx = pool[torch.randint(len(pool), (batch,), generator=gen)]
            return x[idx], y[idx]

        return x_old, next_batch
    shape = (3, 32, 32)
    x_old = torch.randn(anchors_per_class * old_classes, *shape, generator=gen)

    def next_random_batch():
        labels = torch.randint(old_classes, NUM_CLASSES, (batch,), generator=gen)
        return torch.randn(batch, *shape, generator=gen), labels

    return x_old, next_random_batch


def build_optimizer(method: str, net, x_old):
    import torch

    if method == "sgd":
        return torch.optim.SGD(net.parameters(), lr=LR)
    if method in ("fip", "fip-sketch", "fip-previous", "fip-exact2") or method.startswith(
        "fip-kfac"
    ):
        from riemfip.optim import FIP, AnchorSampling, DriftGuard, Exact, Kronecker

        options = {
            "fip": {},
            "fip-sketch": {"anchors": AnchorSampling(outputs=2)},
            "fip-previous": {"anchors": AnchorSampling(outputs=None), "guard": DriftGuard()},
            "fip-exact2": {"curvature": Exact(refresh=2)},
        }.get(method, {})
        if method.startswith("fip-kfac"):
            options = {"curvature": Kronecker(**kronecker_options(method))}
        return FIP(net.parameters(), model=net, anchor_inputs=x_old, **options)
    if method == "gpm":
        from riemfip.applications.gpm import GPM, BasisMemory, ProjectedSGD

        memory = BasisMemory(bias="freeze")
        memory.update(net, x_old, GPM().task_threshold(0))
        return ProjectedSGD(net, memory, lr=LR)
    raise ValueError(f"unknown method {method!r}")


def training_step(net, opt, x, y) -> None:
    import torch.nn.functional as F

    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_and_reset_peak() -> int | None:
    """Release free heap memory, reset the peak RSS to the current RSS; return it (kB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def measured(call, clock) -> tuple[float, float | None]:
    """``(seconds, peak extra MB)`` of ``call()`` with the peak-RSS reset before it."""
    before = _trim_and_reset_peak()
    start = clock()
    call()
    seconds = clock() - start
    peak = _proc_status_kb("VmHWM")
    return seconds, None if before is None or peak is None else (peak - before) / 1024


_EMIT_LOCK = threading.Lock()


def emit(event: str, **fields) -> None:
    line = json.dumps({"event": event, **fields}) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def _watchdog(budget_end: float, max_seconds: int) -> None:
    """End the process once its CPU time passes ``budget_end`` (checked every 0.25 s).

    Not ``RLIMIT_CPU``: an armed process CPU timer makes Linux read the process clock
    from its tick-based accumulator, so ``time.process_time`` steps by 4 ms.
    """
    while time.process_time() < budget_end:
        time.sleep(0.25)
    emit("over", seconds=max_seconds)
    os._exit(3)


def run_row(spec: dict) -> None:
    """One row, in this process; prints one JSON line per finished phase."""
    import torch

    import riemfip.applications.gpm  # noqa: F401  (imports are not part of the budget)
    import riemfip.data  # noqa: F401
    import riemfip.networks  # noqa: F401
    import riemfip.optim  # noqa: F401

    torch.set_num_threads(1)
    clock = time.process_time
    budget_end = clock() + spec["max_seconds"]
    threading.Thread(target=_watchdog, args=(budget_end, spec["max_seconds"]), daemon=True).start()
    _run_phases(spec, clock, budget_end)


def _fip_info(opt) -> dict:
    info = getattr(opt, "last_info", None)
    if not info:
        return {}
    last = info[0]
    return {k: getattr(last, k) for k in ("solve_iterations", "rank") if hasattr(last, k)}


def _run_phases(spec: dict, clock, budget_end: float) -> None:
    import torch

    torch.manual_seed(spec["seed"])
    net = build_model(spec["model"])
    x_old, next_batch = task_data(
        spec["model"], spec["batch"], spec["anchors_per_class"], spec["old_classes"], spec["seed"]
    )
    net_sgd = copy.deepcopy(net)
    sgd = build_optimizer("sgd", net_sgd, x_old)
    rss0 = _trim_and_reset_peak()
    start = clock()
    opt = build_optimizer(spec["method"], net, x_old)
    setup_s = clock() - start
    rss1 = _trim_and_reset_peak()
    setup_mb = None if rss0 is None or rss1 is None else (rss1 - rss0) / 1024
    emit("setup", seconds=setup_s, setup_mb=setup_mb)

    x, y = next_batch()
    first_s, first_mb = measured(lambda: training_step(net, opt, x, y), clock)
    emit("first", seconds=first_s, peak_mb=first_mb, **_fip_info(opt))
    sgd_s, sgd_mb = measured(lambda: training_step(net_sgd, sgd, x, y), clock)
    emit("first_sgd", seconds=sgd_s, peak_mb=sgd_mb)

    rng = random.Random(spec["seed"])
    last = first_s + sgd_s
    for i in range(spec["repeats"]):
        if clock() + last > budget_end:
            break
        x, y = next_batch()
        calls = [("method", net, opt), ("sgd", net_sgd, sgd)]
        rng.shuffle(calls)
        times = {}
        for name, model, optimizer in calls:
            t0 = clock()
            training_step(model, optimizer, x, y)
            times[name] = clock() - t0
        last = times["method"] + times["sgd"]
        emit("repeat", i=i, method_s=times["method"], sgd_s=times["sgd"], **_fip_info(opt))

    if clock() + last <= budget_end:
        x, y = next_batch()
        _, method_mb = measured(lambda: training_step(net, opt, x, y), clock)
        _, sgd_mb = measured(lambda: training_step(net_sgd, sgd, x, y), clock)
        emit("memory", method_mb=method_mb, sgd_mb=sgd_mb)
    emit("done")


# ------------------------------------------------------------------ the parent
def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summarize(spec: dict, events: list[dict], wall_timeout: bool) -> dict:
    """One result row from the child's events."""
    by = {}
    for e in events:
        by.setdefault(e["event"], []).append(e)
    repeats = by.get("repeat", [])
    row = {k: spec[k] for k in ("model", "batch", "method", "anchors_per_class", "old_classes")}
    row["model_label"] = MODEL_LABELS[spec["model"]]
    row["anchors"] = spec["anchors_per_class"] * spec["old_classes"]
    row["setup_s"] = by["setup"][0]["seconds"] if "setup" in by else None
    row["setup_mb"] = by["setup"][0]["setup_mb"] if "setup" in by else None
    row["first_s"] = by["first"][0]["seconds"] if "first" in by else None
    row["first_peak_mb"] = by["first"][0]["peak_mb"] if "first" in by else None
    row["first_sgd_s"] = by["first_sgd"][0]["seconds"] if "first_sgd" in by else None
    row["first_sgd_peak_mb"] = by["first_sgd"][0]["peak_mb"] if "first_sgd" in by else None
    row["repeats"] = len(repeats)
    row["method_times_s"] = [r["method_s"] for r in repeats]
    row["sgd_times_s"] = [r["sgd_s"] for r in repeats]
    if repeats:
        ratios = [r["method_s"] / r["sgd_s"] for r in repeats]
        row["method_median_s"] = statistics.median(row["method_times_s"])
        row["method_q1_s"], row["method_q3_s"] = quartiles(row["method_times_s"])
        row["sgd_median_s"] = statistics.median(row["sgd_times_s"])
        row["method_mean_s"] = statistics.fmean(row["method_times_s"])
        row["sgd_mean_s"] = statistics.fmean(row["sgd_times_s"])
        row["ratio_of_means"] = row["method_mean_s"] / row["sgd_mean_s"]
        row["ratio_median"] = statistics.median(ratios)
        row["ratio_q1"], row["ratio_q3"] = quartiles(ratios)
        row["solve_iterations"] = [r.get("solve_iterations") for r in repeats]
    if "memory" in by:
        row["steady_peak_mb"] = by["memory"][0]["method_mb"]
        row["steady_sgd_peak_mb"] = by["memory"][0]["sgd_mb"]
    cut = wall_timeout or "over" in by or "done" not in by
    row["status"] = "ok" if repeats and not cut else ("partial" if repeats else "over")
    row["max_seconds"] = spec["max_seconds"]
    row["wall_timeout"] = wall_timeout
    return row


def child_events(script: Path, spec: dict) -> tuple[list[dict], bool, str | None]:
    """Run ``script --row SPEC`` in a one-thread child; ``(events, wall_timeout, error)``.

    The child prints one JSON line per event; it is given ``4 x spec["max_seconds"] +
    120`` s of wall clock. Exit status 3 is the watchdog ending an over-budget row, not
    an error. Shared with ``scaling.py``.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(script).resolve()), "--row", json.dumps(spec)]
    wall = 4 * spec["max_seconds"] + 120
    error = None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=wall)
        out, timed_out = proc.stdout, False
        if proc.returncode not in (0, 3):  # 3: the watchdog ended an over-budget row
            error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            print(f"row {spec} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        timed_out = True
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return events, timed_out, error


def run_in_child(spec: dict) -> dict:
    events, timed_out, error = child_events(Path(__file__), spec)
    row = summarize(spec, events, timed_out)
    if error is not None:
        row["status"], row["error"] = "error", error
    return row


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:,.1f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _x(ratio: float) -> str:
    digits = 2 if ratio < 10 else (1 if ratio < 1000 else 0)
    return f"{ratio:,.{digits}f}×"


def table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    head = (
        "| model | batch | method | setup s | first step ms | step ms, median (IQR) | mean | "
        "SGD step ms | ratio, median (IQR) | ratio of means | repeats | "
        "peak MB: first / steady (SGD) |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        label = METHOD_LABELS[r["method"]]
        setup = "-" if r["setup_s"] is None else f"{r['setup_s']:.2f}"
        if r["repeats"]:
            step = f"{_ms(r['method_median_s'])} ({_ms(r['method_q1_s'])}–{_ms(r['method_q3_s'])})"
            ratio = f"{_x(r['ratio_median'])} ({_x(r['ratio_q1'])}–{_x(r['ratio_q3'])})"
            sgd = _ms(r["sgd_median_s"])
            mean = statistics.fmean(r["method_times_s"])
            of_means = _x(mean / statistics.fmean(r["sgd_times_s"]))
            mean = _ms(mean)
        else:
            step = ratio = f"over {r['max_seconds']} s"
            sgd, mean, of_means = _ms(r["first_sgd_s"]), "-", "-"
        first = _ms(r["first_s"]) if r["first_s"] is not None else f"over {r['max_seconds']} s"
        mem = (
            f"{_mb(r['first_peak_mb'])} / {_mb(r.get('steady_peak_mb'))} "
            f"({_mb(r['first_sgd_peak_mb'])} / {_mb(r.get('steady_sgd_peak_mb'))})"
        )
        lines.append(
            f"| {r['model_label']} | {r['batch']} | {label} | {setup} | {first} | {step} | {mean} | "
            f"{sgd} | {ratio} | {of_means} | {r['repeats']} | {mem} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,lenet5,vgg11,resnet18", help="also vgg16")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument(
        "--methods", default="fip", help="comma list of " + ", ".join(METHOD_LABELS)
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per row (10)")
    parser.add_argument("--max-seconds", type=int, default=120, help="CPU seconds per row (120)")
    parser.add_argument("--anchors-per-class", type=int, default=50)
    parser.add_argument("--old-classes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--summary", type=Path, help="print the table of a result file and exit")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    if args.row:
        run_row(json.loads(args.row))
        return {}
    if args.summary:
        print(table(json.loads(args.summary.read_text())["rows"]))
        return {}
    models, methods = args.models.split(","), args.methods.split(",")
    for m in models:
        if m not in MODEL_LABELS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODEL_LABELS)}")
    for m in methods:
        if m not in METHOD_LABELS:
            raise SystemExit(f"unknown method {m!r}; choose from {sorted(METHOD_LABELS)}")
    if not 1 <= args.old_classes < NUM_CLASSES or args.anchors_per_class < 1:
        raise SystemExit("need 1 <= --old-classes < 10 and --anchors-per-class >= 1")

    import torch
    from matvec import machine_info

    result = {
        "machine": machine_info(1, "cpu"),
        "settings": {
            "step": "zero_grad; cross_entropy(net(x), y).backward(); step()",
            "sgd_lr": LR,
            "repeats": args.repeats,
            "max_seconds": args.max_seconds,
            "anchors_per_class": args.anchors_per_class,
            "old_classes": args.old_classes,
            "seed": args.seed,
            "load_average_start": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/fip_cost.py", *(argv or sys.argv[1:])]),
        },
        "rows": [],
    }
    print(f"torch {torch.__version__}, 1 thread per row, process CPU time", flush=True)
    for model in models:
        for batch in (int(b) for b in args.batches.split(",")):
            for method in methods:
                spec = {
                    "model": model, "batch": batch, "method": method, "seed": args.seed,
                    "repeats": args.repeats, "max_seconds": args.max_seconds,
                    "anchors_per_class": args.anchors_per_class, "old_classes": args.old_classes,
                }  # fmt: skip
                row = run_in_child(spec)
                result["rows"].append(row)
                print(table([row]).splitlines()[-1], flush=True)
    result["settings"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["rows"]))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
