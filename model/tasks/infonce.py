"""SimGCL-style contrastive task: two noise-perturbed encodings of the same roots, InfoNCE between them."""

from __future__ import annotations

import torch
from ebrflow.model.encoder import GraphEncoder
from ebrflow.model.losses import info_nce
from ebrflow.model.tasks.base import Subgraph, Task


class InfoNCETask(Task):
    """SimGCL (Yu et al. 2022): uniform noise of size ``eps`` on every layer's output makes the two views."""

    name = "infonce"

    def __init__(self, fraction: float = 0.25, eps: float = 0.1, temperature: float = 0.2) -> None:
        super().__init__()
        self.fraction = fraction
        self.eps = eps
        self.temperature = temperature

    def loss(self, subgraph: Subgraph, encoder: GraphEncoder) -> torch.Tensor:
        """Mean InfoNCE over the user side and the item side."""
        total = []
        for tree, xs in subgraph.sides(encoder, self.fraction):
            z1 = encoder.propagate(xs, tree.masks, noise=self.eps, gen=subgraph.gen)[0]
            z2 = encoder.propagate(xs, tree.masks, noise=self.eps, gen=subgraph.gen)[0]
            total.append(info_nce(z1, z2, self.temperature))
        return torch.stack(total).mean()
