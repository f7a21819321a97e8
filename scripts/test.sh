#!/usr/bin/env bash
# Quick start 2: install the test dependencies into .venv and run the whole test suite:
#   lint (ruff check, ruff format --check, mypy), then one pytest run: quick tests, then slow / e2e / PostgreSQL /
#   browser tests, and last the Docker tests (tests/docker: the images and the compose stack on a local
#   engine). As root (CI), it first installs the Debian packages those need (chromium, prometheus for promtool).
# PostgreSQL tests use SDB_TEST_POSTGRES_URL (default: the server at 127.0.0.1:5432, user postgres).
# SDB_SKIP_SETUP=1 skips the install step; SDB_SKIP_LINT=1 skips the linters.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${SDB_SKIP_SETUP:-0}" != 1 ]; then
  SDB_EXTRAS=dev bash scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }
fi
export PATH="$PWD/.venv/bin:$PATH"
REPORTS=$(mktemp -d "${TMPDIR:-/tmp}/sdb-test.XXXXXX")
trap 'rm -rf "$REPORTS"' EXIT
failed=()

step() { echo; echo "==> $*"; }

# Debian packages of the browser tests (chromium, driven by Playwright from the dev extra) and of the
# monitoring tests (promtool, from prometheus): installed when missing and running as root, as CI does.
need=()
command -v "${SDB_CHROMIUM:-/usr/bin/chromium}" >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; } \
      || echo "test: warning: could not install ${need[*]}" >&2
  else
    echo "test: warning: ${need[*]} missing and not root: the browser or promtool tests will be skipped" >&2
  fi
fi

if ! pg_isready -q -h 127.0.0.1 2>/dev/null && [ -z "${SDB_TEST_POSTGRES_URL:-}" ]; then
  echo "test: warning: no PostgreSQL answers on 127.0.0.1:5432; the PostgreSQL tests will fail" >&2
fi

if [ "${SDB_SKIP_LINT:-0}" != 1 ]; then
  step "ruff check";         ruff check .           || failed+=("ruff check")
  step "ruff format --check"; ruff format --check . || failed+=("ruff format")
  step "mypy";               mypy                   || failed+=("mypy")
fi

# One pytest process runs every test: the quick tests first, then the slow, e2e and PostgreSQL tests
# (tests/conftest.py orders them; --quick-gate skips the slow ones once a quick test has failed).
# Arguments go to pytest: `./scripts/test.sh -x -k quota`, `./scripts/test.sh tests/ops`.
step "pytest"
pytest --quick-gate --durations=10 --junitxml="$REPORTS/pytest.xml" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: no test selected"; rc=0; fi
[ $rc -ne 0 ] && failed+=("pytest")

# One closing line, so a CI reader sees the totals.
python - "$REPORTS" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in sorted(Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for k in tot:
            tot[k] += int(suite.get(k, 0))
failed = tot["failures"] + tot["errors"]
passed = tot["tests"] - failed - tot["skipped"]
print(f"\ntotal: {passed} passed, {failed} failed, {tot['skipped']} skipped")
PY

if [ ${#failed[@]} -gt 0 ]; then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all checks passed"
