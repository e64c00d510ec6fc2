"""Reset between gallery examples: each starts from the same seed, on the CPU."""

from __future__ import annotations


def reset_torch(gallery_conf, fname):
    """Before each example (sphinx-gallery ``reset_modules``): seed torch's global generator
    and run on one thread. The examples are small; on a shared 2-core machine two OpenMP
    threads spin against other jobs and ran one example 20x slower (2.3 s against 50 s)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)


#: The gallery's reading order: from the closed-form sphere to the applications.
ORDER = (
    "plot_sphere_geodesics.py",
    "plot_natural_gradient.py",
    "plot_spectrum.py",
    "plot_mode_connectivity.py",
    "plot_continual.py",
    "plot_sparsity.py",
)


class ExampleOrder:
    """sphinx-gallery ``within_subsection_order``: :data:`ORDER`, then any other example by
    file name."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename: str):
        return (ORDER.index(filename) if filename in ORDER else len(ORDER), filename)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
