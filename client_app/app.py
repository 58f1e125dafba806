"""The ClientApp: decode the request, run one local round, reply."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.local_round import answer_request
from fedcil.config import chooses_num_clients, compose_config, parse_overrides, quote_value

app = ClientApp()


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train LoRA + head on this node's partition of the current task (or send statistics)."""
    return reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the sent model on this node's own test shard (``evaluation: clients``)."""
    return reply(msg, context)


def reply(msg: Message, context: Context) -> Message:
    """Answer a request with this node's config, partition and thread count."""
    cfg = compose_config(str(context.run_config["config-name"]), node_overrides(context))
    torch.set_num_threads(max(1, int(cfg.client_resources.num_cpus)))
    content = answer_request(
        cfg,
        msg.content,
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
    )
    return Message(content=content, reply_to=msg)
