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
    (seed 0; 5 innocent students x 5 watermarks here, so any accusation fails), on fresh probes and on the
    images the students were taught on."""
    innocent = report["result"]["innocent"]
    assert {r["student"] for r in innocent} == {
        "scratch",
        "label_only",
        "normal_kd",
        "clean_kd",
        "clean_kd:seed1",
    }
    traces = [r if probes == "fresh" else r["own_images"] for r in innocent]
    tests = sum(len(r["z"]) for r in traces)
    accused = sum(len(r["named"]) for r in traces)
    assert tests == 25
    assert accused / tests <= 0.01


def test_decoys_hold_the_nominal_rate_on_innocent_students(report: dict) -> None:
    """Decoy false-positive rate at alpha = 1e-3 (200 decoys per trace, 5 innocent students): at most 2 %
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
    (cost,) = result["cost"].values()  # clean KD students at two seeds, and a standard error from them
    assert len(cost["clean_kd_each"]) == 2 and cost["difference_se"] > 0


def test_every_removal_attempt_is_traced_on_fresh_probes_and_on_the_licensees_images(report: dict) -> None:
    """Licensee 0's student and each attempt on it (licensees 0 and 1 for the colluders), traced on fresh
    probes, and on licensee 0's transfer images except the colluders' many-probe trace."""
    result = report["result"]
    wm0, wm1 = result["watermarks"][:2]
    removal = result["removal"]
    attacks = [r["attack"] for r in removal]
    assert attacks == [
        "none",
        "retemper:1",
        "retemper:20",
        "argmax_only",
        "finetune_10pct_labels",
        "second_generation",
        "input_noise:0.1",
        "colluders_average",
        "colluders_average",
    ]
    for r in removal:
        assert set(r["leakers"]) == ({wm0, wm1} if r["attack"] == "colluders_average" else {wm0})
    for r in removal[:-1]:
        assert r["own_images"]["probes"] == 500 and set(r["own_images"]["leakers"]) == set(r["leakers"])
    assert "own_images" not in removal[-1]
