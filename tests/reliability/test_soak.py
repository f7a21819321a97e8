"""A short run of bench/soak.py (the full soak is a benchmark; its results are in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._support.server import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECONDS = 15


def test_short_soak_has_no_5xx_and_loses_no_audit_row() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", str(SECONDS), "--concurrency", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SECONDS + 180,
    )
    assert r.stdout.strip(), r.stderr[-3000:]
    summary = json.loads(r.stdout)
    failed = [name for name, ok in summary["checks"].items() if not ok]
    assert not failed, json.dumps(summary, indent=2)
    assert r.returncode == 0
    # Both kinds of traffic were served, and every answer was counted.
    assert summary["answers"].get("predict 200", 0) > 0
    assert summary["answers"].get("distill 200", 0) > 0
    assert summary["requests"] == sum(summary["answers"].values())
