"""Robust ensembles: the FIP path does what its objective says, the record has its fields."""

import json

import pytest
import torch

from riemfip.applications.attacks import AttackConfig, ensemble_loss, pgd, robust_accuracy
from riemfip.applications.classifiers import accuracy, mlp
from riemfip.applications.robust_ensemble import (
    RobustnessResult,
    compare_ensembles,
    default_attacks,
    diversification_loss,
    fip_ensemble,
    independent_ensemble,
)
from riemfip.checkpoint import SettingsMismatchError, load_checkpoint
from riemfip.data import Dataset


def test_fip_members_learn_the_previous_members_adversarial_examples(trained_mlp, mnist_small):
    x, y, xt, yt = mnist_small
    members, diag = fip_ensemble(
        trained_mlp,
        x,
        y,
        size=2,
        steps_per_member=60,
        anchor_size=64,
        attack_steps=3,
        fip_options={"mode": "penalty", "beta": 0.3},
    )
    assert len(members) == 2 and diag["path_steps"] == 60
    assert torch.equal(members[0][0].weight, trained_mlp[0].weight)
    adv = pgd(trained_mlp, xt, yt, 0.1, steps=5, seed=7)
    # The new member classifies member 0's adversarial test examples better than member 0 ...
    assert (
        ensemble_loss(members[1], adv, yt).mean() < 0.9 * ensemble_loss(members[0], adv, yt).mean()
    )
    # ... while its clean predictions stay close to member 0's.
    with torch.no_grad():
        agree = (members[1](xt).argmax(-1) == members[0](xt).argmax(-1)).float().mean()
    assert float(agree) > 0.85
    assert accuracy(members[1], xt, yt) > accuracy(members[0], xt, yt) - 0.05


def test_disagree_objective_ignores_inputs_where_members_are_right(trained_mlp, mnist_small):
    _, _, xt, yt = mnist_small
    # With eps = 0 the "adversarial" inputs are the clean ones; only misclassified ones count.
    loss = diversification_loss(trained_mlp, [trained_mlp], xt, yt, objective="disagree", eps=0.0)
    with torch.no_grad():
        p = torch.softmax(trained_mlp(xt), -1)
    wrong = p.argmax(-1) != yt
    expected = -torch.log1p(-p.max(-1).values[wrong].clamp(max=1 - 1e-6)).sum() / len(yt)
    torch.testing.assert_close(loss, expected)


def test_adversarially_trained_members_resist_pgd(mnist_small):
    x, y, xt, yt = mnist_small
    train = AttackConfig.pgd(0.1, steps=3, step_size=0.04)
    (plain,) = independent_ensemble(lambda: mlp([784, 32, 10]), x, y, size=1, steps=150, lr=3e-3)
    (robust,) = independent_ensemble(
        lambda: mlp([784, 32, 10]), x, y, size=1, steps=150, lr=3e-3, adversarial=train
    )
    # Same seed, same minibatches: the only difference is the attacked half of each batch.
    attack = AttackConfig.pgd(0.1, steps=10, seed=5)
    # measured: PGD accuracy 0.63 against 0.23, clean 0.88 against 0.875
    assert robust_accuracy(robust, xt, yt, attack) > robust_accuracy(plain, xt, yt, attack) + 0.2
    assert accuracy(robust, xt, yt) > accuracy(plain, xt, yt) - 0.05
    with pytest.raises(TypeError, match="AttackConfig"):
        independent_ensemble(lambda: mlp([784, 8, 10]), x, y, size=1, steps=1, adversarial=0.1)


def _compare(data, **kwargs):
    """``compare_ensembles`` of 784-16-10 MLPs, 2 members, 20 training steps, 3 path steps
    between members, 32 anchors, clean accuracy only; ``kwargs`` override."""
    small = dict(
        size=2,
        train_steps=20,
        steps_per_member=3,
        attacks=[AttackConfig.clean()],
        fip_settings={"anchor_size": 32, "attack_steps": 2},
    )
    return compare_ensembles(lambda: mlp([784, 16, 10]), data, **{**small, **kwargs})


def test_compare_ensembles_end_to_end_record(mnist_small, tmp_path):
    x, y, xt, yt = mnist_small
    data = Dataset(x, y, xt[::2], yt[::2], 10, "mnist-small")
    result = _compare(
        data,
        attacks=default_attacks([0.1], pgd_steps=3),
        checkpoint_dir=tmp_path / "ckpt",
        adversarial_training=AttackConfig.pgd(0.1, steps=2),
    )
    record = json.loads(result.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == record
    assert record["application"] == "robust_ensemble"
    assert {(r["model"], r["size"]) for r in record["rows"]} == {
        ("single", 1),
        ("independent", 2),
        ("fip", 2),
        ("independent-adv", 2),
    }
    assert record["config"]["adversarial_training"]["steps_per_member"] == 20
    assert len(record["diagnostics"]["member_clean_accuracy"]["independent-adv"]) == 2
    pgd_cfg = next(a for a in record["config"]["attacks"] if a["name"] == "pgd")
    assert pgd_cfg == {
        "name": "pgd",
        "eps": 0.1,
        "steps": 3,
        "step_size": pytest.approx(0.01),
        "random_start": True,
        "seed": 0,
    }
    assert record["config"]["fip"]["anchor_size"] == 32
    assert record["config"]["fip"]["fip_options"] == {"mode": "natural"}
    assert len(record["diagnostics"]["member_clean_accuracy"]["fip"]) == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in record["rows"])
    assert result.plot(tmp_path / "r.png").stat().st_size > 1000
    back = RobustnessResult.from_json(tmp_path / "r.json")
    assert back.accuracy("fip", "pgd", 0.1) == result.accuracy("fip", "pgd", 0.1)
    # The checkpointed members are reused: same networks, same numbers.
    again = _compare(data, checkpoint_dir=tmp_path / "ckpt")
    assert again.accuracy("fip", "clean") == result.accuracy("fip", "clean")
    assert again.diagnostics["fip_path"] == result.diagnostics["fip_path"]


def test_bad_inputs_raise_clear_errors(trained_mlp, mnist_small):
    x, y, xt, yt = mnist_small
    with pytest.raises(ValueError, match="size"):
        fip_ensemble(trained_mlp, x, y, size=0, steps_per_member=1)
    with pytest.raises(ValueError, match="objective"):
        fip_ensemble(trained_mlp, x, y, size=2, steps_per_member=1, objective="chaos")
    with pytest.raises(TypeError, match="Module"):
        fip_ensemble(lambda z: z, x, y, size=2, steps_per_member=1)
    data = Dataset(x, y, xt, yt, 10, "mnist-small")
    with pytest.raises(ValueError, match="fip_settings"):
        _compare(data, fip_settings={"learning_rate": 1.0})
    with pytest.raises(TypeError, match="Dataset"):
        _compare((x, y))


def test_an_interrupted_comparison_resumes_to_the_uninterrupted_result(
    mnist_small, tmp_path, monkeypatch
):
    from riemfip.applications import robust_ensemble

    x, y, xt, yt = mnist_small
    data = Dataset(x[:300], y[:300], xt[:100], yt[:100], 10, "mnist-tiny")
    attacks = [AttackConfig.clean(), AttackConfig.fgsm(0.1)]
    full = _compare(data, attacks=attacks)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # The job dies while it builds the FIP path: the independent members are saved by then.
    monkeypatch.setattr(robust_ensemble, "diversification_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        _compare(data, attacks=attacks, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "independent.pt").step == 2
    assert not (tmp_path / "fip.pt").exists()
    resumed = _compare(data, attacks=attacks, checkpoint_dir=tmp_path)
    assert resumed.rows == full.rows
    for key in ("member_clean_accuracy", "fip_path"):
        assert resumed.diagnostics[key] == full.diagnostics[key]
    # A rerun with another training budget is refused, and says which setting differs.
    with pytest.raises(SettingsMismatchError, match="its steps is 20, this call's is 21"):
        _compare(data, attacks=attacks, checkpoint_dir=tmp_path, train_steps=21)
