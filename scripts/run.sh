#!/usr/bin/env bash
# Quick start 1: install sdb into .venv, migrate the embedded SQLite database and serve the demo boxed model.
#   ./scripts/run.sh                      # http://127.0.0.1:8000, CPU or the GPU if PyTorch sees one
#   SDB_PORT=9000 ./scripts/run.sh        # another port; any SDB_ setting (README) is passed through
# Without SDB_JWT_SECRET it runs in demo mode (SDB_DEMO=1: a random JWT secret for this process only).
# There is no default password: the first admin API key comes from `.venv/bin/sdb admin bootstrap`.
# SDB_SKIP_SETUP=1 skips the install step (the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${SDB_HOST:-127.0.0.1}
PORT=${SDB_PORT:-8000}

if [ "${SDB_SKIP_SETUP:-0}" != 1 ]; then
  SDB_EXTRAS="${SDB_EXTRAS-}" bash scripts/setup.sh
fi
SDB=.venv/bin/sdb
PY=.venv/bin/python

if [ -z "${SDB_JWT_SECRET:-}" ]; then
  export SDB_DEMO="${SDB_DEMO:-1}"
fi
export SDB_DATABASE_URL="${SDB_DATABASE_URL:-sqlite:///./var/sdb.db}"
export SDB_MODEL_DIR="${SDB_MODEL_DIR:-models}"
mkdir -p var

echo "sdb: applying database migrations ($("$PY" -c 'import sys; print(sys.argv[1].split("://")[0])' "$SDB_DATABASE_URL"))"
"$SDB" db upgrade

if ! ls "$SDB_MODEL_DIR"/*/manifest.json >/dev/null 2>&1; then
  echo "sdb: no boxed model in $SDB_MODEL_DIR; building the demo box (about a minute on a CPU)"
  "$SDB" demo --out "$SDB_MODEL_DIR/digits-demo"
fi

# Another process on the port would answer /readyz below in our place while our server fails to bind.
if ! "$PY" - "$HOST" "$PORT" <<'PY'
import socket, sys

with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((sys.argv[1], int(sys.argv[2])))
    except OSError:
        sys.exit(1)
PY
then
  echo "sdb: port $PORT on $HOST is already in use by another process; stop it or pick another SDB_PORT" >&2
  exit 3
fi

"$SDB" serve --host "$HOST" --port "$PORT" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true' INT TERM

# Wait until the service reports ready (models loaded, database reachable), or until it exits.
URL="http://$HOST:$PORT"
[ "$HOST" = "0.0.0.0" ] && URL="http://127.0.0.1:$PORT"
if "$PY" - "$URL/readyz" "$SERVER" <<'PY'
import os, sys, time, urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
then
  sleep 1  # our own server must still be alive: a failed bind ends it right after its start-up
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "sdb: the server exited (port $PORT in use?); see the messages above" >&2
    wait "$SERVER"
    exit 3
  fi
  MODE="with the configured SDB_JWT_SECRET"
  case "${SDB_DEMO:-0}" in 1 | true | yes) MODE="in demo mode (random JWT secret for this run; set SDB_JWT_SECRET for real use)" ;; esac
  SAME_DB=""
  [ "$SDB_DATABASE_URL" = "sqlite:///./var/sdb.db" ] || SAME_DB="  (with the same SDB_DATABASE_URL)"
  cat <<MSG

  sdb is running $MODE
    URL:        $URL
    API docs:   $URL/docs
    Health:     $URL/healthz, $URL/readyz
  First admin credentials (no default password): in another terminal run
    .venv/bin/sdb admin bootstrap$SAME_DB
  It prints an admin API key once; exchange it for a token at POST $URL/auth/token (see README.md).
  Stop with Ctrl-C.

MSG
else
  echo "sdb: the service did not become ready; see the messages above" >&2
fi
# A signal interrupts `wait`; wait again so the server finishes its graceful shutdown first.
set +e
wait "$SERVER"
rc=$?
if kill -0 "$SERVER" 2>/dev/null; then
  wait "$SERVER"
  rc=$?
fi
exit "$rc"
