"""SimGCL-style contrastive task: two noise-perturbed encodings of the same roots, InfoNCE between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebrflow.model.encoder import GraphEncoder
from ebrflow.model.losses import info_nce
from ebrflow.model.tasks.base import Subgraph, Task


@dataclass(frozen=True)
class InfoNCEConfig:
    """Share of roots used, noise size ``eps`` of the views, InfoNCE ``temperature``."""

    fraction: float = 0.25
    eps: float = 0.1
    temperature: float = 0.2


class InfoNCETask(Task):
    """SimGCL (Yu et al. 2022): uniform noise of size ``eps`` on every layer's output makes the two views."""

    name = "infonce"
    Config = InfoNCEConfig
    default_weight = 0.1

    def __init__(self, config: InfoNCEConfig | None = None) -> None:
        super().__init__()
        self.config = config or InfoNCEConfig()
        self.fraction = self.config.fraction

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """Mean InfoNCE over the user side and the item side."""
        cfg, total = self.config, []
        for tree, xs in subgraph.sides(encoder, cfg.fraction):
            z1 = encoder.propagate(xs, tree.masks, noise=cfg.eps, gen=subgraph.gen)[0]
            z2 = encoder.propagate(xs, tree.masks, noise=cfg.eps, gen=subgraph.gen)[0]
            total.append(info_nce(z1, z2, cfg.temperature))
        return torch.stack(total).mean()
