"""Reset between gallery examples: each starts from the same seed, on the CPU."""

from __future__ import annotations


def reset_torch(gallery_conf, fname):
    """Before each example (sphinx-gallery ``reset_modules``): seed torch's global generator
    and run on one thread. The examples are small; on a shared 2-core machine two OpenMP
    threads spin against other jobs and ran one example 20x slower (2.3 s against 50 s)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
