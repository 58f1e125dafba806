"""``fcil-export-sites``: write every client's share of a config as its own site folder.

For each partition, ``<out>/site-<partition_id>/`` gets the client's training samples over
all tasks and its test shard in the site format (``site.json``, ``train.npz``, ``test.npz``;
docs/deployment.md), so that a simulation's partition can be replayed by SuperNodes that each
hold only their own folder (node config ``data="local"``, ``data-dir`` the folder).

    fcil-export-sites --out sites num_clients=3 train_per_class=20
    fcil-export-sites --out sites experiment=quickstart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcil.config import compose_config
from fedcil.errors import ConfigError


def export_sites(config_name: str, overrides: list[str], out: Path) -> list[Path]:
    """Write one site folder per client of the composed config into ``out``; the folders, in partition order."""
    from fedcil.data import site_arrays, write_site
    from fedcil.experiment import experiment_for

    cfg = compose_config(config_name, overrides)
    if cfg.dataset.site_dir is not None:
        raise ConfigError(f"dataset.site_dir={cfg.dataset.site_dir}: export from the whole data set, not from a site")
    experiment = experiment_for(cfg)
    folders = []
    for partition_id in range(cfg.num_clients):
        train, test = experiment.site_share(partition_id, cfg.num_clients)
        folder = out / f"site-{partition_id}"
        write_site(folder, cfg.dataset.name, {
            "train": site_arrays(experiment.data, "train", train, cfg.dataset.name),
            "test": site_arrays(experiment.data, "test", test, cfg.dataset.name),
        })
        print(f"fcil-export-sites: {folder}: {len(train)} training and {len(test)} test images", flush=True)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="fcil-export-sites", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write site-<partition_id>/ into")
    parser.add_argument("--config-name", default="config", help="the Hydra config in conf/ (default: config)")
    parser.add_argument("overrides", nargs="*", help="overrides, as for fcil-run (key=value)")
    args = parser.parse_args(argv)
    try:
        folders = export_sites(args.config_name, args.overrides, args.out)
    except ConfigError as exc:
        print(f"fcil-export-sites: error: {exc}", file=sys.stderr)
        return 2
    print(f"fcil-export-sites: wrote {len(folders)} sites to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
