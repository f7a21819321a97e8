#!/usr/bin/env bash
# Quick start 2: install the test dependencies into .venv and run the whole test suite:
#   lint (ruff check, ruff format --check, mypy), then the quick tests, then slow / e2e / PostgreSQL tests,
#   then, last, the Docker tests (tests/docker: the images and the compose stack on a local engine).
# PostgreSQL tests use SDB_TEST_POSTGRES_URL (default: the server at 127.0.0.1:5432, user postgres).
# Extra arguments go to every pytest run (`./scripts/test.sh -x -k quota`); paths narrow it (`tests/ops`).
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

if ! pg_isready -q -h 127.0.0.1 2>/dev/null && [ -z "${SDB_TEST_POSTGRES_URL:-}" ]; then
  echo "test: warning: no PostgreSQL answers on 127.0.0.1:5432; the PostgreSQL tests will fail" >&2
fi

if [ "${SDB_SKIP_LINT:-0}" != 1 ]; then
  step "ruff check";         ruff check .           || failed+=("ruff check")
  step "ruff format --check"; ruff format --check . || failed+=("ruff format")
  step "mypy";               mypy                   || failed+=("mypy")
fi

# Each top-level test directory runs in its own pytest process: the directories are written by different
# people, and test modules or conftest helpers with the same basename in two of them would clash in one
# process (pytest's default import mode). Arguments naming test paths (tests/..., *.py) run just those.
is_path() { case "$1" in tests | tests/* | *.py | *.py::*) [ -e "${1%%::*}" ] ;; *) return 1 ;; esac; }
targets=()
options=()
for a in "$@"; do
  if is_path "$a"; then targets+=("$a"); else options+=("$a"); fi
done
groups=()
if [ ${#targets[@]} -gt 0 ]; then
  groups+=("${targets[*]}")
else
  for d in tests/*/; do
    d=${d%/}
    [ "$(basename "$d")" = __pycache__ ] && continue
    find "$d" -name 'test_*.py' -print -quit | grep -q . && groups+=("$d")
  done
  root_files=$(find tests -maxdepth 1 -name 'test_*.py' | sort | tr '\n' ' ')
  [ -n "$root_files" ] && groups+=("$root_files")
fi

# pytest exits 5 when it selects no test; that is not a failure.
run_stage() {
  local name=$1 marker=$2 extra=$3 rc=0 i=0 group
  for group in "${groups[@]}"; do
    i=$((i + 1))
    step "pytest ($name): $group"
    # shellcheck disable=SC2086  # a group is a space-separated list of paths
    pytest -m "$marker" --junitxml="$REPORTS/$name-$i.xml" $extra ${options[@]+"${options[@]}"} $group
    local r=$?
    if [ $r -eq 5 ]; then echo "test: no $name test in $group"; r=0; fi
    if [ $r -ne 0 ]; then rc=$r; failed+=("pytest $name $group"); fi
  done
  return $rc
}

QUICK="not slow and not e2e and not postgres and not docker"
if run_stage quick "$QUICK" ""; then
  run_stage slow "not ($QUICK) and not docker" "--durations=10"
  # Docker last (it builds images): only the groups that hold Docker tests.
  all_groups=("${groups[@]}")
  groups=()
  for g in "${all_groups[@]}"; do case " $g" in *" tests/docker"*) groups+=("$g") ;; esac; done
  [ ${#groups[@]} -gt 0 ] && run_stage docker "docker" "--durations=5 -s"
else
  echo "test: quick tests failed; the slow, e2e, PostgreSQL and Docker tests were not run" >&2
  failed+=("pytest slow (not run)")
fi

# One closing line over both stages, so a CI reader sees the totals.
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
