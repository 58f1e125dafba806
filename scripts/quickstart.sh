#!/usr/bin/env bash
# Set up .venv, then run the quickstart experiment with `flwr run`: LoRM on the shipped
# SimCLR micro ViT for digits (extra overrides are passed on, e.g. method=fedavg_lora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fcil-run experiment=quickstart "$@"
