#!/usr/bin/env bash
# Set up .venv (and, from Debian when missing: Fashion-MNIST, and Docker, docker-compose and
# debootstrap for the real compose test), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
command -v dockerd >/dev/null || packages+=(docker.io)
command -v docker-compose >/dev/null || packages+=(docker-compose)
command -v debootstrap >/dev/null || packages+=(debootstrap)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null \
    || echo "test.sh: could not install ${packages[*]}; the tests that need them are skipped" >&2
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
