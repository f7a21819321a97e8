"""The reduced evaluation: same directions as the full protocol (thresholds below), seed 0, < 2 minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdb_core.evaluate import evaluate, reduced_config


@pytest.mark.slow
def test_reduced_evaluation_directions(tmp_path: Path) -> None:
    cfg = reduced_config()
    report = evaluate(cfg, tmp_path)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    t = report["summary"]["teacher"]
    # Directions of the full protocol, with single-seed slack over 20 instead of 40 box epochs (the full
    # protocol's thresholds are in docs/evaluation.md; at seed 0 this run gives plain -1.2, keyed -0.6,
    # unauthorized -11.7, authorized 0.0, wrong key -10.5 points).
    assert t["box_plain"]["mean"] >= t["normal"]["mean"] - 2.0
    assert t["box_keyed"]["mean"] >= t["normal"]["mean"] - 1.5
    assert t["box_wrong_key"]["mean"] <= t["normal"]["mean"] - 5.0
    for spec, m in report["summary"]["students"]["full"].items():
        mean = {k: v["mean"] for k, v in m.items()}
        assert mean["unauthorized"] <= mean["normal"] - 5.0, spec
        assert mean["unauthorized"] < mean["scratch"], spec
        assert mean["authorized"] >= mean["normal"] - 1.0, spec
        assert mean["wrong_key"] <= mean["normal"] - 5.0, spec
