"""The traceability evaluation in its reduced (digits) configuration: the box, 5 licensees, leaked and
innocent students, traced for real (slow: trains about 20 small students)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdb_core.evaluate import reduced_config
from sdb_core.trace_eval import trace_evaluate
from sdb_core.trace_report import check_trace_targets
from sdb_core.trace_setup import reduced_trace_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("trace")
    trace_evaluate(reduced_config("digits"), reduced_trace_config("digits"), out, command="pytest")
    assert (Path(out) / "traceability.json").is_file()
    assert "| family | transfer |" in (Path(out) / "traceability.md").read_text()
    return json.loads((Path(out) / "traceability.json").read_text())


@pytest.mark.parametrize("probes", ["fresh", "own images"])
def test_innocent_students_accuse_nobody(report: dict, probes: str) -> None:
    """Threshold: at corrected p < 1e-3, no accusation in >= 99 % of (innocent student, watermark) tests
    (seed 0; 4 innocent students x 5 watermarks here, so any accusation fails), on fresh probes and on the
    images the students were taught on."""
    innocent = report["result"]["innocent"]
    assert {r["student"] for r in innocent} == {"scratch", "label_only", "normal_kd", "clean_kd"}
    traces = [r if probes == "fresh" else r["own_images"] for r in innocent]
    tests = sum(len(r["z"]) for r in traces)
    accused = sum(len(r["named"]) for r in traces)
    assert tests == 20
    assert accused / tests <= 0.01


def test_decoys_hold_the_nominal_rate_on_innocent_students(report: dict) -> None:
    """Decoy false-positive rate at alpha = 1e-3 (200 decoys per trace, 4 innocent students): at most 2 %
    per trace (4 decoys of 200; expected 0.2), on fresh probes and on the students' own images."""
    for r in report["result"]["innocent"]:
        assert r["decoy_fpr"] <= 0.02, r
        assert r["own_images"]["decoy_fpr"] <= 0.02, r["own_images"]


def test_top1_identical_and_report_complete(report: dict) -> None:
    result = report["result"]
    assert result["top1_identical"] is True
    assert len(result["leaked"]) == 3 and all("leakers" in r for r in result["leaked"])
    assert all(r["own_images"]["probes"] == 500 for r in result["leaked"])  # own_probes, one set for all
    assert report["command"] == "pytest" and report["checks"] == check_trace_targets(result, 0)
