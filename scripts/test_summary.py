"""The closing lines of scripts/test.sh: totals over the junit reports, then every skip reason with its count.

    python scripts/test_summary.py REPORTS_DIR     (reads REPORTS_DIR/*.xml, pytest's --junitxml)

A reader of a CI log sees at the end what ran and what did not, and why (a missing Docker engine, no
PostgreSQL server, no Chromium), rather than a bare number of skipped tests.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

EXAMPLES = 2  # test ids shown per skip reason


def summary(reports: Path) -> list[str]:
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    reasons: Counter[str] = Counter()
    examples: defaultdict[str, list[str]] = defaultdict(list)
    for f in sorted(reports.glob("*.xml")):
        root = ET.parse(f).getroot()
        for suite in root.iter("testsuite"):
            for k in tot:
                tot[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            skipped = case.find("skipped")
            if skipped is None:
                continue
            reason = (skipped.get("message") or "no reason given").strip()
            reason = reason.removeprefix("Skipped: ")
            reasons[reason] += 1
            if len(examples[reason]) < EXAMPLES:
                examples[reason].append(f"{case.get('classname', '')}::{case.get('name', '')}")
    failed = tot["failures"] + tot["errors"]
    passed = tot["tests"] - failed - tot["skipped"]
    lines = ["", f"total: {passed} passed, {failed} failed, {tot['skipped']} skipped"]
    if reasons:
        lines.append("skipped, and why:")
        for reason, n in reasons.most_common():
            lines.append(f"  {n:4d} {reason}  (e.g. {', '.join(examples[reason])})")
    return lines


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]))))
