"""The ClientApp: decode the request, run one local round, reply.

Importing this module costs Flower and Hydra only: torch, timm and PEFT load on the first
request, in this process under a simulation (Ray keeps it), or once per SuperNode in its
warm worker under a deployment (:mod:`client_app.worker`), where Flower starts a fresh
``flwr-clientapp`` process for every message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_app.node import NodeJob
from fedcil.secagg.client import respond
from fedcil.secagg.identity import identity_of

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train LoRA + head on this node's partition of the current task (or send statistics)."""
    return reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the sent model on this node's own test shard (``evaluation: clients``)."""
    return reply(msg, context)


def uses_warm_worker(context: Context) -> bool:
    """Whether this request goes to the node's warm worker: in a ``flwr-clientapp`` process
    (a deployment), unless the SuperNode's node config says ``warm-worker=false``."""
    wanted = str(context.node_config.get("warm-worker", "true")).lower() != "false"
    return wanted and Path(sys.argv[0]).name == "flwr-clientapp"


def reply(msg: Message, context: Context) -> Message:
    """Answer a request with this node's config and partition (through secure aggregation's
    stages when the request asks for them: :func:`fedcil.secagg.client.respond`)."""
    job = NodeJob.from_context(context)
    content = respond(msg.content, context.state, context.node_id, lambda request: answer_plainly(job, request, context),
                      identity_of(os.environ))
    return Message(content=content, reply_to=msg)


def answer_plainly(job: NodeJob, content: RecordDict, context: Context) -> RecordDict:
    """The node's reply records to one round request: trained tensors, statistics or counts."""
    if uses_warm_worker(context):
        from client_app.worker import ask

        return ask(job, content, node_id=context.node_id, watch_pid=os.getppid())
    from client_app.local_round import answer

    return answer(job, content)
