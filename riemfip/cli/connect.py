"""``riemfip connect A.pt B.pt``: the geodesic between two trained networks.

Wraps :func:`riemfip.connect` and compares its geodesic on the test set with the straight
line and a quadratic Bézier curve (:func:`riemfip.connectivity.fit_bezier`) by
:func:`riemfip.connectivity.compare_paths`. Two routes to the geodesic (``--method``):

``relax`` (the default)
    L-BFGS on the discrete energy of the pullback metric of the first ``--anchors``
    training inputs, in rounds of ``--round`` iterations with a checkpoint after each.
``minibatch``
    Adam on the energies of minibatches of ``--batch-size`` inputs drawn from the whole
    training set (:func:`manifolds.geodesic.relax_minibatches`), at most ``--epochs``
    passes, stopped early on the energy of the last ``--held-out`` training inputs (kept
    out of the minibatches), with a checkpoint after each epoch that resumes the run
    exactly (Adam's state, the shuffle and the stopping rule included).

Both routes' paths are measured in the comparison with the metric of the ``--anchors``
inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from manifolds import Status
from manifolds.geodesic import Minibatch
from riemfip.checkpoint import resume_checkpoint, save_checkpoint
from riemfip.connectivity import (
    compare_paths,
    connect,
    connection_metric,
    fit_bezier,
    straight_line,
)
from riemfip.data import Dataset
from riemfip.geodesic import GeodesicPath

from .config import UsageError, check_ranges
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import describe, load_network, same_architecture
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The output metrics ``--metric`` offers.
METRICS = ("fisher", "bhattacharyya", "euclidean")
#: The routes to the geodesic ``--method`` offers.
ROUTES = ("relax", "minibatch")
#: The minibatch route's options, with their defaults (:class:`Minibatch`'s own).
MINIBATCH_DEFAULTS = {"batch_size": Minibatch().batch_size, "epochs": Minibatch().epochs}

#: The subcommand: ``riemfip connect``.
NAME = "connect"
#: Its line in ``riemfip --help``.
SUMMARY = "the geodesic between two network checkpoints, against the line and a Bezier curve"
#: The example under ``riemfip connect --help``.
EXAMPLE = "riemfip connect runs/net0/model.pt runs/net1/model.pt --anchors 256 --out runs/geodesic"


def add_path_arguments(parser) -> None:
    """The geodesic's and the Bézier curve's options (shared with ``demo``)."""
    group = parser.add_argument_group("paths")
    add = group.add_argument
    add("--anchors", type=int, default=256, help="training inputs that define the metric")
    add("--points", type=int, default=17, help="points on each path, ends included")
    add("--metric", choices=METRICS, default="fisher", help="output metric G")
    add("--damping", type=float, default=1e-4, help="weight-space term lambda of the metric")
    add("--maxiter", type=int, default=400, help="L-BFGS iterations of the relaxation")
    add("--round", type=int, default=100, help="L-BFGS iterations between checkpoints")
    add(
        "--bezier-epochs",
        type=int,
        default=10,
        help="epochs of the Bezier curve's control point; 0 leaves the curve out",
    )


def add_arguments(parser) -> None:
    """The options of ``riemfip connect`` (the run options are added for it)."""
    parser.add_argument("a", type=Path, metavar="A.pt", help="first network (riemfip train)")
    parser.add_argument("b", type=Path, metavar="B.pt", help="second network, same architecture")
    add_data_arguments(parser, default=None)
    add_path_arguments(parser)
    add_minibatch_arguments(parser)


def add_minibatch_arguments(parser) -> None:
    """``--method`` and the minibatch route's options (``connect`` only)."""
    group = parser.add_argument_group(
        "route",
        "relax: L-BFGS on the metric of the --anchors inputs (--maxiter, --round).\n"
        "minibatch: Adam on minibatches of the whole training set, checkpointed after\n"
        "each epoch (a resumed run continues from the last finished epoch).\n"
        "Both routes' paths are compared in the metric of the --anchors inputs.",
    )
    add = group.add_argument
    add("--method", choices=ROUTES, default="relax", help="route to the geodesic")
    add(
        "--batch-size",
        type=int,
        help=f"minibatch: inputs per batch (default {MINIBATCH_DEFAULTS['batch_size']})",
    )
    add(
        "--epochs",
        type=int,
        help=f"minibatch: at most this many passes (default {MINIBATCH_DEFAULTS['epochs']})",
    )
    add(
        "--held-out",
        type=int,
        metavar="N",
        help="minibatch: the last N training inputs, kept out of the batches, decide when to "
        "stop and which path comes back (default: the first batch judges, no early stopping)",
    )


@dataclass
class PathOptions:
    anchors: int
    points: int
    metric: str
    damping: float
    maxiter: int
    round: int
    bezier_epochs: int
    seed: int

    @classmethod
    def from_args(cls, args, data: Dataset) -> PathOptions:
        """The options ``args`` give, checked against ``data``."""
        minimums = {"anchors": 1, "points": 3, "maxiter": 0, "round": 1, "bezier_epochs": 0}
        check_ranges(args, at_least=minimums, positive=("damping",))
        if args.anchors > len(data.x_train):
            raise UsageError(
                f"--anchors {args.anchors}: {data.name} has {len(data.x_train)} training inputs"
            )
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class MinibatchOptions:
    """The minibatch route's options: ``--batch-size``, ``--epochs``, ``--held-out``."""

    batch_size: int
    epochs: int
    held_out: int  # 0: none, the first batch judges

    @classmethod
    def from_args(cls, args, data: Dataset) -> MinibatchOptions | None:
        """The minibatch route's options (``None`` for ``--method relax``), checked against
        ``data``."""
        given = [
            name for name in ("batch_size", "epochs", "held_out") if getattr(args, name) is not None
        ]
        if args.method != "minibatch":
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise UsageError(f"{flag} is an option of --method minibatch, not {args.method}")
            return None
        values = MINIBATCH_DEFAULTS | {"held_out": 0} | {n: getattr(args, n) for n in given}
        for name in given:
            if values[name] < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
        n = len(data.x_train)
        if values["held_out"] >= n:
            raise UsageError(
                f"--held-out {values['held_out']}: {data.name} has {n} training inputs, and "
                "at least one must be left for the batches"
            )
        return cls(**values)


@dataclass
class ConnectJob:
    net_a: nn.Module
    net_b: nn.Module
    data: Dataset
    options: PathOptions
    minibatch: MinibatchOptions | None = None


def prepare(args, device: torch.device, progress: Progress) -> ConnectJob:
    """Read both networks and the data and check that they fit together; writes nothing."""
    net_a, saved_a = load_network(args.a, device)
    net_b, saved_b = load_network(args.b, device)
    same_architecture(args.a, saved_a["network"], args.b, saved_b["network"])
    spec = saved_a["data"] if args.data is None else data_spec(args.data, args.data_root)
    data = load_dataset(spec, device)
    if data.x_train.shape[1] != saved_a["network"]["sizes"][0]:
        raise ValueError(
            f"{args.a} holds an {describe(saved_a['network'])}, which does not take "
            f"{data.name}'s inputs of width {data.x_train.shape[1]}"
        )
    options = PathOptions.from_args(args, data)
    return ConnectJob(net_a, net_b, data, options, MinibatchOptions.from_args(args, data))


def _geodesic(folder: RunFolder, net_a, net_b, anchor, o: PathOptions) -> GeodesicPath:
    """:func:`riemfip.connect` in rounds of ``o.round`` iterations, each checkpointed;
    resumed from the last round's checkpoint."""
    file = folder.checkpoint("geodesic.pt")
    settings = {
        key: getattr(o, key)
        for key in ("anchors", "points", "metric", "damping", "maxiter", "round")
    }
    saved = resume_checkpoint(file, settings, map_location=anchor.device)
    path, done = None, 0
    if saved is not None:
        path = GeodesicPath.from_state_dict(saved.state["path"], source=str(file))
        done = saved.step

    def relaxed(maxiter: int, init: GeodesicPath | None) -> GeodesicPath:
        return connect(net_a, net_b, anchor, **_geometry(o), maxiter=maxiter, init=init)

    with folder.progress.bar(o.maxiter, "geodesic (L-BFGS)", initial=done) as bar:
        while done < o.maxiter and not (path is not None and path.converged):
            n = min(o.round, o.maxiter - done)
            path = relaxed(n, path)
            done += n
            save_checkpoint(file, {"path": path.state_dict()}, settings=settings, step=done)
            bar.update(n)
            folder.saved()
            if path.iterations == 0 or path.status == Status.BREAKDOWN:  # no more progress
                break
    if path is None:  # --maxiter 0: the line, relaxed zero times
        path = relaxed(0, None)
    path.metadata["total_iterations"] = done
    return path


def _geometry(o: PathOptions) -> dict:
    """The metric and the path's resolution, as :func:`riemfip.connect` takes them."""
    return {"output_metric": o.metric, "damping": o.damping, "n_points": o.points}


def _minibatch_geodesic(
    folder: RunFolder, net_a, net_b, data: Dataset, o: PathOptions, m: MinibatchOptions
) -> GeodesicPath:
    """:func:`riemfip.connect` by minibatches of the whole training set (less the held-out
    inputs), checkpointed after each epoch; resumed from the last epoch's checkpoint, or
    the finished path read back."""
    file = folder.checkpoint("geodesic.pt")
    settings = {"method": "minibatch", "seed": o.seed, **dataclasses.asdict(m)}
    settings |= {key: getattr(o, key) for key in ("points", "metric", "damping")}
    device = data.x_train.device
    saved = resume_checkpoint(file, settings, map_location=device)
    if saved is not None and "path" in saved.state:  # the stage had finished
        return GeodesicPath.from_state_dict(saved.state["path"], source=str(file))
    resume = None if saved is None else saved.state["minibatch"]
    x = data.x_train
    train, held = (x, None) if m.held_out == 0 else (x[: -m.held_out], x[-m.held_out :])
    policy = Minibatch(epochs=m.epochs, batch_size=m.batch_size, seed=o.seed)
    done = 0 if saved is None else saved.step
    with folder.progress.bar(m.epochs, "geodesic (minibatch)", initial=done, unit="epoch") as bar:

        def on_epoch(state: dict) -> None:
            save_checkpoint(file, {"minibatch": state}, settings=settings, step=state["epoch"])
            bar.update(1)
            folder.saved()

        path = connect(
            net_a,
            net_b,
            train,
            **_geometry(o),
            method=policy,
            held_out=held,
            resume=resume,
            on_epoch=on_epoch,
        )
    path.metadata["total_iterations"] = path.iterations
    path.metadata["held_out_inputs"] = m.held_out
    epochs = path.metadata["epochs"]
    save_checkpoint(file, {"path": path.state_dict()}, settings=settings, step=epochs)
    folder.saved()
    return path


def connect_paths(
    folder: RunFolder,
    net_a,
    net_b,
    data: Dataset,
    o: PathOptions,
    minibatch: MinibatchOptions | None = None,
):
    """The geodesic (``minibatch``: by the minibatch route), the line and
    (``o.bezier_epochs > 0``) the Bézier curve, compared on the test set; returns
    ``(ConnectivityReport, GeodesicPath)``."""
    anchor = data.x_train[: o.anchors]
    if minibatch is None:
        detail = f"relax {o.points} points on {o.anchors} anchors, {o.maxiter} L-BFGS iterations"
    else:
        m = minibatch
        detail = (
            f"Adam on {o.points} points, batches of {m.batch_size} of "
            f"{len(data.x_train) - m.held_out} training inputs, at most {m.epochs} epochs, "
            + (f"{m.held_out} held-out inputs" if m.held_out else "judged on the first batch")
        )
    with folder.stage("geodesic", detail, seed=o.seed):
        if minibatch is None:
            path = _geodesic(folder, net_a, net_b, anchor, o)
        else:
            path = _minibatch_geodesic(folder, net_a, net_b, data, o, minibatch)
    paths = {"geodesic": path, "line": straight_line(path.points[0], path.points[-1], o.points)}
    if o.bezier_epochs > 0:
        with folder.stage("bezier", f"{o.bezier_epochs} epochs", seed=o.seed):
            curve = fit_bezier(
                net_a,
                net_b,
                (data.x_train, data.y_train),
                epochs=o.bezier_epochs,
                seed=o.seed,
                checkpoint=folder.checkpoint("bezier.pt"),
            )
            folder.saved()
        paths["bezier"] = curve.sample(o.points)
    with folder.stage("compare", "the paths on the test set"):
        metric = connection_metric(net_a, anchor, output_metric=o.metric, damping=o.damping)
        report = compare_paths(
            net_a,
            paths,
            (data.x_test, data.y_test),
            metric=metric,
            metadata={"data": data.describe(), "anchors": o.anchors, "metric": o.metric},
        )
    return report, path


def geodesic_numbers(path: GeodesicPath) -> dict:
    """The solver's own account: route, status, iterations, residual, energy against the
    line's; for the minibatch route also its policy, epochs and held-out energies."""
    numbers = {
        "route": path.method,
        "status": path.status.name,
        "converged": path.converged,
        "message": path.message,
        "iterations": path.metadata["total_iterations"],
        "residual": path.residual,
        "tol": path.tol,
        "objective": path.metadata.get("objective"),
        "objective_line": path.metadata.get("objective_line"),
        "length": path.length,
    }
    if path.method == "minibatch":
        numbers["policy"] = path.metadata["connect"]["minibatch"]
        numbers["epochs"] = path.metadata["epochs"]
        numbers["training_inputs"] = path.metadata["connect"]["anchor_inputs"]
        numbers["held_out_inputs"] = path.metadata.get("held_out_inputs", 0)
        numbers["held_out_energies"] = path.metadata["held_out_energies"]
    return numbers


def iterations_line(geo: dict) -> str:
    """How the geodesic's solve ended, in words."""
    if geo["route"] == "minibatch":
        return (
            f"geodesic (minibatch): {geo['status']} after {geo['iterations']} Adam steps in "
            f"{geo['epochs']} epochs ({geo['message']})"
        )
    return f"geodesic: {geo['status']} after {geo['iterations']} iterations ({geo['message']})"


def path_summary(report) -> dict:
    """Per path: barrier, worst and midpoint test accuracy (%), function length, energy."""
    return {
        name: {
            "barrier": s["barrier"],
            "worst accuracy (%)": 100 * (1 - s["max_error"]),
            "midpoint accuracy (%)": 100 * s["midpoint_accuracy"],
            "function length": s["function_length"],
            "energy": s["energy"],
        }
        for name, s in report.summary().items()
    }


def geodesic_summary(geo: dict) -> dict:
    """The solver's key numbers: route, status, iterations, its energy and the line's."""
    if geo["route"] == "minibatch":
        steps = {"Adam steps": geo["iterations"], "epochs": geo["epochs"]}
    else:
        steps = {"L-BFGS iterations": geo["iterations"]}
    return {
        "route": geo["route"],
        "status": geo["status"],
        **steps,
        "energy": geo["objective"],
        "energy of the straight line": geo["objective_line"],
    }


def path_outcome_parts(report, path: GeodesicPath) -> tuple[list[Figure], list[tuple[str, str]]]:
    """The paths' plot and table."""

    def draw(file):
        report.plot(file, title="Paths between two trained networks (test set)")

    caption = (
        "Loss and accuracy along the geodesic (pullback metric), the straight line and the "
        "Bezier curve between the same two networks, on the test set"
    )
    return [Figure("paths.png", caption, draw)], [("Paths (test set)", report.table())]


def execute(job: ConnectJob, folder: RunFolder) -> Outcome:
    """The geodesic, the Bézier curve and their comparison, checkpointed in ``folder``; what to publish."""
    report, path = connect_paths(folder, job.net_a, job.net_b, job.data, job.options, job.minibatch)
    figures, tables = path_outcome_parts(report, path)
    geo = geodesic_numbers(path)
    return Outcome(
        title=f"riemfip connect: geodesic between two networks on {job.data.name}",
        summary={"geodesic": geodesic_summary(geo), "paths (test set)": path_summary(report)},
        results={"connectivity": report.to_dict(), "geodesic": geo},
        figures=figures,
        tables=tables,
        lines=[
            report.table(),
            iterations_line(geo),
        ],
    )
