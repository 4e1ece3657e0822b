"""GraphMAE on the batch subgraph: mask root inputs with a learnable token, re-mask, decode, scaled cosine error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebrflow.model.encoder import GraphEncoder, MeanAggregation, Tree, masked_mean
from ebrflow.model.losses import scaled_cosine_error
from ebrflow.model.tasks.base import Subgraph, Task
from ebrflow.model.views import mask_rows


@dataclass(frozen=True)
class GraphMAEConfig:
    """Share of roots used, share of those masked, exponent ``alpha`` of the scaled cosine error."""

    fraction: float = 0.25
    mask_rate: float = 0.5
    alpha: float = 2.0


class GraphMAETask(Task):
    """Masked feature reconstruction (Hou et al. 2022) for a random ``fraction`` of each side's roots.

    A ``mask_rate`` share of those roots has its input replaced by a learnable token everywhere it occurs
    in the tree. Their codes are projected, re-masked (zeroed) and decoded by one aggregation layer from
    their neighbours' codes; the target is the detached original input, compared by (1 − cos)^alpha
    on masked roots only.
    """

    name = "graphmae"
    Config = GraphMAEConfig
    default_weight = 0.1

    def __init__(self, dim: int, config: GraphMAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or GraphMAEConfig()
        self.fraction = self.config.fraction
        self.mask_token = torch.nn.Parameter(torch.zeros(dim))
        self.enc_to_dec = torch.nn.Linear(dim, dim, bias=False)
        self.decoder = MeanAggregation(dim)

    @classmethod
    def build(cls, config: GraphMAEConfig, dim: int) -> GraphMAETask:
        """The task with settings ``config`` and ``dim``-dimensional heads."""
        return cls(dim, config)

    def side_loss(
        self, tree: Tree, xs: list[torch.Tensor], encoder: GraphEncoder, masked: torch.Tensor
    ) -> torch.Tensor:
        """Reconstruction error on the roots flagged in the boolean ``masked`` (``xs``: the tree's inputs)."""
        target = xs[0].detach()
        hidden = mask_rows(xs, tree.rows, tree.types, tree.rows[0][masked], tree.types[0], self.mask_token)
        code, hop1 = encoder.propagate(hidden, tree.masks)
        code = self.enc_to_dec(code).masked_fill(masked.unsqueeze(-1), 0.0)
        hop1_code = self.enc_to_dec(hop1)
        nbr = masked_mean(hop1_code, tree.masks[1]) if len(tree.masks) > 1 else hop1_code
        return scaled_cosine_error(self.decoder(code, nbr), target, masked, self.config.alpha)

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """Mean reconstruction error over the user side and the item side."""
        total = []
        for tree, xs in subgraph.sides(encoder, self.config.fraction):
            masked = torch.rand(len(tree), generator=subgraph.gen).to(tree.rows[0].device) < self.config.mask_rate
            if not bool(masked.any()):
                masked[0] = True
            total.append(self.side_loss(tree, xs, encoder, masked))
        return torch.stack(total).mean()
