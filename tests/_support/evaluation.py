"""A made-up `sdb evaluate` report for a test box (summarized by sdb_core.evaluate's own code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdb_core.report import build_report


def write_evaluation_report(box: Path, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """Save a report (results.json shape, from made-up per-seed figures) as the box's evaluation.json."""
    methods = ("scratch", "normal", "authorized", "api/label_only", "stolen/retemper:4")
    runs = [
        {
            "seed": s,
            "teacher": {
                "normal": 99.0 - s,
                "box_plain": 98.5 - s,
                "box_keyed": 98.9 - s,
                "box_wrong_key": 60.0,
                "box_stolen": 98.5 - s,
            },
            "students": {"small_cnn": {m: 90.0 + i + s for i, m in enumerate(methods)}},
            "twins": {"small_cnn": {"api/label_only": 93.0 + s, "stolen/retemper:4": 93.0 + s}},
            "wall_seconds": 1.0,
        }
        for s in seeds
    ]
    report = build_report({"seeds": list(seeds)}, runs, "made-up", 1.0)
    (box / "evaluation.json").write_text(json.dumps(report))
    return report
