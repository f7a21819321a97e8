#!/usr/bin/env bash
# Quick start 2: install the test dependencies into .venv and run the whole test suite:
#   lint (ruff check, ruff format --check, mypy), then one pytest run: quick tests, then slow / e2e / PostgreSQL /
#   browser tests, and last the Docker tests (tests/docker: the images and the compose stack on a local
#   engine). As root (CI), it first installs the Debian packages those need (chromium, prometheus for promtool,
#   docker.io and debootstrap through docker/offline/engine.sh). Its closing lines give the totals and each
#   reason tests were skipped for.
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

# The Docker stage (tests/docker, last) needs a Docker engine and debootstrap: installed as root, as CI does
# (docker/offline/engine.sh; the tests start dockerd themselves when none answers).
if [ "$(id -u)" = 0 ]; then
  bash docker/offline/engine.sh install || echo "test: warning: docker.io could not be installed; the Docker tests will skip" >&2
elif ! command -v docker >/dev/null 2>&1; then
  echo "test: warning: no docker CLI and not root: the Docker tests will be skipped" >&2
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

# The closing lines: the totals, then each skip reason with its count, so a reader sees what did not run.
python scripts/test_summary.py "$REPORTS"

if [ ${#failed[@]} -gt 0 ]; then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all checks passed"
