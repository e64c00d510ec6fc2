"""FGSM and PGD: the threat model's constraints, attack strength ordering, and input checks."""

import pytest
import torch

from riemfip.applications.attacks import (
    AttackConfig,
    ensemble_loss,
    fgsm,
    pgd,
    robust_accuracy,
)
from riemfip.applications.classifiers import accuracy, mlp

EPS = 0.1


def test_perturbations_stay_in_the_ball_and_the_box(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    for adv in (
        fgsm(trained_mlp, x, y, EPS),
        pgd(trained_mlp, x, y, EPS, steps=5, step_size=0.05, seed=1),
        pgd(trained_mlp, x, y, EPS, steps=3, step_size=0.04, random_start=False),
    ):
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert float((adv - x).abs().max()) <= EPS + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float((adv - x).abs().max()) > EPS / 2  # it did move


def test_pgd_is_stronger_than_fgsm_which_beats_clean(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    clean = ensemble_loss(trained_mlp, x, y).mean()
    l_fgsm = ensemble_loss(trained_mlp, fgsm(trained_mlp, x, y, EPS), y).mean()
    l_pgd = ensemble_loss(
        trained_mlp, pgd(trained_mlp, x, y, EPS, steps=10, step_size=0.025), y
    ).mean()
    assert clean < l_fgsm < l_pgd
    acc_clean = accuracy(trained_mlp, x, y)
    acc_pgd = robust_accuracy(trained_mlp, x, y, AttackConfig.pgd(EPS, steps=10))
    assert acc_pgd < acc_clean - 0.2


def test_ensemble_attack_targets_the_mean_softmax(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    # An ensemble of two copies has the same mean softmax, hence the same attack.
    a1 = fgsm(trained_mlp, x, y, EPS)
    a2 = fgsm([trained_mlp, trained_mlp], x, y, EPS)
    assert torch.equal(a1, a2)
    # A plain callable works as a member.
    a3 = fgsm(lambda z: trained_mlp(z), x, y, EPS)
    assert torch.equal(a1, a3)


def test_pgd_random_start_is_seeded(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    a = pgd(trained_mlp, x, y, EPS, steps=2, seed=3)
    b = pgd(trained_mlp, x, y, EPS, steps=2, seed=3)
    c = pgd(trained_mlp, x, y, EPS, steps=2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_inputs_raise_clear_errors(trained_mlp, mnist_small):
    _, _, x, y = mnist_small
    with pytest.raises(ValueError, match="eps"):
        fgsm(trained_mlp, x, y, -0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(trained_mlp, x * 2 + 0.5, y, 0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(trained_mlp, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="labels"):
        fgsm(trained_mlp, x, y[:-1], 0.1)
    with pytest.raises(TypeError, match="integer"):
        fgsm(trained_mlp, x, y.float(), 0.1)
    with pytest.raises(ValueError, match="at least one"):
        fgsm([], x, y, 0.1)
    with pytest.raises(ValueError, match="attack name"):
        AttackConfig("cw", 0.1)
    with pytest.raises(TypeError, match="AttackConfig"):
        robust_accuracy(trained_mlp, x, y, {"name": "pgd"})
    with pytest.raises(ValueError, match="sizes"):
        mlp([784])
