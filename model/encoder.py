"""The learned block's graph encoder: free id embeddings propagated by parameter-free LightGCN layers.

A layer's output is the (weighted) sum of the neighbours' states: no transform, no nonlinearity, so every
parameter is an id embedding and a served vector is a fixed linear function of a bounded set of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ebrflow.model.tables import GrowableEmbedding
from ebrflow.model.views import perturb


@dataclass
class Tree:
    """A sampled computation tree on the device: per hop the node rows, validity mask and node type.

    Hop 0 holds the roots (B,); hop k has shape (B, f1, ..., fk). ``coefs`` (optional, per hop, shaped like its
    rows) are fixed edge weights: a layer then sums ``coef × neighbour state`` instead of taking the masked mean
    (the served propagation's normalised, recency-weighted edges). A sparse (B × n) coefficient matrix makes hop 1
    flat: its rows are n distinct neighbours, each looked up once (``aggregate``).
    """

    rows: list[torch.Tensor]
    masks: list[torch.Tensor]
    types: list[int]
    coefs: list[torch.Tensor] | None = None

    @classmethod
    def from_numpy(
        cls,
        rows: list[np.ndarray],
        masks: list[np.ndarray],
        types: list[int],
        device: torch.device,
        coefs: list[np.ndarray] | None = None,
    ) -> Tree:
        """Move a ``GraphStore.sample`` result (plus optional edge weights) to ``device``."""
        return cls(
            [torch.from_numpy(r).to(device) for r in rows],
            [torch.from_numpy(m).to(device) for m in masks],
            types,
            None if coefs is None else [torch.from_numpy(c).to(device) for c in coefs],
        )

    def __len__(self) -> int:
        return len(self.rows[0])

    def select(self, idx: torch.Tensor) -> Tree:
        """The sub-tree of the roots at positions ``idx``."""
        coefs = None if self.coefs is None else [c[idx] for c in self.coefs]
        return Tree([r[idx] for r in self.rows], [m[idx] for m in self.masks], self.types, coefs)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over its second-to-last axis where ``mask``; rows with no valid entry give zeros."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=-2) / w.sum(dim=-2).clamp_min(1.0)


class MeanAggregation(torch.nn.Module):
    """One GraphSAGE-style layer ``W_self·h + W_nbr·mean(neighbours)``, initialised to LightGCN-like halving."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_lin = torch.nn.Linear(dim, dim, bias=False)
        self.nbr_lin = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.self_lin.weight.copy_(0.5 * torch.eye(dim))
            self.nbr_lin.weight.copy_(0.5 * torch.eye(dim))

    def forward(self, h: torch.Tensor, nbr_mean: torch.Tensor) -> torch.Tensor:
        """Combine a node's state with the mean of its neighbours' states."""
        return self.self_lin(h) + self.nbr_lin(nbr_mean)


class NeighbourMean(torch.nn.Module):
    """A parameter-free LightGCN layer: the next state of a node is the mean of its neighbours' states.

    >>> NeighbourMean()(torch.ones(1, 2), torch.tensor([[0.5, 2.0]])).tolist()
    [[0.5, 2.0]]
    """

    def forward(self, h: torch.Tensor, nbr_mean: torch.Tensor) -> torch.Tensor:
        """Ignore the node's own state; return the neighbours' mean."""
        return nbr_mean


def aggregate(x: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
    """Neighbour states ``x`` reduced over their second-to-last axis: the masked mean, or ``Σ coef·x`` with weights.

    A sparse ``coef`` (parents × the hop's rows) is a flat hop: ``x`` holds each distinct neighbour once and the
    result is ``coef @ x``.

    >>> aggregate(torch.ones(1, 2, 1), torch.tensor([[True, False]]), torch.tensor([[0.5, 9.0]])).tolist()
    [[0.5]]
    >>> flat = torch.sparse_coo_tensor([[0, 0, 1], [0, 1, 1]], [0.5, 1.0, 2.0], (2, 2))
    >>> aggregate(torch.tensor([[1.0], [3.0]]), torch.ones(2, dtype=torch.bool), flat).tolist()
    [[3.5], [6.0]]
    """
    if coef is None:
        return masked_mean(x, mask)
    if coef.is_sparse:
        return torch.sparse.mm(coef, x)
    return (x * (coef * mask).unsqueeze(-1)).sum(dim=-2)


def combine_layers(outs: list[torch.Tensor], weights: tuple[float, ...] | None) -> torch.Tensor:
    """Weighted sum of per-layer states (``weights`` None: their mean, LightGCN's layer combination).

    Weights past the last state must be zero (a tree only as deep as the weighted layers need).

    >>> combine_layers([torch.ones(2), 3 * torch.ones(2)], None).tolist(), combine_layers(
    ...     [torch.ones(2), 3 * torch.ones(2)], (0.0, 1.0, 0.0)).tolist()
    ([2.0, 2.0], [3.0, 3.0])
    """
    if weights is None:
        return torch.stack(outs).mean(dim=0)
    if len(weights) > len(outs) and not any(weights[len(outs) :]):
        weights = weights[: len(outs)]
    if len(weights) != len(outs):
        raise ValueError(f"{len(weights)} layer weights for {len(outs)} layer states")
    return sum(w * o for w, o in zip(weights, outs) if w)  # type: ignore[return-value]


class GraphEncoder(torch.nn.Module):
    """Per node type a free id table (sparse gradients), propagated by ``n_layers`` parameter-free LightGCN layers.

    ``propagate`` combines the root's states after 0..n layers: with ``weights`` (the served ``layer_weights``,
    LightGCN's pooling of layers 0 and 1 by default) or, without, their mean (the self-supervised tasks' deeper
    sampled trees). Tables start near zero (``init_std``): Adam's fixed step size then moves a row a long way
    relative to its start, which is what makes a few epochs enough (measured in ``../shared/ANCHORS.md``).
    """

    def __init__(
        self,
        dim: int,
        n_types: int,
        n_layers: int = 2,
        layer_weights: tuple[float, ...] = (0.5, 0.5),
        init_std: float = 0.005,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_layers = n_layers
        self.layer_weights = tuple(layer_weights)
        self.tables = torch.nn.ModuleList([GrowableEmbedding(dim, init_std=init_std) for _ in range(n_types)])
        self.layers = torch.nn.ModuleList([NeighbourMean() for _ in range(n_layers)])

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters every task shares (MGDA's target): the id tables."""
        return [t.weight for t in self.tables]

    def inputs_of(self, rows: torch.Tensor, node_type: int) -> torch.Tensor:
        """Layer-0 input of ``rows``: their id embeddings."""
        return self.tables[node_type](rows)

    def inputs(self, tree: Tree) -> list[torch.Tensor]:
        """Layer-0 inputs of every hop of ``tree``."""
        return self.batched_inputs([tree])[0]

    def batched_inputs(self, trees: list[Tree]) -> list[list[torch.Tensor]]:
        """Inputs of every hop of several trees with a single table lookup per node type.

        One lookup (then ``split``) yields one sparse gradient per table; separate lookups would make autograd
        add many sparse gradients, which costs ~10× more on CPU.
        """
        out: list[list[torch.Tensor | None]] = [[None] * len(tree.rows) for tree in trees]
        for t in {t for tree in trees for t in tree.types}:
            parts = [
                (k, j, r)
                for k, tree in enumerate(trees)
                for j, (r, tt) in enumerate(zip(tree.rows, tree.types))
                if tt == t
            ]
            x = self.inputs_of(torch.cat([r.reshape(-1) for _, _, r in parts]), t)
            for (k, j, r), piece in zip(parts, torch.split(x, [r.numel() for _, _, r in parts])):
                out[k][j] = piece.reshape(*r.shape, self.dim)
        return out  # type: ignore[return-value]

    def propagate(
        self,
        xs: list[torch.Tensor],
        masks: list[torch.Tensor],
        noise: float = 0.0,
        gen: torch.Generator | None = None,
        coefs: list[torch.Tensor] | None = None,
        served: bool = False,
        normalise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layers bottom-up over the tree; returns (root embedding, hop-1 states after layer 1).

        ``served`` combines the layer states with ``layer_weights`` (a served tree is one hop deep), otherwise
        with their mean; ``normalise`` L2-normalises the root (training compares cosines, serving uses the raw
        pooled vector, whose length carries popularity). ``noise`` > 0 perturbs every layer's output (SimGCL
        views); ``coefs`` are the tree's edge weights (``Tree.coefs``).
        """
        hs, outs, hop1 = list(xs), [xs[0]], xs[1] if len(xs) > 1 else xs[0]
        for k, layer in enumerate(self.layers):
            if len(hs) < 2:
                break
            hs = [
                perturb(layer(hs[j], aggregate(hs[j + 1], masks[j + 1], coefs[j + 1] if coefs else None)), noise, gen)
                for j in range(len(hs) - 1)
            ]
            outs.append(hs[0])
            if k == 0 and len(hs) > 1:
                hop1 = hs[1]
        root = combine_layers(outs, self.layer_weights if served else None)
        return (F.normalize(root, dim=-1) if normalise else root), hop1

    def forward(self, tree: Tree) -> torch.Tensor:
        """Normalised embeddings of the tree's roots (layer mean)."""
        return self.propagate(self.inputs(tree), tree.masks)[0]
