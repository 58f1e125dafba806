#!/usr/bin/env bash
# Set up .venv, then run the quickstart experiment (or any overrides given) with `flwr run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fcil-run "$@"
