r"""Where the time of a FIP step goes, on a network trained on its old task (issue 9).

``fip_cost.py`` times whole steps from a fresh network; this script asks what a step
*consists of* once a run has settled, the case a user pays for over most of a run:

1. the model (``fip_cost.build_model``: the MLP 784-300-100-10 or LeNet-5) is trained by
   SGD on MNIST classes 0-4 (offline subset; ``--train-steps`` steps of batch 64);
2. ``FIP(net.parameters(), model=net, anchor_inputs=x_old)`` with every option at its
   default, ``x_old`` the first 50 training images of each old class (250, as in
   ``fip_cost.py``), steps ``--warm-steps`` times on batches of classes 5-9, and a copy
   of the trained network steps by SGD (lr 0.05) beside it;
3. ``--steps`` timed steps of each, in a random order per step, with process CPU time on
   one thread: the forward and backward pass (``zero_grad``, loss, ``backward``) and
   ``opt.step()`` separately for FIP, the whole step for SGD;
4. ``--steps`` more FIP steps under :mod:`torch.profiler`, read through the labels a path
   optimizer's step runs its parts under (:mod:`riemfip.optim.anchored`):

   ``anchors``
       drawing the step's fit anchors, their random neighbourhood, and scoring it by the
       frozen network (one forward pass over the batch of 32);
   ``step Jacobian``
       the factored Jacobian of the step's anchors (one forward pass, one batched backward
       pass per output direction);
   ``solves and products``
       the rest of the direction: the output Gram :math:`JJ^\top`, its Cholesky factor,
       :math:`J\nabla L`, :math:`J^\top z`, the pull-back on the step's anchors;
   ``all-anchor pull-back``
       the Gauss–Newton Cauchy step on every fit anchor (every 10th step; the mean over
       steps is what it costs per step);
   ``drift guard``
       the held-out drift at each candidate (one forward pass over the 50 held-out anchors
       per try: the first, and one per halving of the growth rule);
   ``rest``
       what ``step()`` does outside those: reading and writing the flat weights, checks,
       restoring the normalisation buffers, the step's info.

   Each part's share of the profiled ``step()`` is applied to the unprofiled mean
   ``step()`` time (the profiler slows small operations more than large ones, so the
   shares are approximate); the table gives each part in milliseconds and as a multiple
   of the SGD step;
5. ``--steps`` more FIP steps and SGD steps under the profiler with FLOP counting
   (``with_flops``), each operation's FLOPs given to the part whose label encloses it: the
   arithmetic of each part as a multiple of an SGD step's, which no implementation can
   beat without computing less. The profiler counts matrix products and forward
   convolutions but no convolution backward pass, so these figures are exact for the MLP
   and undercount both FIP and SGD on LeNet-5.

Run::

    PYTHONPATH=. python benchmarks/fip_step_anatomy.py                    # MLP and LeNet-5, batch 64/128/256
    PYTHONPATH=. python benchmarks/fip_step_anatomy.py --models lenet5 --batches 128

Writes ``benchmarks/results/fip_step_anatomy.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fip_cost import build_model  # noqa: E402
from fip_defaults import machine  # noqa: E402

#: Profiler labels of a FIP step's parts (riemfip.optim.anchored, riemfip.optim.fip).
LABELS = {
    "anchors": "riemfip.anchors",
    "direction": "riemfip.direction",
    "step_jacobian": "riemfip.step_jacobian",
    "all_anchor_pullback": "riemfip.all_anchor_pullback",
    "drift_guard": "riemfip.drift_guard",
}
#: The part each label names, by label.
PART_OF_LABEL = {label: name for name, label in LABELS.items()}
STEP = "Optimizer.step#FIP.step"
PARTS = (
    ("anchors", "anchors"),
    ("step_jacobian", "step Jacobian"),
    ("solves", "solves and products"),
    ("all_anchor_pullback", "all-anchor pull-back"),
    ("drift_guard", "drift guard"),
    ("rest", "rest"),
)
OLD_CLASSES, PER_CLASS = 5, 50
TRAIN_LR = {"mlp": 0.1, "lenet5": 0.05}
SGD_LR = 0.05


def tasks(model: str, seed: int):
    """``(x, y, old, new, x_old)``: the MNIST subset, indices of the old and new classes and
    the stored old inputs."""
    from riemfip.data import mnist_subset

    data = mnist_subset(flatten=model == "mlp")
    x, y = data.x_train, data.y_train
    old = torch.nonzero(y < OLD_CLASSES).flatten()
    new = torch.nonzero(y >= OLD_CLASSES).flatten()
    stored = [torch.nonzero(y == c).flatten()[:PER_CLASS] for c in range(OLD_CLASSES)]
    return x, y, old, new, x[torch.cat(stored)]


def sampler(pool: torch.Tensor, batch: int, gen: torch.Generator):
    return lambda: pool[torch.randint(len(pool), (batch,), generator=gen)]


def forward_backward(net, x, y) -> None:
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()


def halvings(scale: float) -> int:
    """Halvings of the growth rule behind a step's share ``scale`` of the secondary step."""
    return 0 if scale <= 0 else round(math.log2(1.0 / scale))


def measure(model: str, batch: int, args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y, old, new, x_old = tasks(model, args.seed)
    net = build_model(model)
    train = torch.optim.SGD(net.parameters(), lr=TRAIN_LR[model])
    old_batch = sampler(old, 64, gen)
    for _ in range(args.train_steps):
        i = old_batch()
        forward_backward(net, x[i], y[i])
        train.step()

    from riemfip.optim import FIP

    sgd_net = copy.deepcopy(net)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=SGD_LR)
    opt = FIP(net.parameters(), model=net, anchor_inputs=x_old)
    new_batch = sampler(new, batch, gen)
    for _ in range(args.warm_steps):
        i = new_batch()
        forward_backward(net, x[i], y[i])
        opt.step()
        forward_backward(sgd_net, x[i], y[i])
        sgd.step()

    sgd_ms, fb_ms, step_ms, halved = [], [], [], []

    def fip_step(xb, yb):
        t0 = time.process_time()
        forward_backward(net, xb, yb)
        t1 = time.process_time()
        opt.step()
        t2 = time.process_time()
        fb_ms.append(1e3 * (t1 - t0))
        step_ms.append(1e3 * (t2 - t1))
        halved.append(halvings(opt.last_info[0].scale))

    def sgd_step(xb, yb):
        t0 = time.process_time()
        forward_backward(sgd_net, xb, yb)
        sgd.step()
        sgd_ms.append(1e3 * (time.process_time() - t0))

    order = random.Random(args.seed)
    for _ in range(args.steps):
        i = new_batch()
        pair = [fip_step, sgd_step]
        order.shuffle(pair)
        for run in pair:
            run(x[i], y[i])

    def next_fip_step():
        i = new_batch()
        forward_backward(net, x[i], y[i])
        opt.step()

    def next_sgd_step():
        i = new_batch()
        forward_backward(sgd_net, x[i], y[i])
        sgd.step()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            next_fip_step()
    totals = {e.key: e.cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    profiled = {name: totals.get(label, 0.0) for name, label in LABELS.items()}
    profiled_step = totals[STEP]
    profiled["solves"] = (
        profiled["direction"] - profiled["step_jacobian"] - profiled["all_anchor_pullback"]
    )
    profiled["rest"] = profiled_step - (
        profiled["anchors"] + profiled["direction"] + profiled["drift_guard"]
    )

    fip_flops = flops_by_part(next_fip_step, args.steps)
    sgd_flops = sum(flops_by_part(next_sgd_step, args.steps).values())

    mean = lambda v: sum(v) / len(v)  # noqa: E731
    sgd_step_ms, step = mean(sgd_ms), mean(step_ms)
    parts = {name: step * profiled[name] / profiled_step for name, _ in PARTS}
    return {
        "model": model,
        "batch": batch,
        "sgd_step_ms": sgd_step_ms,
        "fip_forward_backward_ms": mean(fb_ms),
        "fip_step_call_ms": step,
        "fip_whole_step_ms": mean(fb_ms) + step,
        "ratio_of_means": (mean(fb_ms) + step) / sgd_step_ms,
        "halvings_per_step": mean(halved),
        "parts_ms": parts,
        "profiled_ms": {**profiled, "step": profiled_step},
        "sgd_step_flops": sgd_flops,
        "fip_flops": fip_flops,
    }


def part_of(event) -> str:
    """The part of a FIP step whose label encloses profiler ``event`` (``"outside"``: the
    forward and backward pass of the training loop; ``"rest"``: ``step()`` outside the
    labels)."""
    part, parent = "outside", event.cpu_parent
    while parent is not None:
        if parent.name in PART_OF_LABEL:
            return PART_OF_LABEL[parent.name]
        if parent.name == STEP:
            part = "rest"
        parent = parent.cpu_parent
    return part


def flops_by_part(step, steps: int) -> dict:
    """Mean FLOPs per call of ``step()`` by part (:func:`part_of`), as the profiler counts them."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            step()
    out: dict[str, float] = {}
    for event in prof.events():
        if event.flops:
            part = part_of(event)
            out[part] = out.get(part, 0.0) + event.flops / steps
    out["solves"] = out.pop("direction", 0.0)  # what no inner label of the direction holds
    return out


def table(rows: list[dict]) -> str:
    head = ["model", "batch", "SGD step ms", "FIP step ms", "ratio", "fwd+bwd"]
    head += [title for _, title in PARTS] + ["halvings/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        unit = r["sgd_step_ms"]
        cell = "{:.2f} ({:.2f}×)".format

        cells = [
            r["model"],
            str(r["batch"]),
            f"{unit:.2f}",
            f"{r['fip_whole_step_ms']:.2f}",
            f"{r['ratio_of_means']:.2f}",
            cell(r["fip_forward_backward_ms"], r["fip_forward_backward_ms"] / unit),
        ]
        cells += [cell(r["parts_ms"][n], r["parts_ms"][n] / unit) for n, _ in PARTS]
        cells.append(f"{r['halvings_per_step']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flops_table(rows: list[dict]) -> str:
    """Each part's FLOPs per step as a multiple of an SGD step's (see the module notes)."""
    parts = [p for p in PARTS if p[0] != "rest"]
    head = ["model", "batch", "SGD step MFLOP", "FIP's own work", *(t for _, t in parts)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        unit, f = r["sgd_step_flops"], r["fip_flops"]
        own = sum(f.get(n, 0.0) for n, _ in parts)
        name = r["model"] if r["model"] == "mlp" else r["model"] + " (undercounted)"
        cells = [name, str(r["batch"]), f"{unit / 1e6:.1f}", f"{own / unit:.2f}×"]
        cells += [f"{f.get(n, 0.0) / unit:.2f}×" for n, _ in parts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,lenet5", help="comma-separated: mlp, lenet5")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--warm-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fip_step_anatomy.json")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(TRAIN_LR))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(TRAIN_LR)}")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for model in models:
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(model, batch, args))
            print(f"{model} batch {batch}: ratio {rows[-1]['ratio_of_means']:.2f}", flush=True)
    print(table(rows))
    print()
    print(flops_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "torch": torch.__version__, "args": vars(args), "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
