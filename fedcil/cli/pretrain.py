"""``fcil-pretrain``: self-supervised pretraining of the backbone (SimCLR), cached by its settings.

    fcil-pretrain experiment=fmnist_ssl                     # prints the checkpoint's path
    fcil-pretrain --retrain experiment=fmnist_ssl pretrain.cache_dir=/tmp/x   # reproduces a shipped one
"""

from __future__ import annotations

import argparse
import sys

from fedcil.config import compose_config
from fedcil.errors import ConfigError
from fedcil.ssl import ensure_pretrained


def main(argv: list[str] | None = None) -> int:
    """``fcil-pretrain [--retrain] [overrides]``: pretrain (or find) the checkpoint and print its path."""
    parser = argparse.ArgumentParser(prog="fcil-pretrain", description="Self-supervised pretraining of the backbone.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=fmnist_ssl pretrain.epochs=8")
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--retrain", action="store_true",
                        help="pretrain now, even where the cache or pretrained/ hold a checkpoint for these settings")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.config_name, args.overrides)
        result = ensure_pretrained(cfg, log=lambda m: print(m, flush=True), retrain=args.retrain)
    except ConfigError as exc:
        print(f"fcil-pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"fcil-pretrain: checkpoint {result.path} (use model.pretrained_path={result.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
