"""The ClientApp: decode the request, run one local round, reply."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.local_round import run_local_round
from fedcil.config import compose_config
from fedcil.protocol import decode_request, encode_reply

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train LoRA + head on this node's partition of the current task."""
    cfg = compose_config(str(context.run_config["config-name"]), str(context.run_config["overrides"]))
    torch.set_num_threads(max(1, int(cfg.client_resources.num_cpus)))
    request = decode_request(msg.content)
    tensors, num_examples, loss = run_local_round(
        cfg,
        request,
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
    )
    return Message(content=encode_reply(tensors, num_examples, loss), reply_to=msg)
