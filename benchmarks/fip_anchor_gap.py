r"""Does protecting the stored inputs protect the old task? Drift on the fit anchors against
drift on held-out stored inputs of the same classes, after FIP on a second task.

FIP keeps the outputs on the anchors it fits (each step: a batch of them, or random
neighbourhoods of them) and measures drift on a held-out share of the stored inputs, which it
never fits (``AnchorSampling.holdout_fraction``). If the old task's test accuracy falls while
the fit anchors stay put, the loss is a *generalisation gap* of the constraint, and no
cheaper or stricter constraint on the same points can close it; only one that reaches the
inputs between them can.

Same problems, task A and task B as ``fip_defaults.py`` (class-incremental, 50 stored inputs
per old class, task B for fine-tuning's number of steps). For each setting and seed: old- and
new-task test accuracy, and on the fit and the held-out anchors the mean divergence
:math:`\tfrac12\|f(x) - f_0(x)\|^2` (logits) and the share of unchanged arg-max outputs.

Usage::

    PYTHONPATH=. python benchmarks/fip_anchor_gap.py [--problems mlp-mnist mlp-digits]
        [--seeds 0,1,2] [--out benchmarks/results/fip_anchor_gap.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fip_defaults as fd  # noqa: E402

from riemfip.optim import FIP, AnchorSampling  # noqa: E402

#: FIP settings compared: the defaults, more anchors per step with fewer output directions
#: each (about the same rows), and every fit anchor each step.
SETTINGS = {
    "defaults": {},
    "batch 100, outputs 3": {"anchors": AnchorSampling(batch=100, outputs=3)},
    "all anchors, outputs 2": {"anchors": AnchorSampling(batch=None, outputs=2)},
    "lr 0.1": {"lr": 0.1},
}


def drift(net, x: torch.Tensor, y0: torch.Tensor) -> tuple[float, float]:
    """Mean divergence and arg-max agreement of ``net`` on ``x`` against frozen ``y0``."""
    net.eval()
    with torch.no_grad():
        y = net(x)
    return float(0.5 * (y - y0).pow(2).sum(1).mean()), float(
        (y.argmax(1) == y0.argmax(1)).float().mean()
    )


def run(problem_name: str, seed: int) -> dict:
    problem = fd.PROBLEMS[problem_name]
    (xa, ya), (xb, yb), tests = fd.split_tasks(fd.load(problem))
    torch.manual_seed(seed)
    net_a = problem.build()
    fd.train_task_a(net_a, xa, ya, epochs=problem.epochs_a, batch=64, seed=seed)
    anchors = fd.stored_inputs(xa, ya, seed, 50)
    rows = {"before": fd.accuracy(net_a, *tests["old"])}
    for label, options in SETTINGS.items():
        net, made = copy.deepcopy(net_a), {}

        def make(n, options=options, made=made):
            made["opt"] = FIP(n.parameters(), model=n, anchor_inputs=anchors, **options)
            return made["opt"]

        stats = fd.run_task_b(net, make, xb, yb, epochs=problem.epochs_b, batch=64, seed=seed + 1)
        anchor = made["opt"].anchor
        fit = drift(net, anchor.fit_inputs, anchor.fit_outputs)
        held = drift(net, anchor.holdout_inputs, anchor.holdout_outputs)
        rows[label] = {
            "old": fd.accuracy(net, *tests["old"]),
            "new": fd.accuracy(net, *tests["new"]),
            "fit_drift": fit[0],
            "fit_agreement": fit[1],
            "holdout_drift": held[0],
            "holdout_agreement": held[1],
            "step_ms": stats["step_ms"],
            "error": stats.get("error"),
        }
        print(f"{problem_name} seed {seed} {label}: {rows[label]}", flush=True)
    return rows


def table(results: dict) -> str:
    lines = [
        "| problem | setting | old before | old | new | fit drift | fit agree | held-out drift "
        "| held-out agree | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for problem, seeds in results.items():
        for label in SETTINGS:
            runs = [s[label] for s in seeds.values() if not s[label]["error"]]

            def m(key, fmt, runs=runs):
                return fd.pm(fd.mean_std([r[key] for r in runs]), fmt)

            before = statistics.fmean(s["before"] for s in seeds.values())
            lines.append(
                f"| {problem} | {label} | {before:.1f} | {m('old', '.1f')} | {m('new', '.1f')} | "
                f"{m('fit_drift', '.2f')} | {m('fit_agreement', '.3f')} | "
                f"{m('holdout_drift', '.1f')} | {m('holdout_agreement', '.3f')} | "
                f"{m('step_ms', '.1f')} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["mlp-mnist", "mlp-digits"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/fip_anchor_gap.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {p: {str(s): run(p, s) for s in seeds} for p in args.problems}
    Path(args.out).write_text(json.dumps({"command": sys.argv, "results": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
