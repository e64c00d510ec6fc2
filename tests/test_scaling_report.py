"""``benchmarks/scaling.py``'s report: the slope fit, and the committed record still gives
its tables and plot (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RECORD = BENCHMARKS / "results" / "scaling.json"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", BENCHMARKS / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scaling", module)
    spec.loader.exec_module(module)
    return module


def test_fit_recovers_a_power_law(scaling):
    xs = [32, 64, 128, 256, 512]
    f = scaling.fit(xs, [3e-4 * x**1.25 for x in xs])
    assert f["slope"] == pytest.approx(1.25)
    assert f["upper_slope"] == pytest.approx(1.25)


def test_committed_record_gives_every_table_and_the_plot(scaling, tmp_path):
    result = json.loads(RECORD.read_text())
    text = scaling.summary(result)
    for heading in ("**1.", "**2.", "**3.", "**5."):
        assert heading in text
    assert "None" not in text and "nan" not in text
    assert scaling.slopes(result["rows"]).keys() == result["slopes"].keys()
    scaling.plot(result, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
