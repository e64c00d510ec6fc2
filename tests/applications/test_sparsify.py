"""Global magnitude pruning: exact global masks, torch.nn.utils.prune compatibility, baselines."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from riemfip.applications.classifiers import accuracy
from riemfip.applications.sparsify import (
    SparsifyResult,
    apply_masks,
    global_magnitude_mask,
    one_shot_prune,
    prunable_weights,
    prune_finetune,
    weight_sparsity,
)


def _two_layer(scale_second: float) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
    with torch.no_grad():
        # |second-layer weights| >= scale_second / 10: above every first-layer weight when large.
        w = net[2].weight
        w.copy_(w.sign() * (w.abs() + 0.1) * scale_second)
    return net


def test_mask_prunes_exactly_the_smallest_weights_globally():
    net = _two_layer(100.0)  # second layer's weights dwarf the first's
    n1, n2 = 200, 50
    masks = global_magnitude_mask(net, 0.6)
    assert set(masks) == {"0.weight", "2.weight"}
    assert int(sum((~m).sum() for m in masks.values())) == round(0.6 * (n1 + n2))
    # Global ranking: all 150 pruned weights come from the small first layer.
    assert bool(masks["2.weight"].all()) and int(masks["0.weight"].sum()) == 50
    kept = net[0].weight.detach().abs()[masks["0.weight"]]
    pruned = net[0].weight.detach().abs()[~masks["0.weight"]]
    assert float(kept.min()) >= float(pruned.max())
    # Biases are not prunable.
    assert "0.bias" not in prunable_weights(net)


def test_apply_masks_gives_a_standard_pruned_module():
    net = _two_layer(1.0)
    x = torch.randn(7, 20)
    masks = global_magnitude_mask(net, 0.5)
    expected = nn.functional.linear(
        torch.relu(nn.functional.linear(x, net[0].weight * masks["0.weight"], net[0].bias)),
        net[2].weight * masks["2.weight"],
        net[2].bias,
    )
    apply_masks(net, masks)
    assert prune.is_pruned(net)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    assert weight_sparsity(net) == pytest.approx(0.5, abs=1 / 250)
    torch.testing.assert_close(net(x), expected)
    prune.remove(net[0], "weight")
    prune.remove(net[2], "weight")
    assert weight_sparsity(net) == pytest.approx(0.5, abs=1 / 250)
    torch.testing.assert_close(net(x), expected)


def test_finetune_keeps_the_mask_and_recovers_accuracy(trained_mlp, mnist_small):
    x, y, xt, yt = mnist_small
    shot = one_shot_prune(trained_mlp, 0.97)
    tuned = prune_finetune(trained_mlp, 0.97, x, y, steps=60, lr=3e-3)
    assert weight_sparsity(shot) == pytest.approx(0.97, abs=1e-4)
    assert weight_sparsity(tuned) == pytest.approx(0.97, abs=1e-4)
    # The fine-tuned mask is the one-shot mask.
    assert torch.equal(shot[0].weight_mask, tuned[0].weight_mask)
    assert accuracy(tuned, xt, yt) > accuracy(shot, xt, yt) + 0.05
    # The dense model was not touched.
    assert not prune.is_pruned(trained_mlp)


def test_bad_inputs_raise_clear_errors(trained_mlp):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_magnitude_mask(trained_mlp, 1.0)
    with pytest.raises(TypeError, match="number"):
        global_magnitude_mask(trained_mlp, "90%")
    with pytest.raises(TypeError, match="Module"):
        global_magnitude_mask(lambda x: x, 0.5)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        global_magnitude_mask(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="keys"):
        apply_masks(_two_layer(1.0), {"0.weight": torch.ones(10, 20, dtype=torch.bool)})
    pruned = one_shot_prune(trained_mlp, 0.5)
    with pytest.raises(ValueError, match="already pruned"):
        apply_masks(pruned, global_magnitude_mask(pruned, 0.6))


def test_result_round_trips_through_json(tmp_path):
    from riemfip.applications.sparsify import SparsifyRow

    res = SparsifyResult(
        0.95,
        0.99,
        [
            SparsifyRow("magnitude", 0.9, 0.9, 0.93, 0.95, 0),
            SparsifyRow("magnitude+finetune", 0.9, 0.9, 0.94, 0.97, 10),
        ],
        {"architecture": "toy"},
    )
    path = tmp_path / "r.json"
    data = json.loads(res.to_json(path))
    assert json.loads(path.read_text()) == data
    assert data["application"] == "sparsify" and len(data["rows"]) == 2
    back = SparsifyResult.from_json(path)
    assert back.row("magnitude+finetune", 0.9).test_accuracy == 0.94
    with pytest.raises(KeyError):
        back.row("fip", 0.9)
    assert res.plot(tmp_path / "r.png").stat().st_size > 1000
    assert "magnitude+finetune" in res.table()


def test_fip_path_makes_the_hard_mask_cheap(trained_mlp, mnist_small):
    from riemfip.applications.sparsify import fip_prune

    x, y, xt, yt = mnist_small
    shot = one_shot_prune(trained_mlp, 0.95)
    # The whole budget on the path, no fine-tuning: what the mask costs after the path.
    pruned, diag = fip_prune(trained_mlp, 0.95, x, y, steps=40, fip_steps=40, anchor_size=64)
    assert prune.is_pruned(pruned)
    assert weight_sparsity(pruned) == pytest.approx(0.95, abs=1e-4)
    assert diag["penalty_end"] < diag["penalty_start"]
    assert diag["finetune_steps"] == 0 and 0.0 <= diag["drift_agreement"] <= 1.0
    assert accuracy(pruned, xt, yt) > accuracy(shot, xt, yt) + 0.1
    with pytest.raises(ValueError, match="fip_steps"):
        fip_prune(trained_mlp, 0.9, x, y, steps=10, fip_steps=11)
    with pytest.raises(ValueError, match="anchor_size"):
        fip_prune(trained_mlp, 0.9, x, y, steps=10, fip_steps=5, anchor_size=1)


def test_sweep_writes_the_record_and_resumes_from_it(trained_mlp, mnist_small, tmp_path):
    from riemfip.applications.sparsify import sparsify_sweep
    from riemfip.data import Dataset

    x, y, xt, yt = mnist_small
    data = Dataset(x, y, xt, yt, 10, "mnist-small")
    ckpt = tmp_path / "sweep.json"
    kwargs = dict(steps=6, fip_steps=4, fip_settings={"anchor_size": 32}, checkpoint=ckpt)
    res = sparsify_sweep(trained_mlp, data, [0.5, 0.9], **kwargs)
    record = json.loads(ckpt.read_text())
    assert {"application", "dense_test_accuracy", "config", "rows"} <= set(record)
    assert record["config"]["fip"]["anchor_size"] == 32
    assert record["config"]["fip"]["fip_options"]["mode"] == "penalty"
    assert len(record["rows"]) == 6
    for row in record["rows"]:
        assert {"method", "target_sparsity", "sparsity", "test_accuracy", "steps"} <= set(row)
        assert row["sparsity"] == pytest.approx(row["target_sparsity"], abs=1e-3)
        assert row["steps"] == (0 if row["method"] == "magnitude" else 6)
    again = sparsify_sweep(trained_mlp, data, [0.5, 0.9], **kwargs)
    assert [r.extra["seconds"] for r in again.rows] == [r.extra["seconds"] for r in res.rows]
    # A checkpoint written with other settings is not reused.
    other = sparsify_sweep(trained_mlp, data, [0.5, 0.9], **{**kwargs, "steps": 7})
    assert all(r.steps in (0, 7) for r in other.rows)
    with pytest.raises(ValueError, match="methods"):
        sparsify_sweep(trained_mlp, data, [0.5], steps=2, fip_steps=1, methods=["random"])
    with pytest.raises(ValueError, match="fip_settings"):
        sparsify_sweep(trained_mlp, data, [0.5], steps=2, fip_steps=1, fip_settings={"lr_": 1})
    with pytest.raises(TypeError, match="Dataset"):
        sparsify_sweep(trained_mlp, (x, y), [0.5], steps=2, fip_steps=1)
