r"""How the library's costs scale: the CPU part of issue 12's performance report.

Five measurements, in one run, each row in its own one-thread child process timed with
process CPU time (``time.process_time``) and capped at a CPU budget (``fip_cost.py``'s
watchdog; a row over it keeps the phases it finished and says so):

1. ``matvec``: time(metric-vector product) / time(forward + backward) for the MLP
   784-300-100-10, LeNet-5, VGG11-CIFAR, VGG16-CIFAR and ResNet-18 at batch sizes 32,
   64, 128, 256. The product is ``PullbackMetric.from_module(net, x,
   output_metric="fisher", damping=1e-3).matvec(w, v)`` (``matvec.py``'s public row),
   the reference a cross-entropy ``loss.backward()`` after the gradients were set to
   ``None`` (``matvec.py``'s reference), both on the same batch, float32, the network
   in eval mode (the metric's mode). Timed interleaved, in a fresh random order each
   repeat; the ratio of a row is the median over repeats of the ratio within a repeat.
2. ``fip``: time(FIP step) / time(SGD step), FIP at its defaults, the rows of
   ``fip_cost.py`` (same child, same protocol, same 250 stored old-task inputs) at
   batch 32 for every model and VGG16 at the other batch sizes. The stored ``fip`` rows of
   ``results/fip_cost_growth.json`` (FIP's current defaults, batches 64-256, no VGG16) join
   the table, marked with their date.
3. ``growth``: log-log least-squares slopes of the fwd+bwd, matvec, SGD-step and
   FIP-step times against the parameter count :math:`n` (MLPs 784-h-h-10, h = 64 ...
   1024, batch 128) and against the batch size :math:`m` (MLP and LeNet-5, m = 32 ...
   512). The FIP and SGD steps here are ``fip_cost.py``'s step (fresh optimizers on a
   copy of the network, one fixed batch).
4. ``memory``: the extra peak resident memory of a FIP step over that of an SGD step,
   from the rows of 2 (``fip_cost.py``'s ``VmHWM`` after a reset peak).
5. ``geodesic``: ``metric.acceleration(w, v)`` (default solver) and one fixed RK4 step
   of ``WeightSpace(metric, expmap_steps=k).expmap(w, v)`` (the call divided by
   ``k``), against fwd+bwd, for the MLP and LeNet-5 at batch 128 and VGG11 at batch
   32; :math:`\|v\| = 10^{-2}\|w\|`. An expmap row whose estimate (4 accelerations
   per RK step, from the acceleration row) exceeds its budget is skipped, not run.

A run also stops starting rows once the children's CPU time passes ``--total-seconds``;
rows not run are recorded as skipped, with the reason.

Usage::

    PYTHONPATH=. python benchmarks/scaling.py [--parts matvec,fip,growth,geodesic]
        [--total-seconds 1800] [--out benchmarks/results/scaling.json]
    PYTHONPATH=. python benchmarks/scaling.py --summary benchmarks/results/scaling.json
    PYTHONPATH=. python benchmarks/scaling.py --plot benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import fip_cost  # noqa: E402
from fip_cost import ROOT  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scaling.json"
STORED = [
    ROOT / "benchmarks" / "results" / "fip_cost_growth.json",
]
MODELS = ["mlp", "lenet5", "vgg11", "vgg16", "resnet18"]
LABELS = dict(fip_cost.MODEL_LABELS)
BATCHES = [32, 64, 128, 256]
WIDTHS = [64, 128, 256, 512, 1024]
GROWTH_BATCHES = [32, 64, 128, 256, 512]
DAMPING = 1e-3
EXPMAP_STEPS = 2
BIG = ("vgg11", "vgg16", "resnet18")
GOALS = {"matvec": 2.0, "fip": 3.0, "memory": 2.0, "slope": 1.0}


def label(model: str) -> str:
    if model.startswith("mlp-w"):
        h = int(model[5:])
        return f"MLP 784-{h}-{h}-10"
    return LABELS[model]


# ------------------------------------------------------------------ the row (child process)
def build(model: str):
    if model.startswith("mlp-w"):
        from riemfip.applications.classifiers import mlp

        h = int(model[5:])
        return mlp([784, h, h, 10])
    return fip_cost.build_model(model)


def run_ops_row(spec: dict) -> None:
    """Time ``spec["ops"]`` on one model and batch, interleaved; JSON lines on stdout."""
    import torch
    import torch.nn.functional as F

    import manifolds  # noqa: F401  (imports are not part of the budget)
    import riemfip.data  # noqa: F401
    import riemfip.networks  # noqa: F401
    import riemfip.optim  # noqa: F401

    torch.set_num_threads(1)
    clock = time.process_time
    budget_end = clock() + spec["max_seconds"]
    args = (budget_end, spec["max_seconds"])
    threading.Thread(target=fip_cost._watchdog, args=args, daemon=True).start()

    torch.manual_seed(spec["seed"])
    model = spec["model"]
    net = build(model).eval()
    data = "mlp" if model.startswith("mlp") else model
    x_old, next_batch = fip_cost.task_data(data, spec["batch"], 50, 5, spec["seed"])
    x, y = next_batch()
    ops = {}
    params = list(net.parameters())

    def fwd_bwd():
        for p in params:
            p.grad = None
        F.cross_entropy(net(x), y).backward()

    ops["fwd+bwd"] = fwd_bwd
    wanted = spec["ops"]
    if {"matvec", "acceleration", "expmap step"} & set(wanted):
        from manifolds import PullbackMetric, WeightSpace

        metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=DAMPING)
        w = metric.module.flatten().detach()
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        v = torch.randn(w.shape, generator=gen)
        v *= 1e-2 * float(w.norm()) / float(v.norm())
        space = WeightSpace(metric, expmap_steps=EXPMAP_STEPS)
        ops["matvec"] = lambda: metric.matvec(w, v)
        ops["acceleration"] = lambda: metric.acceleration(w, v)
        ops["expmap step"] = lambda: space.expmap(w, v)
    for method in ("sgd", "fip"):
        if f"{method} step" in wanted:
            net_m = copy.deepcopy(net)
            opt = fip_cost.build_optimizer(method, net_m, x_old)
            ops[f"{method} step"] = (
                lambda n=net_m, o=opt: fip_cost.training_step(n, o, x, y)  # noqa: B023
            )
    per_call = {"expmap step": EXPMAP_STEPS}
    todo = [(name, ops[name]) for name in wanted]
    last = 0.0
    for name, call in todo:  # the first call of each, on its own
        start = clock()
        call()
        seconds = (clock() - start) / per_call.get(name, 1)
        last += seconds * per_call.get(name, 1)
        fip_cost.emit("first", op=name, seconds=seconds)
    rng = random.Random(spec["seed"])
    for i in range(spec["repeats"]):
        if clock() + last > budget_end:
            break
        rng.shuffle(todo)
        times = {}
        for name, call in todo:
            start = clock()
            call()
            times[name] = (clock() - start) / per_call.get(name, 1)
        last = sum(times[k] * per_call.get(k, 1) for k in times)
        fip_cost.emit("repeat", i=i, times=times)
    fip_cost.emit("done")


# ------------------------------------------------------------------ the parent
def ops_row(spec: dict) -> dict:
    events, timed_out, error = fip_cost.child_events(Path(__file__), spec)
    firsts = {e["op"]: e["seconds"] for e in events if e["event"] == "first"}
    repeats = [e["times"] for e in events if e["event"] == "repeat"]
    row = {k: spec[k] for k in ("part", "model", "batch", "max_seconds")}
    row["model_label"] = label(spec["model"])
    row["n"] = spec.get("n")
    row["first_s"] = firsts
    row["repeats"] = len(repeats)
    row["times_s"] = {op: [r[op] for r in repeats] for op in spec["ops"]}
    row["median_s"] = {op: statistics.median(t) for op, t in row["times_s"].items() if t}
    ref = "fwd+bwd"
    row["ratio_median"] = {
        op: statistics.median(r[op] / r[ref] for r in repeats) for op in spec["ops"] if repeats
    }
    if repeats and "fip step" in spec["ops"] and "sgd step" in spec["ops"]:
        row["fip_over_sgd"] = statistics.median(r["fip step"] / r["sgd step"] for r in repeats)
    done = any(e["event"] == "done" for e in events)
    over = any(e["event"] == "over" for e in events)
    if error is not None:
        row["status"], row["error"] = "error", error
    elif repeats and done:
        row["status"] = "ok"
    else:
        row["status"] = "partial" if repeats else "over"
        row["reason"] = (
            f"over the {spec['max_seconds']} s CPU budget" if over or timed_out else "cut"
        )
    return row


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def n_params(model: str) -> int:
    import torch

    torch.manual_seed(0)
    return sum(p.numel() for p in build(model).parameters())


def plan(parts: list[str], seed: int) -> list[dict]:
    """Every row of the run, in order (cheap ones first in each part)."""
    rows = []

    def ops(part, model, batch, names, repeats, budget):
        rows.append({
            "kind": "ops", "part": part, "model": model, "batch": batch, "ops": names,
            "repeats": repeats, "max_seconds": budget, "seed": seed,
        })  # fmt: skip

    if "matvec" in parts:
        for model in MODELS:
            for batch in BATCHES:
                big = model in BIG
                ops("matvec", model, batch, ["fwd+bwd", "matvec"], 5 if big else 20,
                    150 if big else 60)  # fmt: skip
    if "fip" in parts:
        for model in MODELS:
            for batch in BATCHES if model == "vgg16" else [32]:
                big = model in BIG
                rows.append({
                    "kind": "fip", "part": "fip", "model": model, "batch": batch,
                    "method": "fip", "seed": seed, "repeats": 3 if big else 10,
                    "max_seconds": 200 if big else 60, "anchors_per_class": 50,
                    "old_classes": 5,
                })  # fmt: skip
    if "growth" in parts:
        steps = ["fwd+bwd", "matvec", "sgd step", "fip step"]
        for h in WIDTHS:
            ops("growth-n", f"mlp-w{h}", 128, steps, 10, 60)
        for model in ("mlp", "lenet5"):
            for batch in GROWTH_BATCHES:
                ops("growth-m", model, batch, steps, 10, 60)
    if "geodesic" in parts:
        for model, batch in (("mlp", 128), ("lenet5", 128), ("vgg11", 32)):
            ops("geodesic", model, batch, ["fwd+bwd", "matvec", "acceleration"], 3, 120)
            ops("geodesic", model, batch, ["fwd+bwd", "expmap step"], 2, 120)
    return rows


def skipped(spec: dict, reason: str) -> dict:
    return {
        "part": spec["part"], "model": spec["model"], "model_label": label(spec["model"]),
        "batch": spec["batch"], "status": "skipped", "reason": reason, "repeats": 0,
    }  # fmt: skip


def run(args) -> dict:
    import torch
    from matvec import machine_info

    result = {
        "machine": machine_info(1, "cpu"),
        "settings": {
            "dtype": "float32",
            "output_metric": "fisher",
            "damping": DAMPING,
            "expmap_steps": EXPMAP_STEPS,
            "total_seconds": args.total_seconds,
            "seed": args.seed,
            "load_average_start": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        },
        "rows": [],
    }
    print(f"torch {torch.__version__}, 1 thread per row, process CPU time", flush=True)
    accel = {}
    for spec in plan(args.parts.split(","), args.seed):
        if spec["model"].startswith("mlp-w"):
            spec["n"] = n_params(spec["model"])
        spent = children_cpu()
        if spent + spec["max_seconds"] > args.total_seconds:
            row = skipped(spec, f"the run's {args.total_seconds} s CPU budget was spent")
        elif spec["kind"] == "ops" and "expmap step" in spec["ops"]:
            estimate = 4 * EXPMAP_STEPS * accel.get(spec["model"], 0.0) * (1 + spec["repeats"])
            if estimate > spec["max_seconds"]:
                reason = f"estimated {estimate:.0f} s (4 accelerations per RK4 step) > budget"
                row = skipped(spec, reason + f" {spec['max_seconds']} s")
            else:
                row = ops_row(spec)
        elif spec["kind"] == "ops":
            row = ops_row(spec)
        else:
            row = fip_cost.run_in_child(
                {k: v for k, v in spec.items() if k not in ("kind", "part")}
            )
            row["part"] = "fip"
        if spec["kind"] == "ops" and "acceleration" in spec["ops"]:
            accel[spec["model"]] = row.get("median_s", {}).get(
                "acceleration", row.get("first_s", {}).get("acceleration", math.inf)
            )
        row["cpu_s"] = children_cpu() - spent
        result["rows"].append(row)
        print(json.dumps(brief(row)), flush=True)
    result["settings"]["load_average_end"] = os.getloadavg()
    result["settings"]["children_cpu_s"] = children_cpu()
    result["stored_fip_rows"] = stored_fip_rows()
    result["slopes"] = slopes(result["rows"])
    return result


def brief(row: dict) -> dict:
    keys = ("part", "model", "batch", "status", "ratio_median", "fip_over_sgd", "reason")
    return {k: row[k] for k in keys if k in row} | {"cpu_s": round(row.get("cpu_s", 0), 1)}


def stored_fip_rows() -> list[dict]:
    rows = []
    for path in STORED:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            if r["method"] == "fip":
                rows.append(r | {"measured": data["machine"]["date"][:10], "source": path.name})
    return rows


def slopes(rows: list[dict]) -> dict:
    """Least-squares slope of log(median time) against log(n) and log(m)."""
    out = {}
    groups = {"n (MLP 784-h-h-10, batch 128)": [r for r in rows if r["part"] == "growth-n"]}
    for model in ("mlp", "lenet5"):
        sel = [r for r in rows if r["part"] == "growth-m" and r["model"] == model]
        groups[f"m ({label(model)})"] = sel
    for name, sel in groups.items():
        sel = [r for r in sel if r.get("median_s")]
        xs = [r["n"] if name.startswith("n ") else r["batch"] for r in sel]
        fits = {}
        for op in ("fwd+bwd", "matvec", "sgd step", "fip step"):
            pts = [
                (x, r["median_s"][op]) for x, r in zip(xs, sel, strict=True) if op in r["median_s"]
            ]
            if len(pts) >= 2:
                fits[op] = fit([p[0] for p in pts], [p[1] for p in pts])
        out[name] = {"x": xs, "fits": fits}
    return out


def fit(xs, ys) -> dict:
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
    # the slope over the upper half of the range (where fixed costs matter least)
    half = len(xs) // 2
    upper = None
    if len(xs) - half >= 2:
        hx, hy = lx[half:], ly[half:]
        hmx, hmy = statistics.fmean(hx), statistics.fmean(hy)
        upper = sum((a - hmx) * (b - hmy) for a, b in zip(hx, hy, strict=True)) / sum(
            (a - hmx) ** 2 for a in hx
        )
    return {"slope": slope, "intercept": my - slope * mx, "upper_slope": upper}


# ------------------------------------------------------------------ the report
def _x(r) -> str:
    return "-" if r is None else fip_cost._x(r)


def _ms(s) -> str:
    return "-" if s is None else f"{1e3 * s:,.1f}" if s < 10 else f"{s:,.1f} s"


def _cell(r: dict | None, op: str) -> str:
    if r is None:
        return "-"
    if r["status"] == "skipped":
        return "skipped"
    if op in r.get("ratio_median", {}):
        extra = "" if r["status"] == "ok" else f" ({r['status']}, {r['repeats']} rep.)"
        return _x(r["ratio_median"][op]) + extra
    return f"over {r['max_seconds']} s"


def fip_table(result: dict) -> list[dict]:
    """One FIP row per (model, batch): this run's where it has one, else the stored one."""
    now = result["machine"]["date"][:10]
    table = {}
    for r in result["stored_fip_rows"]:
        table[(r["model"], r["batch"])] = r
    for r in result["rows"]:
        if r["part"] == "fip":
            table[(r["model"], r["batch"])] = r | {"measured": now, "source": "this run"}
    order = {m: i for i, m in enumerate(MODELS)}
    return [table[k] for k in sorted(table, key=lambda k: (order[k[0]], k[1]))]


def summary(result: dict) -> str:
    m = result["machine"]
    rows = result["rows"]
    out = [
        f"Machine: {m['processor']}, {m['cpu_count']} logical CPUs, {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, 1 thread, process CPU time; "
        f"run {m['date']}; load average {result['settings']['load_average_start'][0]:.2f} "
        f"at the start, {result['settings']['load_average_end'][0]:.2f} at the end; "
        f"{result['settings']['children_cpu_s'] / 60:.1f} CPU minutes in all.",
        "",
        "**1. Metric-vector product / forward+backward** (Fisher, float32, median over "
        "interleaved repeats; goal ≤ 2×)",
        "",
        "| model | weights | "
        + " | ".join(f"batch {b}" for b in BATCHES)
        + " | fwd+bwd ms at 256 |",
        "|---" * (len(BATCHES) + 3) + "|",
    ]
    mv = {(r["model"], r["batch"]): r for r in rows if r["part"] == "matvec"}
    weights = {
        "mlp": 266_610, "lenet5": 61_706, "vgg11": 9_225_610, "vgg16": 14_719_818,
        "resnet18": 11_181_642,
    }  # fmt: skip
    for model in MODELS:
        if not any(k[0] == model for k in mv):
            continue
        cells = [_cell(mv.get((model, b)), "matvec") for b in BATCHES]
        ref = mv.get((model, BATCHES[-1]), {}).get("median_s", {}).get("fwd+bwd")
        out.append(
            f"| {LABELS[model]} | {weights[model]:,} | " + " | ".join(cells) + f" | {_ms(ref)} |"
        )
    out += [
        "",
        "**2. FIP step / SGD step** (FIP's defaults, 250 stored inputs; median over "
        "repeats, `fip_cost.py`'s protocol; goal ≤ 3×) and **4. peak memory** (extra "
        "resident MB at the step's peak, first / steady step; goal FIP ≤ 2× SGD)",
        "",
        "| model | batch | FIP step ms | SGD step ms | FIP / SGD | peak MB FIP (SGD) "
        "| memory FIP / SGD | FIP setup MB | repeats | measured |",
        "|---" * 10 + "|",
    ]
    for r in fip_table(result):
        if r.get("repeats"):
            ratio = _x(r["ratio_median"])
            fip_ms, sgd_ms = _ms(r["method_median_s"]), _ms(r["sgd_median_s"])
        else:
            ratio = fip_ms = f"over {r['max_seconds']} s" if r["status"] != "skipped" else "skipped"
            sgd_ms = "-"
        peaks = [r.get("first_peak_mb"), r.get("steady_peak_mb")]
        sgd_peaks = [r.get("first_sgd_peak_mb"), r.get("steady_sgd_peak_mb")]
        mem = mem_ratio(r)
        peak_cell = (
            "/".join("-" if p is None else f"{p:,.0f}" for p in peaks)
            + " ("
            + "/".join("-" if p is None else f"{p:,.0f}" for p in sgd_peaks)
            + ")"
        )
        setup = "-" if r.get("setup_mb") is None else f"{r['setup_mb']:,.0f}"
        when = r["measured"] + ("" if r["source"] == "this run" else " (stored)")
        out.append(
            f"| {LABELS[r['model']]} | {r['batch']} | {fip_ms} | {sgd_ms} | {ratio} | "
            f"{peak_cell} | {_x(mem)} | {setup} | {r.get('repeats', 0)} | {when} |"
        )
    out += [
        "",
        "**3. Growth**: least-squares slope of log(median time) against log(n) or log(m) "
        "(all points; in brackets, the upper half of the range). Goal about 1.",
        "",
        "| against | points | fwd+bwd | matvec | SGD step | FIP step |",
        "|---" * 6 + "|",
    ]
    for name, s in result["slopes"].items():
        cells = []
        for op in ("fwd+bwd", "matvec", "sgd step", "fip step"):
            f = s["fits"].get(op)
            if f is None:
                cells.append("-")
                continue
            upper = "" if f["upper_slope"] is None else f" ({f['upper_slope']:.2f})"
            cells.append(f"{f['slope']:.2f}{upper}")
        pts = ", ".join(f"{x:,}" for x in s["x"])
        out.append(f"| {name} | {pts} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Times behind the slopes (median ms; FIP / SGD in the last column):",
        "",
        "| model | weights | batch | fwd+bwd | matvec | SGD step | FIP step | FIP / SGD |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        if not r["part"].startswith("growth"):
            continue
        med = r.get("median_s", {})
        n = r.get("n") or weights.get(r["model"])
        cells = [_ms(med.get(op)) for op in ("fwd+bwd", "matvec", "sgd step", "fip step")]
        out.append(
            f"| {r['model_label']} | {n:,} | {r['batch']} | " + " | ".join(cells)
            + f" | {_x(r.get('fip_over_sgd'))} |"
        )  # fmt: skip
    out += [
        "",
        "**5. Geodesics**: one acceleration (default solver, CG) and one fixed RK4 step of "
        f"`expmap` (`expmap_steps={EXPMAP_STEPS}`, the call / {EXPMAP_STEPS}) against "
        "forward+backward on the same batch.",
        "",
        "| model | batch | fwd+bwd ms | matvec | acceleration | acceleration s | "
        "RK4 step | RK4 step s |",
        "|---" * 8 + "|",
    ]
    geo = {}
    for r in rows:
        if r["part"] == "geodesic":
            geo.setdefault((r["model"], r["batch"]), []).append(r)
    for (model, batch), rs in geo.items():
        acc = next((r for r in rs if "acceleration" in r.get("ratio_median", {})), rs[0])
        exp = next((r for r in rs if r is not acc), None)
        ref = acc.get("median_s", {}).get("fwd+bwd")

        def sec(r, op):
            return (
                "-"
                if r is None
                else f"{r['median_s'][op]:.2f}"
                if op in r.get("median_s", {})
                else r.get("reason", r["status"])
            )

        out.append(
            f"| {LABELS[model]} | {batch} | {_ms(ref)} | {_cell(acc, 'matvec')} | "
            f"{_cell(acc, 'acceleration')} | {sec(acc, 'acceleration')} | "
            f"{_cell(exp, 'expmap step')} | {sec(exp, 'expmap step')} |"
        )
    skips = [r for r in rows if r["status"] != "ok"]
    if skips:
        out += ["", "Rows not finished:", ""]
        for r in skips:
            out.append(
                f"- {r['part']}, {r['model_label']}, batch {r['batch']}: {r['status']}"
                + (f" ({r['reason']})" if r.get("reason") else "")
            )
    return "\n".join(out)


def mem_ratio(r: dict) -> float | None:
    """Larger of the first and steady peak ratios FIP / SGD."""
    pairs = [("first_peak_mb", "first_sgd_peak_mb"), ("steady_peak_mb", "steady_sgd_peak_mb")]
    vals = [r[a] / r[b] for a, b in pairs if r.get(a) and r.get(b)]
    return max(vals) if vals else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colors = dict(zip(MODELS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    short = {"mlp": "MLP", "lenet5": "LeNet-5", "vgg11": "VGG11", "vgg16": "VGG16",
             "resnet18": "ResNet-18"}  # fmt: skip

    def log2_batches(ax, batches):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(batches))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(b) for b in batches])

    ax = axes[0, 0]
    for model in MODELS:
        pts = [(r["batch"], r["ratio_median"]["matvec"]) for r in result["rows"]
               if r["part"] == "matvec" and r["model"] == model and r.get("ratio_median")]  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=colors[model], label=short[model])
    ax.axhline(GOALS["matvec"], color="k", ls="--", lw=1, label="goal")
    log2_batches(ax, BATCHES)
    ax.set(xlabel="batch size", ylabel="matvec / (forward+backward)",
           title="1. metric-vector product (Fisher)")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for model in MODELS:
        rs = [r for r in fip_table(result) if r["model"] == model and r.get("repeats")]
        if not rs:
            continue
        ax.plot([r["batch"] for r in rs], [r["ratio_median"] for r in rs], "-",
                color=colors[model], label=short[model])  # fmt: skip
        for r in rs:
            filled = r["source"] == "this run"
            ax.plot(r["batch"], r["ratio_median"], "o", color=colors[model],
                    mfc=colors[model] if filled else "white")  # fmt: skip
    ax.axhline(GOALS["fip"], color="k", ls="--", lw=1, label="goal")
    log2_batches(ax, BATCHES)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([2, 3, 5, 10, 20, 50]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}×"))
    ax.set(xlabel="batch size (hollow: stored rows)", ylabel="FIP step / SGD step",
           title="2. FIP step (defaults, 250 stored inputs)")  # fmt: skip
    ax.legend(fontsize=8)

    ops = [("fwd+bwd", "s-"), ("matvec", "o-"), ("sgd step", "^-"), ("fip step", "D-")]
    ax = axes[1, 0]
    rs = [r for r in result["rows"] if r["part"] == "growth-n" and r.get("median_s")]
    fits = result["slopes"]["n (MLP 784-h-h-10, batch 128)"]["fits"]
    for op, style in ops:
        pts = [(r["n"], 1e3 * r["median_s"][op]) for r in rs if op in r["median_s"]]
        if pts:
            slope = fits[op]["slope"] if op in fits else float("nan")
            ax.plot(*zip(*pts, strict=True), style, label=f"{op} (slope {slope:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="weights n (MLP 784-h-h-10, h = 64 ... 1024)",
           ylabel="CPU ms", title="3. growth with n (batch 128)")  # fmt: skip
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for model, fill in (("mlp", "full"), ("lenet5", "none")):
        rs = [r for r in result["rows"]
              if r["part"] == "growth-m" and r["model"] == model and r.get("median_s")]  # fmt: skip
        fits = result["slopes"][f"m ({label(model)})"]["fits"]
        for (op, style), color in zip(ops, colors.values(), strict=False):
            pts = [(r["batch"], 1e3 * r["median_s"][op]) for r in rs if op in r["median_s"]]
            if pts:
                slope = fits[op]["slope"] if op in fits else float("nan")
                ls = "-" if model == "mlp" else ":"
                ax.plot(*zip(*pts, strict=True), style[0] + ls, color=color, fillstyle=fill,
                        label=f"{short[model]} {op} ({slope:.2f})")  # fmt: skip
    log2_batches(ax, GROWTH_BATCHES)
    ax.set(yscale="log", xlabel="batch size m", ylabel="CPU ms",
           title="3. growth with m (slopes in brackets)")  # fmt: skip
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 12)  # room for the legend above the lines
    ax.legend(fontsize=7, ncol=2, loc="upper left")

    m = result["machine"]
    fig.suptitle(f"riemfip scaling on CPU, 1 thread ({m['processor']}, torch {m['torch']})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="matvec,fip,growth,geodesic")
    parser.add_argument("--total-seconds", type=int, default=1800, help="CPU seconds (1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--summary", type=Path, help="print the markdown report and exit")
    parser.add_argument("--plot", type=Path, help="redraw the plot of a result file and exit")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row in this process
    args = parser.parse_args(argv)
    if args.row:
        run_ops_row(json.loads(args.row))
        return {}
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return {}
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return {}
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(summary(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
