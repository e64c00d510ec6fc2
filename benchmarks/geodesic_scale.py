r"""Geodesic boundary-value problems at network scale: relax, then shoot, between two networks.

``--model mlp`` (default): two 784-300-100-10 tanh MLPs (266,610 weights) trained
from two seeds for a few epochs on the offline MNIST subset
(``riemfip.data.mnist_subset``).

``--model vgg11``: two CIFAR-style VGG11 (configuration "A": the eight 3x3
convolutions 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M with ReLU and
2x2 max-pooling, then one 512 -> 10 linear classifier; 9,225,610 weights). This
is not ``torchvision.models.vgg11``, whose 25088 -> 4096 -> 4096 classifier
alone holds 120 M of its 129 M weights, too big for geodesic solves on a CPU.
CIFAR-10 is not on disk, so the inputs are 32x32x3 images built from the same
MNIST subset (normalised, zero-padded 28 -> 32, the one channel repeated three
times). Each endpoint is trained *with* BatchNorm after every convolution
(``--train-steps`` SGD steps, momentum 0.9, batch 32, cosine learning rate) and
the BatchNorm layers are then folded into the convolutions' weights and biases,
so the geodesic runs on a BatchNorm-free network that computes exactly the
trained function and whose flat weights alone determine it (with BatchNorm kept,
the metric would evaluate every weight vector with the running statistics of
the first endpoint, which are wrong for the second).

The metric is the Fisher pullback of the outputs on ``--anchors`` training
images with damping ``--damping`` (:meth:`manifolds.PullbackMetric.from_module`,
which evaluates in eval mode). The script times one metric-vector product and
one geodesic acceleration against one forward+backward pass of the
cross-entropy loss on the anchor batch, runs :func:`manifolds.geodesic.relax`
(``--points`` points) and then :func:`manifolds.geodesic.shoot` started from the
relaxed path (finite-difference Newton–Krylov, accelerations by the metric's
own solver), and records wall time, iterations, residuals and lengths. Trained
weights are cached in ``--cache``; the shooting velocity is checkpointed after
each Newton step (``--resume`` continues from it) and, with ``--resume-relax``,
the relaxed points after relax (a later run starts relax from them), so an
interrupted run loses little. With ``--expmap-tols`` / ``--expmap-steps`` it also
times :math:`\exp_{w_0}(v_0)` from the relaxed :math:`v_0` by the adaptive flow and by
fixed RK4 steps, against an adaptive reference at ``--expmap-reference-tol``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/geodesic_scale.py [--dtype float64] [--anchors 32]
    OMP_NUM_THREADS=1 python benchmarks/geodesic_scale.py --model vgg11 \
        --out benchmarks/results/geodesic_scale_vgg11.json

Writes ``benchmarks/results/geodesic_scale.json`` unless ``--out`` is given.
Model-dependent defaults (``None`` below) are, for mlp / vgg11: dtype float64 /
float32, anchors 32 / 4, damping 1e-2 / 1e-1, points 9 / 5, relax-maxiter 300 /
50, steps 8 / 4, maxiter 10 / 3, krylov 20 / 5, op-timing repeats 0 / 3. (Runs 2 and 3 of the
VGG11 record used a benchmark-side guard against CG warm starts worse than zero;
:func:`manifolds.conjugate_gradient` now does this itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from manifolds import FlatModule, PullbackMetric
from manifolds.geodesic import relax, shoot
from riemfip.data import mnist_subset
from riemfip.networks import vgg11_cifar

HERE = Path(__file__).resolve().parent

#: VGG configuration "A" (Simonyan & Zisserman), CIFAR-style: 32x32 inputs end at 1x1x512.

#: Model-dependent defaults for options left at ``None``: (mlp, vgg11).
DEFAULTS = {
    "dtype": ("float64", "float32"),
    "anchors": (32, 4),
    "damping": (1e-2, 1e-1),
    "points": (9, 5),
    "relax_maxiter": (300, 50),
    "steps": (8, 4),
    "maxiter": (10, 3),
    "krylov": (20, 5),
    "op_timing": (0, 3),
}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10)
    )


@torch.no_grad()
def fold_batchnorm(net: nn.Sequential) -> nn.Sequential:
    """A BatchNorm-free VGG11 computing what ``net`` (with BatchNorm) computes in eval mode.

    Each ``Conv2d`` followed by ``BatchNorm2d`` becomes one ``Conv2d`` with weight
    :math:`W s` and bias :math:`(b - \\mu) s + \\beta`, :math:`s = \\gamma /
    \\sqrt{\\sigma^2 + \\epsilon}` per output channel (running statistics).
    """
    plain = vgg11_cifar(batch_norm=False)
    mods = list(net)
    pairs = [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    targets = [m for m in plain if isinstance(m, nn.Conv2d)]
    for (conv, bn), out in zip(pairs, targets, strict=True):
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected BatchNorm2d after {conv}, got {type(bn).__name__}")
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out.weight.copy_(conv.weight * s[:, None, None, None])
        out.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
    plain[-1].load_state_dict(net[-1].state_dict())
    return plain


def mnist_rgb32(x: torch.Tensor) -> torch.Tensor:
    """MNIST rows of 784 pixels in [0, 1] as normalised 3x32x32 images (CIFAR-shaped).

    Normalised with the MNIST mean 0.1307 and standard deviation 0.3081, then
    zero-padded by 2 pixels on each side and repeated over three channels.
    """
    img = (x.reshape(-1, 1, 28, 28) - 0.1307) / 0.3081
    img = nn.functional.pad(img, (2, 2, 2, 2))
    return img.expand(-1, 3, -1, -1).contiguous()


def train(seed: int, ds, epochs: int, cache: Path) -> nn.Module:
    """Train (or load from ``cache``) one MLP with Adam; returns it in float32."""
    torch.manual_seed(seed)
    net = mlp()
    file = cache / f"mlp_seed{seed}_ep{epochs}.pt"
    if file.exists():
        net.load_state_dict(torch.load(file, weights_only=True))
        return net
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(ds.x_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), file)
    return net


def train_vgg11(
    seed: int, x: torch.Tensor, y: torch.Tensor, steps: int, cache: Path, lr: float = 0.01
) -> nn.Module:
    """Train (or load from ``cache``) one VGG11 with BatchNorm, returned folded (float32).

    Parameters
    ----------
    seed : int
        Seeds the initialisation and the batch order.
    x, y : torch.Tensor
        Training images (N, 3, 32, 32) and labels.
    steps : int
        SGD steps (batch 32, momentum 0.9, weight decay 5e-4, cosine schedule from ``lr``).
    cache : pathlib.Path
        Folder of cached (folded) state dicts.

    Returns
    -------
    torch.nn.Sequential
        The BatchNorm-free network of :func:`fold_batchnorm`.
    """
    file = cache / f"vgg11_seed{seed}_steps{steps}_lr{lr}.pt"
    if file.exists():
        net = vgg11_cifar(batch_norm=False)
        net.load_state_dict(torch.load(file, weights_only=True))
        return net
    torch.manual_seed(seed)
    net = vgg11_cifar(batch_norm=True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    perm, pos = torch.randperm(len(x), generator=gen), 0
    for step in range(steps):
        if pos + 32 > len(perm):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos : pos + 32]
        pos += 32
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            print(f"vgg11 seed {seed}: step {step + 1} loss {float(loss.detach()):.3f}", flush=True)
    net.eval()
    plain = fold_batchnorm(net)
    with torch.no_grad():
        err = float((plain(x[:64]) - net(x[:64])).abs().max())
    if err > 1e-3:
        raise RuntimeError(f"BatchNorm folding changed the outputs by {err:.2e}")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(plain.state_dict(), file)
    return plain


def accuracy(metric, w, x, y, chunk: int | None = None) -> float:
    """Test accuracy of the network at flat weights ``w`` (in chunks of ``chunk`` inputs)."""
    chunk = len(x) if chunk is None else chunk
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            pred = metric.module(w, x[i : i + chunk], train=False).argmax(-1)
            hits += int((pred == y[i : i + chunk]).sum())
    return hits / len(x)


def time_operations(metric, net, w, v, x, y, repeats: int) -> dict:
    """Median wall time of one loss forward+backward, one ``matvec`` and one ``acceleration``.

    Rows run interleaved, ``repeats`` times after one warm-up round; ratios are
    medians of the per-repeat ratios to the loss step on the same anchor batch,
    by wall clock and by process CPU time (steadier on a shared machine with one
    thread).
    The acceleration is timed cold (no warm start), as the first solve of a flow.
    """
    net = net.to(w.dtype)
    params = list(net.parameters())

    def loss_step():
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(net(x), y).backward()

    info = {}

    def accel():
        info["res"] = metric.acceleration_result(w, v)

    rows = {"loss_forward_backward": loss_step, "matvec": lambda: metric.matvec(w, v)}
    rows["acceleration"] = accel
    times: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(repeats + 1):
        for name, fn in rows.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    def ratios(table):
        ref = table["loss_forward_backward"]
        return {
            k: statistics.median(a / b for a, b in zip(t, ref, strict=True))
            for k, t in table.items()
        }

    out = {
        "repeats": repeats,
        "batch": len(x),
        "seconds": {k: statistics.median(t) for k, t in times.items()},
        "ratio_to_loss_step": ratios(times),
        "cpu_seconds": {k: statistics.median(t) for k, t in cpu.items()},
        "cpu_ratio_to_loss_step": ratios(cpu),
        "acceleration_cg_iterations": info["res"].iterations,
        "acceleration_residual": info["res"].residual,
        "acceleration_method": info["res"].method,
    }
    it = max(info["res"].iterations, 1)
    out["acceleration_seconds_per_cg_iteration"] = out["seconds"]["acceleration"] / it
    return out


def time_expmap(metric, w0, v, tols, steps_list, reference_tol) -> dict:
    """``exp_{w0}(v)`` by the adaptive flow at each tol and by fixed RK4 steps: CPU seconds,
    accelerations, status and the endpoint's distance to an adaptive flow at ``reference_tol``."""
    from manifolds.geodesic import integrate_geodesic

    def run(**how):
        c0 = time.process_time()
        path = integrate_geodesic(metric, w0, v, **how)
        return path, time.process_time() - c0

    reference, ref_seconds = run(tol=reference_tol)
    rows = []
    settings = [{"tol": t} for t in tols] + [{"steps": k} for k in steps_list]
    for how in settings:
        path, seconds = run(**how)
        rows.append(
            how
            | {
                "cpu_seconds": seconds,
                "accelerations": path.solves,
                "status": path.status.name,
                "endpoint_error": float((path.end - reference.end).norm()),
                "rejected_steps": path.metadata.get("rejected_steps"),
            }
        )
        print("expmap", rows[-1], flush=True)
    return {
        "velocity": "relax v0 (the relaxed geodesic's initial velocity)",
        "reference": {
            "tol": reference_tol,
            "cpu_seconds": ref_seconds,
            "accelerations": reference.solves,
            "status": reference.status.name,
            "speed_drift_end": reference.metadata.get("speed_drift_end"),
        },
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "vgg11"], default="mlp")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None)
    parser.add_argument("--anchors", type=int, default=None)
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=3, help="mlp: training epochs")
    parser.add_argument("--train-steps", type=int, default=200, help="vgg11: SGD steps")
    parser.add_argument("--test-size", type=int, default=None, help="test images (default all)")
    parser.add_argument("--points", type=int, default=None, help="relax: points K")
    parser.add_argument("--relax-maxiter", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="shoot: RK4 steps")
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--maxiter", type=int, default=None, help="shoot: Newton iterations")
    parser.add_argument("--krylov", type=int, default=None, help="shoot: GMRES iterations per step")
    parser.add_argument("--cg-tol", type=float, default=None)
    parser.add_argument(
        "--solver", default="cg", help="metric solve for accelerations (cg, output, auto)"
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="shoot: endpoint tolerance")
    parser.add_argument(
        "--op-timing", type=int, default=None, help="repeats of the matvec/acceleration timing"
    )
    parser.add_argument(
        "--expmap-tols", type=float, nargs="*", default=[], help="adaptive exp tols to time"
    )
    parser.add_argument(
        "--expmap-steps", type=int, nargs="*", default=[], help="fixed RK4 exp steps to time"
    )
    parser.add_argument("--expmap-reference-tol", type=float, default=1e-9)
    parser.add_argument("--skip-shoot", action="store_true")
    parser.add_argument("--resume", action="store_true", help="start shoot from the checkpoint")
    parser.add_argument(
        "--resume-relax", action="store_true", help="start relax from its saved points"
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/riemfip-geodesic-cache"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "geodesic_scale.json")
    args = parser.parse_args(argv)
    which = 0 if args.model == "mlp" else 1
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[which])
    dtype = getattr(torch, args.dtype)

    ds = mnist_subset()
    t0 = time.perf_counter()
    if args.model == "mlp":
        nets = [train(seed, ds, args.epochs, args.cache) for seed in (0, 1)]
        x_train, x_test = ds.x_train, ds.x_test
    else:
        x_train, x_test = mnist_rgb32(ds.x_train), mnist_rgb32(ds.x_test)
        nets = [train_vgg11(s, x_train, ds.y_train, args.train_steps, args.cache) for s in (0, 1)]
    t_train = time.perf_counter() - t0
    nets = [n.to(dtype) for n in nets]
    anchors = x_train[: args.anchors].to(dtype)
    cg_tol = args.cg_tol if args.cg_tol is not None else (1e-8 if dtype == torch.float64 else 1e-5)
    metric = PullbackMetric.from_module(
        nets[0],
        anchors,
        output_metric="fisher",
        damping=args.damping,
        tol=cg_tol,
        maxiter=500,
        solver=args.solver,
        on_failure="ignore",
    )
    w0, w1 = metric.module.flatten(), FlatModule(nets[1]).flatten()
    test_size = len(x_test) if args.test_size is None else args.test_size
    xt, yt = x_test[:test_size].to(dtype), ds.y_test[:test_size]
    chunk = None if args.model == "mlp" else 250

    def acc(w):
        return accuracy(metric, w, xt, yt, chunk)

    report = {
        "config": vars(args) | {"cache": str(args.cache), "out": str(args.out)},
        "n_weights": w0.numel(),
        "train_seconds": t_train,
        "test_accuracy": [acc(w) for w in (w0, w1)],
        "euclidean_distance": float((w1 - w0).norm()),
        "threads": torch.get_num_threads(),
    }
    if args.model == "vgg11":
        report["model"] = (
            "CIFAR-style VGG11 (config A, 8 conv + Linear(512, 10)), trained with BatchNorm, "
            "BatchNorm folded into the convolutions; inputs MNIST-5k padded to 3x32x32"
        )
        report["test_size"] = test_size
        report["torch"] = torch.__version__
    print(json.dumps(report, indent=1), flush=True)

    if args.op_timing:
        import copy

        ref = copy.deepcopy(nets[0])
        report["operation_timing"] = time_operations(
            metric, ref, w0, w1 - w0, anchors, ds.y_train[: args.anchors], args.op_timing
        )
        print("operation timing", report["operation_timing"], flush=True)

    # cost of one acceleration (CG solve) at w0 along the straight line
    t0 = time.perf_counter()
    res = metric.acceleration_result(w0, w1 - w0)
    report["acceleration"] = {
        "seconds": time.perf_counter() - t0,
        "cg_iterations": res.iterations,
        "residual": res.residual,
        "method": res.method,
    }
    print("acceleration", report["acceleration"], flush=True)

    tag = "" if args.model == "mlp" else f"{args.model}_"
    relax_ckpt = args.cache / (
        f"{tag}relax_{args.dtype}_{args.anchors}_{args.damping}_{args.points}.pt"
    )
    init, earlier = None, {"iterations": 0, "seconds": 0.0}
    if args.resume_relax and relax_ckpt.exists():
        saved = torch.load(relax_ckpt, weights_only=True)
        if isinstance(saved, dict):
            init, earlier = saved["points"], {k: saved[k] for k in earlier}
        else:  # a bare tensor of points (first version of this checkpoint)
            init, earlier = saved, {"iterations": None, "seconds": None}
    t0, c0 = time.perf_counter(), time.process_time()
    rpath = relax(metric, w0, w1, args.points, init=init, maxiter=args.relax_maxiter)
    t_relax = time.perf_counter() - t0
    if args.resume_relax:
        total = {
            k: None if earlier[k] is None else earlier[k] + now
            for k, now in (("iterations", rpath.iterations), ("seconds", t_relax))
        }
        torch.save({"points": rpath.points} | total, relax_ckpt)
    report["relax"] = {
        "seconds": t_relax,
        "cpu_seconds": time.process_time() - c0,
        "iterations": rpath.iterations,
        "residual": rpath.residual,
        "tol": rpath.tol,
        "converged": rpath.converged,
        "message": rpath.message,
        "length": rpath.length,
        "energy": rpath.energy,
        "objective_line": rpath.metadata["objective_line"],
        "objective": rpath.metadata["objective"],
        "speed_spread": rpath.metadata["speed_spread"],
        "midpoint_test_accuracy": acc(rpath.at(0.5)),
        "line_midpoint_test_accuracy": acc(0.5 * (w0 + w1)),
    }
    if args.model == "vgg11":
        report["relax"]["resumed_from_saved_points"] = init is not None
        report["relax"]["earlier_runs"] = earlier
        with torch.no_grad():
            line_len = float(metric.norm(0.5 * (w0 + w1), w1 - w0))
        report["straight_line_midpoint_rule"] = {
            "length": line_len,
            "energy": 0.5 * line_len**2,
            "rule": "|w1 - w0|_g at the midpoint (one segment); relax's K-point rule is "
            "relax.length_line / energy_line",
        }
        line = relax(metric, w0, w1, args.points, maxiter=0)
        report["relax"]["length_line"] = line.length
        report["relax"]["energy_line"] = line.energy
    print("relax", report["relax"], flush=True)
    if args.expmap_tols or args.expmap_steps:
        report["expmap"] = time_expmap(
            metric, w0, rpath.v0, args.expmap_tols, args.expmap_steps, args.expmap_reference_tol
        )
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if args.skip_shoot:
        return 0

    ckpt = args.cache / f"{tag}shoot_v0_{args.dtype}_{args.anchors}_{args.damping}_{args.steps}.pt"
    resumed = bool(args.resume and ckpt.exists())
    earlier_shoots = []
    if resumed and args.model == "vgg11" and previous.get("shoot"):
        keep = ("seconds", "iterations", "flows", "residual", "defect_history", "converged")
        prev = previous["shoot"]
        earlier_shoots = prev.get("earlier_runs", []) + [{k: prev.get(k) for k in keep}]
    v_start = torch.load(ckpt, weights_only=True) if resumed else rpath.v0
    t0, c0 = time.perf_counter(), time.process_time()
    path = shoot(
        metric,
        w0,
        w1,
        v0=v_start,
        steps=args.steps,
        segments=args.segments,
        tol=args.tol,
        maxiter=args.maxiter,
        krylov_maxiter=args.krylov,
        verbose=True,
        callback=lambda it, v, rn: torch.save(v, ckpt),
    )
    torch.save(path.v0, ckpt)
    report["shoot"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "load_average_1min": os.getloadavg()[0],
        "seconds_including_relax": time.perf_counter() - t0 + report["relax"]["seconds"],
        "iterations": path.iterations,
        "flows": path.metadata["flows"],
        "residual": path.residual,
        "relative_residual": path.metadata["relative_residual"],
        "tol": path.tol,
        "converged": path.converged,
        "message": path.message,
        "length": path.length,
        "defect_history": path.metadata["defect_history"],
        "speed_drift_end": path.metadata["speed_drift_end"],
        "midpoint_test_accuracy": acc(path.at(0.5)),
        "resumed": resumed,
    }
    if args.model == "vgg11":
        report["shoot"]["earlier_runs"] = earlier_shoots
        report["shoot"]["total_seconds_all_runs"] = report["shoot"]["seconds"] + sum(
            r["seconds"] for r in earlier_shoots
        )
        report["shoot"]["total_iterations_all_runs"] = path.iterations + sum(
            r["iterations"] for r in earlier_shoots
        )
        report["shoot"]["energy"] = path.energy
        report["shoot"]["max_solve_residual"] = path.max_solve_residual
        report["shoot"]["endpoint_test_accuracy"] = acc(path.points[-1])
    print("shoot", report["shoot"], flush=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
