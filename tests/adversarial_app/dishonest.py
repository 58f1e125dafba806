"""Well-formed but dishonest replies: every one passes validation; only the influence bounds stop them."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedcil.protocol import unpack_upper

DISHONEST = ("inflate_count", "scale_grams", "negative_gram", "poison_head")
GRAM_PAIRS = {".G": (".AG", ".WG"), ".S": (".BS",)}  # a LoRM reply's Grams and the numerators they weigh
SCALE = 1000.0
HEAD_PUSH = 10.0  # poison_head: added to the first class's head bias


def numerators_of(tensors: dict[str, torch.Tensor], gram: str) -> list[str]:
    """The numerators pre-multiplied by the Gram ``gram`` in a LoRM reply."""
    stem, suffix = gram.rsplit(".", 1)
    return [f"{stem}{n}" for n in GRAM_PAIRS[f".{suffix}"] if f"{stem}{n}" in tensors]


def lie(content: RecordDict, attack: str, max_examples: int) -> RecordDict:
    """A copy of the honest reply ``content``, dishonest in the way ``attack`` (one of :data:`DISHONEST`) names.

    - ``inflate_count``: claims ``max_examples`` examples, tensors unchanged;
    - ``scale_grams``: every Gram times 1000 and its numerators set to a foreign factor (all
      entries 1) times that Gram (unpacked, when it travels packed): the closed-form merges
      follow the foreign factor;
    - ``negative_gram``: every Gram replaced by -3 times itself (not positive semi-definite),
      numerators unchanged;
    - ``poison_head``: claims ``max_examples`` examples and sends its trained head pushed
      toward the first class (:data:`HEAD_PUSH` added to that class's bias).
    """
    tensors = content.array_records["update"].to_torch_state_dict()
    metrics = dict(content.metric_records["metrics"])
    grams = [k for k in tensors if f".{k.rsplit('.', 1)[1]}" in GRAM_PAIRS]
    if attack == "inflate_count":
        metrics["num-examples"] = max_examples
    elif attack == "scale_grams":
        for gram in grams:
            scaled = SCALE * tensors[gram].double()
            tensors[gram] = scaled.float()
            for numerator in numerators_of(tensors, gram):
                foreign = torch.ones_like(tensors[numerator], dtype=torch.float64)
                if scaled.dim() == 1 and scaled.numel() == foreign.shape[-1]:  # a diagonal Gram
                    pushed = foreign * scaled
                else:  # a dense one, square or packed (fedcil.protocol.Packing)
                    pushed = foreign @ (unpack_upper(scaled) if scaled.dim() == 1 else scaled)
                tensors[numerator] = pushed.float()
    elif attack == "negative_gram":
        for gram in grams:
            tensors[gram] = -3 * tensors[gram]
    elif attack == "poison_head":
        metrics["num-examples"] = max_examples
        tensors["head.bias"] = tensors["head.bias"] + HEAD_PUSH * torch.nn.functional.one_hot(
            torch.tensor(0), tensors["head.bias"].numel()).to(tensors["head.bias"].dtype)
    else:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(DISHONEST)}")
    return RecordDict({"update": ArrayRecord(tensors), "metrics": MetricRecord(metrics)})
