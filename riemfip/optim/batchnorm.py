"""BatchNorm under a path optimizer: the old task's running statistics, used as well as kept.

FIP keeps the running statistics of every normalisation layer at the old task's values (they
are restored after each step; :mod:`riemfip.optim.anchored`), because the anchor outputs were
frozen with them. A new-task forward pass in train mode normalises by *batch* statistics, which
the network is then never evaluated with: on a BatchNorm CNN (``benchmarks/fip_defaults.py
--problems bn-cnn-digits``) the new task was learned to 98% under batch statistics and to 0%
in eval mode. So the new task must be learned with the layers in eval mode, normalising by the
statistics it will be evaluated with: :func:`batchnorm_eval` after ``model.train()``.
:class:`PathOptimizer` warns (:class:`BatchNormWarning`, once) when it steps while one of the
model's BatchNorm layers is in train mode.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormWarning", "batchnorm_eval", "batchnorm_in_train_mode"]


class BatchNormWarning(UserWarning):
    """A path optimizer stepped after a forward pass that normalised by batch statistics."""


def batchnorm_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics, not the batch's),
    leaving the other layers' modes (Dropout) as they are; returns ``model``.

    Call it after ``model.train()`` in a loop stepped by FIP::

        model.train()
        batchnorm_eval(model)
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
    return model


def batchnorm_in_train_mode(model: nn.Module) -> list[str]:
    """Names of ``model``'s BatchNorm layers that would normalise by batch statistics now."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        and module.training
        and module.track_running_stats
        and module.running_mean is not None
    ]
