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
    # the box keeps top-1 within 2 points on both paths (1 point in the full protocol, over 3 seeds)
    assert t["box_plain"]["mean"] >= t["normal"]["mean"] - 2.0
    assert t["box_keyed"]["mean"] >= t["normal"]["mean"] - 2.0
    for spec, m in report["summary"]["students"]["full"].items():
        mean = {k: v["mean"] for k, v in m.items()}
        assert mean["unauthorized"] < mean["normal"] - 2.0, spec
        assert mean["unauthorized"] < mean["scratch"], spec
        assert mean["authorized"] >= mean["normal"] - 1.0, spec
        assert mean["wrong_key"] < mean["normal"] - 2.0, spec
