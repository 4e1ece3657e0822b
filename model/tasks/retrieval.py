"""The retrieval task: in-batch sampled softmax between user and item encodings, with logQ and hit masking."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebrflow.model.encoder import GraphEncoder
from ebrflow.model.losses import sampled_softmax
from ebrflow.model.tasks.base import Subgraph, Task


@dataclass(frozen=True)
class RetrievalConfig:
    """Softmax ``temperature`` (over cosines), whether to apply the logQ correction (off: served by inner product,
    popularity stays in the vectors' lengths, as in the LightGCN recipe of ``../shared/ANCHORS.md``), extra random
    negative items per step."""

    temperature: float = 0.12
    logq: bool = False
    n_negatives: int = 0


class RetrievalTask(Task):
    """Each event's user should score its item above the batch's other items (and any extra random negatives).

    The logQ correction subtracts the log sampling share of each in-batch item, so popular items are
    not over-penalised as negatives; in-batch copies of the positive item (accidental hits) are masked.
    """

    name = "retrieval"
    Config = RetrievalConfig
    default_weight = 1.0

    def __init__(self, config: RetrievalConfig | None = None) -> None:
        super().__init__()
        self.config = config or RetrievalConfig()
        self.negatives = self.config.n_negatives

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """Weighted in-batch sampled-softmax loss."""
        cfg = self.config
        xs = subgraph.inputs(encoder)
        u = encoder.propagate(xs[0], subgraph.users.masks, coefs=subgraph.users.coefs, served=True)[0]
        v = encoder.propagate(xs[1], subgraph.items.masks, coefs=subgraph.items.coefs, served=True)[0]
        extra, extra_log_q = None, None
        if subgraph.negatives is not None and len(subgraph.negatives):
            negatives = subgraph.negatives
            extra = encoder.propagate(xs[2], negatives.masks, coefs=negatives.coefs, served=True)[0]
            extra_log_q = subgraph.negative_log_q if cfg.logq else None
        return sampled_softmax(
            u,
            v,
            subgraph.item_rows,
            cfg.temperature,
            log_q=subgraph.log_q if cfg.logq else None,
            weights=subgraph.weights,
            extra_keys=extra,
            extra_log_q=extra_log_q,
        )
