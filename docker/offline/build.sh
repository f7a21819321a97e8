#!/usr/bin/env bash
# Build the sdb image (docker/Dockerfile, unchanged) on a machine that reaches no image registry and not
# PyTorch's wheel index, only PyPI and a Debian mirror (the CI machines). Operators with a registry run
# `docker build -f docker/Dockerfile -t sdb:latest .` instead and never need this.
#   bash docker/offline/build.sh         stand-in base images (only those missing), then sdb:latest
#   SDB_OFFLINE_REBUILD=1 bash ...       rebuild the stand-in base images too
#   bash docker/offline/build.sh monitoring   also the compose `monitoring` profile's Prometheus stand-in
#                                        (prometheus.Dockerfile); Grafana has none (see below)
# 1. Stand-ins for the three Docker Hub images that docker/Dockerfile and docker-compose.yml name, built from
#    Debian packages: `debootstrap --variant=minbase bookworm` imported as sdb-offline/debian:bookworm, then
#    python:3.11-slim-bookworm (python.Dockerfile), postgres:16-bookworm (postgres.Dockerfile, which runs
#    PostgreSQL 15) and redis:7-bookworm (redis.Dockerfile, Redis 7.0). An image of that name that already
#    exists (a real one, or a stand-in from an earlier run with the same inputs) is kept.
# 2. The CPU build of torch: `pip download torch==2.13.0` as this machine's pip finds it (its find-links),
#    served with its dependencies as a package index on 127.0.0.1 for the time of the build and passed as
#    --build-arg TORCH_INDEX_URL (default: PyTorch's own index). The build runs on the host network (PyPI
#    for the other dependencies, and the index on 127.0.0.1); the legacy builder keeps its layer cache, so
#    a second build reinstalls only what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OFFLINE=docker/offline
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PORT=${SDB_OFFLINE_INDEX_PORT:-38411}  # fixed, so that the build argument (part of the layer cache key) repeats
IMAGE=${SDB_IMAGE:-sdb:latest}
PIP=${PIP:-.venv/bin/python -m pip}
# The legacy builder: BuildKit would fetch the `# syntax=docker/dockerfile:1` frontend from a registry.
export DOCKER_BUILDKIT=0
work=$(mktemp -d "${TMPDIR:-/tmp}/sdb-offline.XXXXXX")
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
t0=$SECONDS
have() { docker image inspect "$1" >/dev/null 2>&1 && [ "${SDB_OFFLINE_REBUILD:-0}" != 1 ]; }

if ! have sdb-offline/debian:bookworm; then
  command -v debootstrap >/dev/null || { echo "offline: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  # The Debian mirror this machine's apt already uses.
  mirror=$(apt-get indextargets --format '$(SITE)' 'Codename: bookworm' 'Label: Debian' 2>/dev/null | head -n1)
  mirror=${SDB_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
  echo "offline: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | docker import -c 'CMD ["bash"]' \
    -m "debootstrap --variant=minbase bookworm (docker/offline/build.sh)" - sdb-offline/debian:bookworm
  rm -rf "$work/rootfs"
fi
mkdir -p "$work/ctx"
cp "$OFFLINE"/*.Dockerfile "$OFFLINE"/postgres-entrypoint.sh "$work/ctx/"
cp /etc/ssl/certs/ca-certificates.crt "$work/ctx/host-ca-certificates.crt"
# A stand-in is rebuilt when its own inputs change (its Dockerfile and the files it copies; label
# sdb.offline.inputs); a real image (no label) is kept.
specs=(python:3.11-slim-bookworm=python.Dockerfile postgres:16-bookworm=postgres.Dockerfile
  redis:7-bookworm=redis.Dockerfile)
[ "${1:-}" = monitoring ] && specs+=(prom/prometheus:v2.53.2=prometheus.Dockerfile)
for spec in "${specs[@]}"; do
  name=${spec%%=*}
  dockerfile=$work/ctx/${spec#*=}
  copied=$(awk '$1 == "COPY" { for (i = 2; i < NF; i++) print $i }' "$dockerfile")
  inputs=$( (cat "$dockerfile"; for f in $copied; do cat "$work/ctx/$f"; done) | sha256sum | cut -c1-16)
  if have "$name"; then
    label=$(docker image inspect -f '{{index .Config.Labels "sdb.offline.inputs"}}' "$name")
    [ "$label" = "<no value>" ] || [ -z "$label" ] || [ "$label" = "$inputs" ] && continue
  fi
  echo "offline: building the stand-in $name from Debian packages"
  docker build -q --network host --label "sdb.offline.inputs=$inputs" -f "$work/ctx/${spec#*=}" -t "$name" "$work/ctx"
done
echo "offline: base images ready ($((SECONDS - t0)) s)"
if [ "${1:-}" = monitoring ] && ! docker image inspect grafana/grafana-oss:11.2.2 >/dev/null 2>&1; then
  # Debian ships no Grafana package, so there is no stand-in to build: say so rather than let compose fail later.
  echo "offline: grafana/grafana-oss:11.2.2 cannot be had without a registry (no Debian package):" \
    "run \`docker compose --profile monitoring up -d prometheus\` for Prometheus and its alerts alone" >&2
fi

t1=$SECONDS
mkdir -p "$work/wheels"
$PIP download -q --disable-pip-version-check "torch==$TORCH_VERSION" -d "$work/wheels" 2>&1 | grep -v 'is ignored' || true
ls "$work"/wheels/torch-"$TORCH_VERSION"*.whl >/dev/null || { echo "offline: pip found no torch $TORCH_VERSION wheel" >&2; exit 1; }
# A PEP 503 "simple" index: one directory per normalized project name, served by http.server's listings.
python3 - "$work/wheels" "$work/index" <<'PY'
import re, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for whl in src.glob("*.whl"):
    project = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    (dst / project).mkdir(parents=True, exist_ok=True)
    (dst / project / whl.name).symlink_to(whl)
PY
python3 -m http.server --bind 127.0.0.1 --directory "$work/index" "$PORT" >"$work/index.log" 2>&1 &
server=$!
for _ in $(seq 1 50); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/torch/', timeout=1)" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/index.log" >&2; echo "offline: port $PORT is taken (set SDB_OFFLINE_INDEX_PORT)" >&2; exit 1; }
  sleep 0.2
done
echo "offline: building $IMAGE (torch $(basename "$work"/wheels/torch-*.whl) from http://127.0.0.1:$PORT/)"
# The builder stage is tagged too ($IMAGE-builder, from the same cached layers) so that its layers (torch
# above all) are not dangling; the images that the new ones replace are removed, keeping the disk bounded.
old_ids=$(docker image inspect -f '{{.Id}}' "$IMAGE" "$IMAGE-builder" 2>/dev/null || true)
build=(docker build --network host --build-arg "TORCH_INDEX_URL=http://127.0.0.1:$PORT/" -f docker/Dockerfile)
"${build[@]}" -t "$IMAGE" .
"${build[@]}" -q --target builder -t "$IMAGE-builder" . >/dev/null
new_ids=$(docker image inspect -f '{{.Id}}' "$IMAGE" "$IMAGE-builder")
for id in $old_ids; do
  grep -q "$id" <<<"$new_ids" || docker rmi "$id" >/dev/null 2>&1 || true
done
echo "offline: built $IMAGE in $((SECONDS - t1)) s; $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
