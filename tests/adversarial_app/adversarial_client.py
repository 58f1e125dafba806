"""A ClientApp whose partition 0 is adversarial: every reply it sends has one defect, in turn."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from attacks import attack_of, corrupt
from client_app.app import reply
from client_app.node import node_overrides
from fedcil.config import compose_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The honest reply, corrupted on partition 0."""
    honest = reply(msg, context)
    if int(context.node_config["partition-id"]) != 0:
        return honest
    cfg = compose_config(str(context.run_config["config-name"]), node_overrides(context))
    config = msg.content.config_records["config"]
    attack = attack_of(int(config["task"]), int(config["round"]), cfg.rounds_per_task)
    return Message(content=corrupt(honest.content, attack), reply_to=msg)
