"""Reference networks: output shapes and the published parameter counts."""

from __future__ import annotations

import pytest
import torch

from riemfip.applications.classifiers import mlp
from riemfip.networks import lenet5, resnet18, vgg11_cifar, vgg16_cifar


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("build", "x_shape", "weights"),
    [
        (lambda: lenet5(), (2, 1, 28, 28), 61_706),  # LeCun et al. 1998 (MNIST padded to 32)
        (lambda: lenet5(3, 10, 32), (2, 3, 32, 32), 62_006),  # the CIFAR LeNet-5
        (lambda: vgg11_cifar(), (2, 3, 32, 32), 9_225_610),
        (lambda: vgg11_cifar(batch_norm=True), (2, 3, 32, 32), 9_231_114),
        (lambda: vgg16_cifar(), (2, 3, 32, 32), 14_719_818),
        (lambda: vgg16_cifar(batch_norm=True), (2, 3, 32, 32), 14_728_266),
        (lambda: resnet18(), (2, 3, 32, 32), 11_181_642),
        (lambda: mlp([784, 300, 100, 10]), (2, 784), 266_610),  # LeNet-300-100
    ],
)
def test_output_shape_and_parameter_count(build, x_shape, weights):
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():
        out = net(torch.randn(x_shape))
    assert out.shape == (x_shape[0], 10)
    assert count(net) == weights


def test_lenet5_counts_follow_classes_and_channels():
    # only the first conv (in_channels) and the last layer (num_classes) change
    assert count(lenet5(in_channels=3)) - count(lenet5()) == 2 * 6 * 25
    assert count(lenet5(num_classes=5)) - count(lenet5()) == -5 * (84 + 1)
    assert lenet5(input_size=20)(torch.zeros(1, 1, 20, 20)).shape == (1, 10)
    assert lenet5(input_size=64)(torch.zeros(1, 1, 64, 64)).shape == (1, 10)


def test_vgg11_has_eight_convolutions_and_five_pools():
    net = vgg11_cifar(num_classes=100)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net) == 5
    assert net[-1].out_features == 100


def test_vgg16_has_thirteen_convolutions_and_five_pools():
    net = vgg16_cifar(num_classes=100)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net) == 5
    assert net[-1].out_features == 100


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: lenet5(in_channels=0), ValueError),
        (lambda: lenet5(input_size=28.0), TypeError),
        (lambda: vgg11_cifar(num_classes=True), TypeError),
        (lambda: vgg16_cifar(num_classes=0), ValueError),
        (lambda: resnet18(num_classes=-1), ValueError),
    ],
)
def test_bad_arguments_raise(call, error):
    with pytest.raises(error):
        call()
