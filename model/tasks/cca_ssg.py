"""CCA-SSG on the batch subgraph: two views by edge and feature drop, invariance plus λ·decorrelation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebrflow.model.encoder import GraphEncoder
from ebrflow.model.losses import cca_ssg_loss
from ebrflow.model.tasks.base import Subgraph, Task
from ebrflow.model.views import drop_edges, drop_features


@dataclass(frozen=True)
class CCASSGConfig:
    """Share of roots used, decorrelation weight ``lam`` (λ), edge and feature drop rates of the views."""

    fraction: float = 0.25
    lam: float = 1e-3
    edge_drop: float = 0.2
    feature_drop: float = 0.2


class CCASSGTask(Task):
    """Canonical-correlation self-supervision (Zhang et al. 2021) on a random ``fraction`` of each side's roots.

    Both views reuse the sampled tree (augmentations touch only the batch subgraph, as in Snap's setup).
    """

    name = "cca_ssg"
    Config = CCASSGConfig
    default_weight = 0.05

    def __init__(self, config: CCASSGConfig | None = None) -> None:
        super().__init__()
        self.config = config or CCASSGConfig()
        self.fraction = self.config.fraction

    def _view(self, tree, encoder: GraphEncoder, xs: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        features = drop_features(xs, self.config.feature_drop, gen)
        return encoder.propagate(features, drop_edges(tree.masks, self.config.edge_drop, gen))[0]

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """Mean CCA-SSG loss over the user side and the item side."""
        total = []
        for tree, xs in subgraph.sides(encoder, self.config.fraction):
            z1 = self._view(tree, encoder, xs, subgraph.gen)
            z2 = self._view(tree, encoder, xs, subgraph.gen)
            total.append(cca_ssg_loss(z1, z2, self.config.lam))
        return torch.stack(total).mean()
