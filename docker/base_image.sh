#!/usr/bin/env bash
# Build a local stand-in for Flower's flwr/superexec image, for machines that reach no
# container registry: Debian bookworm from debootstrap with python3, this machine's CA bundle
# (so that pip works inside), and flwr at the version pinned in pyproject.toml, in a venv
# at /python/venv on PATH, and the unprivileged user `app` (uid 49999, home /app) that it
# runs as, as in Flower's image (the venv stays root's: that user cannot change the
# installed packages). Needs root, debootstrap and a Docker daemon (DOCKER_HOST is honoured).
#
#   bash docker/base_image.sh [TAG]            # default TAG: fedcil-base:<flwr version>
#   docker build -f docker/Dockerfile --network host --build-arg BASE_IMAGE=TAG -t fedcil-lora:0.1.0 .
#
# DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian).
set -euo pipefail
APP=$(cd "$(dirname "$0")/.." && pwd)
flwr_version=$(sed -n 's/^ *"flwr\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' "$APP/pyproject.toml")
[ -n "$flwr_version" ] || { echo "base_image.sh: no flwr[...]==X pin found in $APP/pyproject.toml" >&2; exit 1; }
tag=${1:-fedcil-base:$flwr_version}
ca=/etc/ssl/certs/ca-certificates.crt
for tool in debootstrap docker; do
  command -v $tool >/dev/null || { echo "base_image.sh: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 1; }
done
[ -r "$ca" ] || { echo "base_image.sh: no CA bundle at $ca" >&2; exit 1; }

work=$(mktemp -d /tmp/fcil-base-XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "== debootstrap Debian bookworm (minbase, python3) into $work/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
cp "$ca" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$work/rootfs/var/cache/apt/archives"/*.deb "$work/rootfs/var/lib/apt/lists"/*

echo "== docker import, then flwr==$flwr_version in /python/venv"
rootfs_tag="${tag%%:*}-rootfs:bookworm"
tar -C "$work/rootfs" -c . | docker import - "$rootfs_tag" >/dev/null
docker build --network host -t "$tag" - <<EOF
FROM $rootfs_tag
ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
RUN python3 -m venv /python/venv && pip install --no-cache-dir "flwr==$flwr_version" \
 && useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
 && mkdir -p /app && chown app:app /app
ENV HOME=/app
WORKDIR /app
USER app
EOF
docker rmi "$rootfs_tag" >/dev/null 2>&1 || true
echo "base_image.sh: built $tag"
