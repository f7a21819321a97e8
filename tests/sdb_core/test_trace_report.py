"""The traceability report's cost entry: delivered value with and without the watermark, and the standard
error of their difference."""

from __future__ import annotations

import math

import pytest

from sdb_core.trace_report import check_trace_targets, cost_entry, to_markdown


def test_cost_compares_the_means_over_the_label_only_floor() -> None:
    c = cost_entry(80.0, clean=[84.0, 85.0, 86.0], marked=[84.0, 85.0])
    assert c["clean_kd"] == pytest.approx(85.0)
    assert c["delivered_clean"] == pytest.approx(5.0)
    assert c["delivered_watermarked"] == pytest.approx(4.5)
    assert c["ratio"] == pytest.approx(0.9)
    assert c["difference"] == pytest.approx(-0.5)
    # variances of the means: 1/3 (clean, sample variance 1) + 0.5/2 (marked, sample variance 0.5)
    assert c["difference_se"] == pytest.approx(math.sqrt(1 / 3 + 0.25))
    # ratio 4.5 / 5: d/d(marked mean) = 1/5, d/d(clean mean) = -4.5/25
    assert c["ratio_se"] == pytest.approx(math.sqrt(0.25 / 25 + (4.5 / 25) ** 2 / 3))


def test_a_single_clean_student_adds_no_spread_and_no_gain_gives_no_ratio() -> None:
    one = cost_entry(80.0, clean=[82.0], marked=[81.0, 83.0])
    assert one["difference_se"] == pytest.approx(math.sqrt(2.0 / 2))
    no_gain = cost_entry(80.0, clean=[79.5, 80.0], marked=[81.0])
    assert no_gain["ratio"] is None and no_gain["ratio_se"] is None


def test_the_cost_target_is_the_smallest_ratio_and_the_table_shows_the_error() -> None:
    result = {
        "leaked": [],
        "innocent": [],
        "removal": [],
        "top1_identical": True,
        "cost": {
            "a@500": cost_entry(80.0, [85.0, 85.2], [84.9]),
            "b@500": cost_entry(80.0, [85.0, 85.2], [84.0]),
        },
    }
    key = "cost: delivered with watermark >= 0.9 x without"
    assert check_trace_targets(result, 500)[key] is False
    result["cost"].pop("b@500")
    assert check_trace_targets(result, 500)[key] is True
    assert "| a@500 | 80.00 | 85.10 (n=2) | 84.90 |" in to_markdown({"result": result, "checks": {}})
