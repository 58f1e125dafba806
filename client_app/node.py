"""What a SuperNode asks of its ClientApp, as plain values: no torch, cheap to import and to send."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from fedcil.config import chooses_num_clients, parse_overrides, quote_value
from fedcil.errors import ConfigError, choices_error


NODE_DATA = ("full", "local")  # node config ``data``: the whole data set under data-dir, or the site's own folder


def node_overrides(context: Context) -> list[str]:
    """The run's overrides, plus what this SuperNode's node config decides.

    Its data (``data-dir``: the data set's root, or with ``data="local"`` the site's own folder,
    :func:`fedcil.data.load_site`), and the number of clients (``num-partitions``) unless the
    run chooses ``num_clients`` itself.
    """
    overrides = parse_overrides(str(context.run_config["overrides"]))
    if not chooses_num_clients(overrides):
        overrides.append(f"num_clients={int(context.node_config['num-partitions'])}")
    mode = str(context.node_config.get("data", "full"))
    if mode not in NODE_DATA:
        raise choices_error("node config data", mode, list(NODE_DATA))
    if mode == "local" and "data-dir" not in context.node_config:
        raise ConfigError('node config data="local" needs data-dir, the site\'s own folder')
    if "data-dir" in context.node_config:
        key = "dataset.site_dir" if mode == "local" else "dataset.root"
        overrides.append(f"{key}={quote_value(str(context.node_config['data-dir']))}")
    return overrides


@dataclass(frozen=True)
class NodeJob:
    """The config to compose and the partition to train on, for one request to one node."""

    config_name: str
    overrides: tuple[str, ...]
    partition_id: int
    num_partitions: int

    @classmethod
    def from_context(cls, context: Context) -> NodeJob:
        """This node's job in the run of ``context``."""
        return cls(
            str(context.run_config["config-name"]),
            tuple(node_overrides(context)),
            int(context.node_config["partition-id"]),
            int(context.node_config["num-partitions"]),
        )
