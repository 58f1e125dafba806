#!/usr/bin/env bash
# Make the shared secrets of SuperExec (executor) authentication: one per pair of an app
# API and the executor that serves it, so a SuperNode's host never holds the SuperLink's.
#
#   bash docker/secrets.sh [OUT_DIR] [NAME ...]
#   bash docker/secrets.sh docker/secrets superlink supernode-0 supernode-1   # the defaults
#
# Writes OUT_DIR/NAME: 32 bytes from openssl's CSPRNG as 64 hex digits (Flower reads the file
# as exact bytes; copy the file, do not retype it), mode 600, and OUT_DIR/.gitignore so that
# git never tracks them. Give `superlink` to the SuperLink and its ServerApp executor,
# `supernode-i` to SuperNode i and its ClientApp executor. Never overwrites: an existing
# secret is kept, so a deployment can add nodes.
set -euo pipefail
out=${1:-$(dirname "$0")/secrets}
shift $(( $# > 0 ? 1 : 0 ))
[ $# -gt 0 ] || set -- superlink supernode-0 supernode-1
umask 077
mkdir -p "$out"
[ -e "$out/.gitignore" ] || echo "*" > "$out/.gitignore"
for name in "$@"; do
  [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "secrets.sh: '$name' is not a plain file name" >&2; exit 2; }
  if [ -e "$out/$name" ]; then echo "secrets.sh: kept $out/$name"; continue; fi
  secret=$(openssl rand -hex 32)  # an assignment, so that a failing openssl stops the script
  printf '%s' "$secret" > "$out/$name"
  chmod 600 "$out/$name"
  echo "secrets.sh: wrote $out/$name"
done
