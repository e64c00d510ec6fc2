r"""What mixed precision (:class:`manifolds.MixedPrecision`) costs or saves on this machine.

For LeNet-5 (batch 128) and a CIFAR VGG11 (batch 32), Fisher output metric: CPU time, one
thread, of a metric-vector product (median of ``--repeats`` after one untimed call) and of
building and factoring the output-space Gram matrix on 16 inputs and one solve with it,
for three settings: everything in float32; bfloat16 products (``MixedPrecision()``);
float32 products with float64 solves (``MixedPrecision(products=None)``). Each setting's
answers against float32's are in ``tests/test_precision.py``; this is only the cost.

Usage::

    PYTHONPATH=. python benchmarks/precision_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from manifolds import MixedPrecision, PullbackMetric
from riemfip.networks import lenet5, vgg11_cifar

SETTINGS = {
    "float32": None,
    "bfloat16 products": MixedPrecision(),
    "float64 solves": MixedPrecision(products=None),
}


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    print(f"{platform.processor() or platform.machine()}; avx512_bf16: {'avx512_bf16' in flags}")
    print("| model | setting | matvec (ms) | Gram + solve, 16 inputs (ms) |")
    print("|---|---|---|---|")
    cases = [
        ("LeNet-5, batch 128", lenet5(), torch.randn(128, 1, 28, 28)),
        ("VGG11, batch 32", vgg11_cifar(), torch.randn(32, 3, 32, 32)),
    ]
    for name, net, x in cases:
        net.eval()
        for label, precision in SETTINGS.items():
            options = {"output_metric": "fisher", "damping": 1e-3, "precision": precision}
            metric = PullbackMetric.from_module(net, x, **options)
            w = metric.module.flatten()
            v = torch.randn_like(w)
            metric.matvec(w, v)

            def product(metric=metric, w=w, v=v):
                metric.matvec(w, v)

            matvec = statistics.median(cpu_seconds(product) for _ in range(args.repeats))
            small = PullbackMetric.from_module(net, x[:16], **options)

            def gram_solve(small=small, w=w):
                gram = small.output_gram(w)
                gram.solve(torch.ones(gram.size))

            gram = statistics.median(cpu_seconds(gram_solve) for _ in range(args.repeats))
            print(f"| {name} | {label} | {1e3 * matvec:.0f} | {1e3 * gram:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
