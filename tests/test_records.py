"""One record convention: every result round-trips through JSON exactly, and the records
committed under ``benchmarks/results`` still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from riemfip.applications.continual import ContinualResult
from riemfip.applications.robust_ensemble import RobustnessResult, RobustnessRow
from riemfip.applications.sparsify import SparsifyResult, SparsifyRow
from riemfip.connectivity import ConnectivityReport, PathEvaluation
from riemfip.plotting import png_figure, pyplot
from riemfip.records import read_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _path_evaluation(name: str, energy: float | None) -> PathEvaluation:
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    return PathEvaluation(
        name, t, 1 / (t + 3), (t + 1) / 7, weight_length=2 / 3, energy=energy,
        function_length=None if energy is None else energy / 9,
    )  # fmt: skip


RESULTS_OF_EACH_KIND = {
    "continual": ContinualResult(
        "ewc", {"lam": 1e3}, "class", ["a", "b"], [[0, 1], [2, 3]],
        np.array([[90.125, 0.0], [1 / 3, 95.0]]), {"seed": 0, "shape": (2, 2)}, [0.5, 0.25],
        [{}, {"fisher_mean": 1e-7}],
    ),
    "sparsify": SparsifyResult(
        0.95, 0.99,
        [SparsifyRow("magnitude", 0.9, 0.9, 1 / 3, 0.95, 0),
         SparsifyRow("fip", 0.9, 0.9001, 0.94, 0.97, 10, {"seconds": 1.5})],
        {"architecture": "toy"},
    ),
    "robust_ensemble": RobustnessResult(
        [RobustnessRow("single", 1, {"name": "clean", "eps": 0.0}, 0.875),
         RobustnessRow("fip", 3, {"name": "pgd", "eps": 0.1, "steps": 20}, 1 / 7)],
        {"size": 3}, {"seconds": {"attacks": 2.5}},
    ),
    "connectivity": ConnectivityReport(
        {"geodesic": _path_evaluation("geodesic", 0.125), "line": _path_evaluation("line", None)},
        {"split": "test"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(RESULTS_OF_EACH_KIND))
def test_every_result_round_trips_exactly_through_text_and_file(kind, tmp_path):
    result = RESULTS_OF_EACH_KIND[kind]
    cls = type(result)
    text = result.to_json(tmp_path / "sub" / "r.json")
    assert (tmp_path / "sub" / "r.json").read_text() == text + "\n"
    assert json.loads(text)["application"] == kind
    for source in (text, tmp_path / "sub" / "r.json", str(tmp_path / "sub" / "r.json")):
        back = cls.from_json(source)
        assert type(back) is cls
        assert back.to_dict() == result.to_dict()
        assert back.to_json() == text


def test_round_trip_restores_arrays_tensors_and_nested_records():
    cont = RESULTS_OF_EACH_KIND["continual"]
    back = ContinualResult.from_json(cont.to_json())
    assert isinstance(back.accuracy, np.ndarray) and back.accuracy.dtype == np.float64
    assert np.array_equal(back.accuracy, cont.accuracy)
    assert back.forgetting == cont.forgetting
    report = RESULTS_OF_EACH_KIND["connectivity"]
    again = ConnectivityReport.from_json(report.to_json())
    for name, ev in report.paths.items():
        got = again[name]
        assert isinstance(got, PathEvaluation)
        for field in ("t", "loss", "accuracy"):
            assert getattr(got, field).dtype == torch.float64
            assert torch.equal(getattr(got, field), getattr(ev, field))
        assert got.summary() == ev.summary()
    sweep = SparsifyResult.from_json(RESULTS_OF_EACH_KIND["sparsify"].to_json())
    assert isinstance(sweep.rows[1], SparsifyRow) and sweep.rows[1].extra == {"seconds": 1.5}


def test_reading_the_wrong_thing_says_what_it_is(tmp_path):
    sparsify_text = RESULTS_OF_EACH_KIND["sparsify"].to_json()
    with pytest.raises(ValueError, match="'sparsify' record, not a 'robust_ensemble'"):
        RobustnessResult.from_json(sparsify_text)
    with pytest.raises(ValueError, match="not a ContinualResult record: it has no method"):
        ContinualResult.from_json('{"accuracy": [[1.0]]}')
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsifyResult.from_json("{'single': 'quotes'}")
    with pytest.raises(FileNotFoundError, match="no JSON record"):
        SparsifyResult.from_json(tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"no record under key 'val'.*\['test', 'train'\]"):
        ConnectivityReport.from_json('{"test": {}, "train": {}}', key="val")
    with pytest.raises(TypeError, match="JSON object, got list"):
        SparsifyResult.from_json("[1, 2]")
    with pytest.raises(TypeError, match="JSON text or a path"):
        read_json(3)


_COMMITTED = {
    "continual_": ContinualResult,
    "sparsify_": SparsifyResult,
    "robust_ensemble_": RobustnessResult,
}


@pytest.mark.parametrize(
    "file",
    sorted(
        p.name
        for p in RESULTS.glob("*.json")
        if p.name.startswith(tuple(_COMMITTED))
        and not p.name.endswith(("_summary.json", "_sweep.json", "_peers.json"))  # tables
    ),
)
def test_committed_benchmark_records_load_and_rewrite_to_the_same_json(file):
    cls = next(c for prefix, c in _COMMITTED.items() if file.startswith(prefix))
    stored = json.loads((RESULTS / file).read_text())
    record = cls.from_json(RESULTS / file)
    rewritten = record.to_dict()
    # records written before every record was tagged lack only the tag
    assert {k: v for k, v in rewritten.items() if k in stored} == stored
    assert set(rewritten) - set(stored) <= {"application"}


def test_the_committed_connectivity_file_holds_two_reports():
    file = RESULTS / "connectivity_mnist.json"
    stored = json.loads(file.read_text())
    for split in ("test", "train"):
        report = ConnectivityReport.from_json(file, key=split)
        assert "line" in report.paths and "bezier" in report.paths
        rewritten = report.to_dict()
        assert rewritten.pop("application") == "connectivity"
        assert rewritten == stored[split]


def test_png_figure_writes_the_file_and_closes_the_figure_even_when_drawing_fails(tmp_path):
    plt = pyplot()
    before = len(plt.get_fignums())
    with png_figure(tmp_path / "a" / "b.png", ncols=2, title="two panels") as (fig, axes):
        axes[0].plot([0, 1], [1, 0])
    assert (tmp_path / "a" / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RuntimeError, match="drawing failed"):
        with png_figure(tmp_path / "c.png"):
            raise RuntimeError("drawing failed")
    assert not (tmp_path / "c.png").exists()
    assert len(plt.get_fignums()) == before


def test_an_attack_config_is_a_record_too():
    from riemfip.applications.attacks import AttackConfig

    attack = AttackConfig.pgd(0.1, steps=7, seed=3)
    assert attack.to_dict() == {
        "name": "pgd", "eps": 0.1, "steps": 7, "step_size": 0.01, "random_start": True, "seed": 3,
    }  # fmt: skip
    assert AttackConfig.from_json(attack.to_json()) == attack
    with pytest.raises(ValueError, match="attack name"):
        AttackConfig.from_dict({**attack.to_dict(), "name": "cw"})
