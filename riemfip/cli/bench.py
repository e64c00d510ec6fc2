"""``riemfip bench``: the cost of the geometry on this machine, as ratios to plain training.

Times (CPU, one thread, interleaved repeats, median ratio; :mod:`riemfip.cli.cost`) the
metric-vector product against the loss's forward+backward pass, and a FIP step
(:class:`riemfip.optim.FIP`, default settings) against an SGD step, on one batch of an MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from riemfip.data import Dataset
from riemfip.plotting import png_figure

from .config import check_ranges
from .connect import METRICS
from .cost import cost_ratios
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import add_network_arguments, build_network, describe, network_spec
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The subcommand: ``riemfip bench``.
NAME = "bench"
#: Its line in ``riemfip --help``.
SUMMARY = "cost ratios: metric-vector product vs forward+backward, FIP step vs SGD step"
#: The example under ``riemfip bench --help``.
EXAMPLE = "riemfip bench --hidden 300 100 --batch 128 --anchors 250 --out runs/bench"


def add_arguments(parser) -> None:
    """The options of ``riemfip bench`` (the run options are added for it)."""
    add_data_arguments(parser)
    add_network_arguments(parser, hidden=(300, 100))
    group = parser.add_argument_group("timing")
    add = group.add_argument
    add("--batch", type=int, default=128, help="inputs in the timed batch")
    add("--anchors", type=int, default=250, help="FIP's anchor inputs")
    add("--metric", choices=METRICS, default="fisher", help="output metric of the product")
    add("--repeats", type=int, default=7, help="interleaved repeats (the median is reported)")
    add("--inner", type=int, default=10, help="calls in a row per timing")


@dataclass
class BenchJob:
    data: Dataset
    network: dict
    args: object


def prepare(args, device: torch.device, progress: Progress) -> BenchJob:
    """Read and check its inputs (the data, the batch and anchor sizes); writes nothing."""
    check_ranges(args, at_least={"repeats": 1, "inner": 1})
    data = load_dataset(data_spec(args.data, args.data_root), device)
    if args.batch < 1 or args.anchors < 2 or args.batch + args.anchors > len(data.x_train):
        raise ValueError(
            f"--batch >= 1 and --anchors >= 2 must fit the {len(data.x_train)} training inputs "
            f"together, got {args.batch} and {args.anchors}"
        )
    return BenchJob(data, network_spec(args.hidden, args.activation, data), args)


def _draw(result: dict, title: str):
    def draw(path):
        names = list(result["ratios"])
        values = [result["ratios"][n] for n in names]
        with png_figure(path, figsize=(7, 3.2)) as (_, ax):
            ax.barh(names, values, color="tab:blue")
            for i, value in enumerate(values):
                ax.text(value, i, f" {value:.2f}x", va="center")
            ax.axvline(1.0, color="0.5", lw=1)
            ax.set_xlim(0, 1.2 * max(values))
            ax.set_xlabel("median CPU-time ratio (one thread)")
            ax.set_title(title, fontsize=9)
            ax.invert_yaxis()

    return draw


def execute(job: BenchJob, folder: RunFolder) -> Outcome:
    """Time the four operations; the ratios and their plot, to publish."""
    a, x, y = job.args, job.data.x_train, job.data.y_train
    with folder.stage("timing", f"{describe(job.network)}, batch {a.batch}", seed=a.seed):
        net: nn.Module = build_network(job.network).to(x.device)
        with folder.progress.bar(a.repeats, "repeats") as bar:
            result = cost_ratios(
                net,
                x[: a.batch],
                y[: a.batch],
                x[a.batch : a.batch + a.anchors],
                repeats=a.repeats,
                inner=a.inner,
                output_metric=a.metric,
                seed=a.seed,
                bar=bar,
            )
    title = f"{describe(job.network)}, batch {a.batch}, {a.anchors} FIP anchors"
    result["setup"] = {
        "network": describe(job.network),
        "batch": a.batch,
        "anchors": a.anchors,
        "metric": a.metric,
        "device": str(x.device),
    }
    ms = {name: 1e3 * s for name, s in result["median_seconds"].items()}
    return Outcome(
        title=f"riemfip bench: {title}",
        summary={"ratios": result["ratios"], "ms per call (CPU)": ms},
        results={"bench": result},
        figures=[Figure("bench.png", "Median CPU-time ratios (one thread)", _draw(result, title))],
        lines=[f"{name}: {r:.2f}x" for name, r in result["ratios"].items()],
    )
