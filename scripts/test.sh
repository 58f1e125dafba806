#!/usr/bin/env bash
# Set up .venv (and Fashion-MNIST from Debian when missing), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
