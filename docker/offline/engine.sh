#!/usr/bin/env bash
# A local Docker engine for the Docker test stage (tests/docker), on machines where none runs (CI).
#   bash docker/offline/engine.sh install   as root: apt-get install docker.io and debootstrap if missing
#   bash docker/offline/engine.sh start     start dockerd unless an engine answers; prints "started" if it did
#   bash docker/offline/engine.sh stop      stop the dockerd that `start` started (its images stay on disk)
# dockerd runs with overlay2 (vfs where overlay2 fails), without iptables rules and without the default
# bridge: compose creates its own network, and ports published on 127.0.0.1 go through docker-proxy.
# Images and build layers stay in /var/lib/docker between runs, so a second run reuses them.
set -euo pipefail
RUN_DIR=/run/sdb-dockerd
LOG=${SDB_DOCKERD_LOG:-/var/log/sdb-dockerd.log}

answering() { docker info >/dev/null 2>&1; }

case "${1:-}" in
  install)
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && exit 0
    [ "$(id -u)" = 0 ] || { echo "engine: ${missing[*]} missing and not root; cannot install" >&2; exit 1; }
    echo "engine: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    ;;
  start)
    answering && exit 0
    [ "$(id -u)" = 0 ] || { echo "engine: no Docker engine answers and not root; cannot start dockerd" >&2; exit 1; }
    command -v dockerd >/dev/null || { echo "engine: dockerd is not installed (engine.sh install)" >&2; exit 1; }
    mkdir -p "$RUN_DIR"
    for driver in overlay2 vfs; do
      dockerd --storage-driver="$driver" --iptables=false --bridge=none \
        --exec-root="$RUN_DIR/exec" --pidfile="$RUN_DIR/dockerd.pid" >>"$LOG" 2>&1 &
      pid=$!
      for _ in $(seq 1 60); do
        answering && { echo "$pid" > "$RUN_DIR/started-by-sdb"; echo started; exit 0; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
      done
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      echo "engine: dockerd with $driver did not start (log: $LOG)" >&2
    done
    exit 1
    ;;
  stop)
    [ -f "$RUN_DIR/started-by-sdb" ] || exit 0
    pid=$(cat "$RUN_DIR/started-by-sdb")
    rm -f "$RUN_DIR/started-by-sdb"
    kill "$pid" 2>/dev/null || exit 0
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.5; done
    echo "engine: dockerd ($pid) did not stop in 30 s" >&2
    exit 1
    ;;
  *)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
