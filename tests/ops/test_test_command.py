"""scripts/test.sh, the README test command: it sets up what CI sets up and says what it skipped, and why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests._support.ops import REPO

TEST_SH = REPO / "scripts" / "test.sh"


def test_the_test_command_installs_the_docker_engine_as_root_like_ci() -> None:
    # .ci/run used to be the only place that installed docker.io: `./scripts/test.sh` as root skipped the
    # three Docker tests. The root branch of test.sh must run the same installer.
    text = TEST_SH.read_text()
    root_branch = re.search(r'if \[ "\$\(id -u\)" = 0 \]; then\n(.*?)\n(?:elif|fi)', text, re.S)
    assert root_branch and "docker/offline/engine.sh install" in root_branch.group(1), text


def test_the_closing_lines_give_every_skip_reason(tmp_path: Path) -> None:
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_some.py").write_text(
        "import pytest\n"
        "def test_runs(): pass\n"
        "@pytest.mark.parametrize('i', [1, 2])\n"
        "def test_needs_docker(i): pytest.skip('no Docker engine answers')\n"
        "def test_needs_postgres(): pytest.skip('no PostgreSQL server at 127.0.0.1:5432')\n"
    )
    reports = tmp_path / "reports"
    reports.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
         f"--rootdir={tests}", f"--junitxml={reports / 'pytest.xml'}", str(tests)],
        capture_output=True,
        check=True,
        cwd=tests,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "test_summary.py"), str(reports)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.strip().splitlines()
    assert "total: 1 passed, 0 failed, 3 skipped" in lines[0], out
    assert re.search(r"^\s+2 no Docker engine answers  \(e\.g\. .*test_needs_docker", out, re.M), out
    assert re.search(r"^\s+1 no PostgreSQL server at 127\.0\.0\.1:5432", out, re.M), out
    assert 'python scripts/test_summary.py "$REPORTS"' in TEST_SH.read_text()
