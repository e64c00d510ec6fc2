r"""Standard image classifiers, built the same way every time.

The benchmarks and applications compare methods on a few reference networks; this
module builds them. Each builder returns a fresh, randomly initialised
:class:`torch.nn.Module` that maps a batch of images ``(N, C, H, W)`` to logits
``(N, num_classes)``.

:func:`lenet5`
    LeNet-5 (LeCun et al. 1998): two 5×5 convolutions with max pooling, then
    fully connected layers 120-84-``num_classes``, ReLU.
:func:`vgg11_cifar`
    The CIFAR variant of VGG11 (Simonyan & Zisserman 2015, configuration "A"):
    eight 3×3 convolutions and five 2×2 max pools reduce 32×32 inputs to a 512-vector,
    followed by one linear classifier.
:func:`resnet18`
    torchvision's ResNet-18 with random weights (its ImageNet stem is kept, so a
    32×32 input reaches the last block as a 1×1 map).
:func:`vgg16_cifar`
    The CIFAR variant of VGG16 (configuration "D"): thirteen 3×3 convolutions, the same
    five pools and one linear classifier.

The fully connected networks are :func:`riemfip.applications.classifiers.mlp`.
"""

from __future__ import annotations

from torch import nn

__all__ = ["lenet5", "resnet18", "vgg11_cifar", "vgg16_cifar"]

#: VGG11's convolution widths; ``"M"`` is a 2×2 max pool.
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
#: VGG16's (configuration "D").
VGG16_LAYERS = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Sequential:
    r"""LeNet-5: conv 6@5×5, pool, conv 16@5×5, pool, fully connected 120-84-``num_classes``.

    LeCun et al. fed LeNet-5 32×32 images (the 28×28 MNIST digits zero-padded by 2).
    The first convolution reproduces that: its zero padding is
    :math:`p = \max(0, \lfloor (32 - s)/2 \rfloor)` for inputs of side :math:`s`, so
    a 28×28 image is seen as a 32×32 one. With side :math:`s' = s + 2p` after padding,
    the feature maps are

    .. math::

        s' \xrightarrow{\text{conv 5×5}} s' - 4 \xrightarrow{\text{pool}}
        a = \lfloor (s' - 4)/2 \rfloor \xrightarrow{\text{conv 5×5}} a - 4
        \xrightarrow{\text{pool}} b = \lfloor (a - 4)/2 \rfloor,

    and the first fully connected layer takes :math:`16 b^2` features
    (:math:`b = 5` for even :math:`s \le 32`). Max pooling 2×2, ReLU after every
    layer but the last.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for MNIST, 3 for CIFAR).
    num_classes : int
        Output logits.
    input_size : int
        Side :math:`s` of the square input images.

    Returns
    -------
    torch.nn.Sequential
        ``(N, in_channels, s, s) -> (N, num_classes)``. 61,706 weights for
        ``lenet5()`` (MNIST), 62,006 for ``lenet5(3, 10, 32)`` (CIFAR).

    Raises
    ------
    TypeError, ValueError
        Arguments that are not positive ints.
    """
    in_channels = _positive_int("in_channels", in_channels)
    num_classes = _positive_int("num_classes", num_classes)
    side = _positive_int("input_size", input_size)
    padding = max(0, (32 - side) // 2)
    a = (side + 2 * padding - 4) // 2
    b = (a - 4) // 2  # >= 4: the padded side is at least 31
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * b * b, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def vgg11_cifar(num_classes: int = 10, batch_norm: bool = False) -> nn.Sequential:
    r"""VGG11 for 32×32 images: 3×3 convolutions 64-M-128-M-256-256-M-512-512-M-512-512-M, then 512 → ``num_classes``.

    Every convolution has padding 1 (the map keeps its size) and is followed by
    ReLU (with ``batch_norm``, by :class:`~torch.nn.BatchNorm2d` then ReLU); each
    ``M`` is a 2×2 max pool, so five of them take a 32×32 input to 1×1×512, which
    one linear layer maps to the logits. This is the CIFAR VGG of the
    mode-connectivity and continual-learning literature, not torchvision's ImageNet
    VGG11 (whose classifier alone has 119 M weights).

    Parameters
    ----------
    num_classes : int
        Output logits.
    batch_norm : bool
        Insert batch normalisation after every convolution.

    Returns
    -------
    torch.nn.Sequential
        ``(N, 3, 32, 32) -> (N, num_classes)``. 9,225,610 weights for
        ``vgg11_cifar()``, 9,231,114 with ``batch_norm=True``.

    Raises
    ------
    TypeError, ValueError
        A ``num_classes`` that is not a positive int.
    """
    return _vgg_cifar(VGG11_LAYERS, num_classes, batch_norm)


def vgg16_cifar(num_classes: int = 10, batch_norm: bool = False) -> nn.Sequential:
    r"""VGG16 for 32×32 images: 3×3 convolutions 64-64-M-128-128-M-256-256-256-M-512-512-512-M-512-512-512-M, then 512 → ``num_classes``.

    Built as :func:`vgg11_cifar` (padding 1, ReLU or batch norm then ReLU, 2×2 max
    pools, one linear classifier), with configuration "D" of Simonyan & Zisserman:
    thirteen convolutions instead of eight.

    Parameters
    ----------
    num_classes : int
        Output logits.
    batch_norm : bool
        Insert batch normalisation after every convolution.

    Returns
    -------
    torch.nn.Sequential
        ``(N, 3, 32, 32) -> (N, num_classes)``. 14,719,818 weights for
        ``vgg16_cifar()``, 14,728,266 with ``batch_norm=True``.

    Raises
    ------
    TypeError, ValueError
        A ``num_classes`` that is not a positive int.
    """
    return _vgg_cifar(VGG16_LAYERS, num_classes, batch_norm)


def _vgg_cifar(config: tuple, num_classes, batch_norm: bool) -> nn.Sequential:
    num_classes = _positive_int("num_classes", num_classes)
    layers: list[nn.Module] = []
    channels = 3
    for width in config:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(channels, width, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        channels = width
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18, random weights: ``torchvision.models.resnet18(weights=None, num_classes=...)``.

    Used here on 32×32 inputs as it is (7×7 stride-2 stem and max pool, so the last
    residual stage sees a 1×1 map before the adaptive average pool).

    Parameters
    ----------
    num_classes : int
        Output logits.

    Returns
    -------
    torch.nn.Module
        ``(N, 3, H, W) -> (N, num_classes)``; 11,181,642 weights for 10 classes.

    Raises
    ------
    TypeError, ValueError
        A ``num_classes`` that is not a positive int.
    """
    import torchvision

    num_classes = _positive_int("num_classes", num_classes)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)
