"""What a SuperNode asks of its ClientApp, as plain values: no torch, cheap to import and to send."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from fedcil.config import chooses_num_clients, parse_overrides, quote_value


def node_overrides(context: Context) -> list[str]:
    """The run's overrides, plus what this SuperNode's node config decides.

    Its data directory (``data-dir``), and the number of clients (``num-partitions``)
    unless the run chooses ``num_clients`` itself.
    """
    overrides = parse_overrides(str(context.run_config["overrides"]))
    if not chooses_num_clients(overrides):
        overrides.append(f"num_clients={int(context.node_config['num-partitions'])}")
    if "data-dir" in context.node_config:
        overrides.append(f"dataset.root={quote_value(str(context.node_config['data-dir']))}")
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
