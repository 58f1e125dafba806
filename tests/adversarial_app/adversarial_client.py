"""A ClientApp whose partition 0 is adversarial.

By default every reply it sends has one defect, in turn (:mod:`attacks`); with ``+attack=<name>``
in the run's overrides it sends well-formed but dishonest replies instead (:mod:`dishonest`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from attacks import attack_of, corrupt
from client_app.app import reply
from client_app.node import node_overrides
from dishonest import lie
from fedcil.config import compose_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The honest reply, corrupted (or made dishonest) on partition 0."""
    honest = reply(msg, context)
    if int(context.node_config["partition-id"]) != 0:
        return honest
    cfg = compose_config(str(context.run_config["config-name"]), node_overrides(context))
    if cfg.get("attack"):
        return Message(content=lie(honest.content, cfg.attack, cfg.replies.max_examples), reply_to=msg)
    config = msg.content.config_records["config"]
    attack = attack_of(int(config["task"]), int(config["round"]), cfg.rounds_per_task)
    return Message(content=corrupt(honest.content, attack), reply_to=msg)
