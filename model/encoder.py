"""Graph encoder: id (+ side-feature) inputs, mean aggregation over sampled neighbours, L2-normalised output.

Two propagations: ``sage`` (the seed's GraphSAGE-style layers with dense transforms) and ``lightgcn``
(parameter-free: a layer's output is the mean of the neighbours' states, no transform, no nonlinearity).
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
    """Per node type an id table (sparse grads) plus an optional side-feature projection; shared dense layers.

    The output is the L2-normalised mean of the root's states after 0..n_layers layers (LightGCN's layer
    combination), so a node with few events still gets most of its embedding from its neighbours.
    ``propagation`` picks the layers ("sage": dense transforms; "lightgcn": parameter-free ``NeighbourMean``).
    ``query_layers``/``key_layers`` (None: the mean) weight the layer states of user-side (query) and item-side
    (key) roots. A node's layer-0 input is its id embedding plus a fixed ``base`` vector when one is set
    (e.g. spectral embeddings of the live graph, see ``model.spectral``); ``init_std`` 0 starts ids at zero.
    """

    def __init__(
        self,
        dim: int,
        n_types: int,
        n_layers: int = 2,
        feature_dims: tuple[int, ...] = (),
        propagation: str = "sage",
        query_layers: tuple[float, ...] | None = None,
        key_layers: tuple[float, ...] | None = None,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if propagation not in ("sage", "lightgcn"):
            raise ValueError(f"unknown propagation {propagation!r}")
        self.dim = dim
        self.n_layers = n_layers
        self.propagation = propagation
        self.role_layers = {"query": query_layers, "key": key_layers}
        self.tables = torch.nn.ModuleList([GrowableEmbedding(dim, init_std=init_std) for _ in range(n_types)])
        dims = tuple(feature_dims) + (0,) * (n_types - len(feature_dims))
        self.feature_dims = dims
        self.projections = torch.nn.ModuleList([torch.nn.Linear(max(d, 1), dim, bias=False) for d in dims])
        for t, d in enumerate(dims):
            self.register_buffer(f"features_{t}", torch.zeros(1024 if d else 0, d))
        for t in range(n_types):
            self.register_buffer(f"base_{t}", torch.zeros(0, dim))
        make = (lambda: MeanAggregation(dim)) if propagation == "sage" else NeighbourMean
        self.layers = torch.nn.ModuleList([make() for _ in range(n_layers)])

    def base(self, node_type: int) -> torch.Tensor:
        """The fixed layer-0 vectors of ``node_type`` (rows × dim; empty when none are set)."""
        return getattr(self, f"base_{node_type}")

    def set_base(self, node_type: int, values: torch.Tensor) -> None:
        """Replace the fixed layer-0 vectors of ``node_type`` (rows beyond them get none)."""
        setattr(self, f"base_{node_type}", values.to(self.tables[0].weight.device, torch.float32))

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters every task shares, MGDA's target: aggregation layers and feature projections, or the id
        tables when the propagation has no parameters (``lightgcn``)."""
        layers = list(self.layers.parameters()) or [t.weight for t in self.tables]
        return layers + [
            p for t, proj in enumerate(self.projections) if self.feature_dims[t] for p in proj.parameters()
        ]

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with dense gradients (for Adam)."""
        return list(self.layers.parameters()) + list(self.projections.parameters())

    def features(self, node_type: int) -> torch.Tensor:
        """The side-feature matrix of ``node_type`` (rows × feature dim; zero rows where unset)."""
        return getattr(self, f"features_{node_type}")

    def set_features(self, node_type: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store side features for ``rows`` of ``node_type``; the matrix grows as needed."""
        feats = self.features(node_type)
        need = int(rows.max()) + 1 if len(rows) else 0
        if need > len(feats):
            grown = torch.zeros(max(need, 2 * len(feats)), feats.shape[1], device=feats.device)
            grown[: len(feats)] = feats
            setattr(self, f"features_{node_type}", grown)
        self.features(node_type)[rows] = values.to(feats.device, feats.dtype)

    def inputs_of(self, rows: torch.Tensor, node_type: int) -> torch.Tensor:
        """Layer-0 input of ``rows``: id embedding plus projected side features (when configured)."""
        x = self.tables[node_type](rows)
        base = self.base(node_type)
        if len(base):
            inside = rows < len(base)
            x = x + base[rows.clamp_max(len(base) - 1)] * inside.unsqueeze(-1)
        if self.feature_dims[node_type]:
            feats = self.features(node_type)
            inside = rows < len(feats)
            f = feats[rows.clamp_max(max(len(feats) - 1, 0))] * inside.unsqueeze(-1)
            x = x + self.projections[node_type](f)
        return x

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
        role: str | None = None,
        coefs: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layers bottom-up over the tree; returns (normalised root embedding, hop-1 states after layer 1).

        ``noise`` > 0 perturbs every layer's output (SimGCL views); ``role`` ("query"/"key") picks the layer
        weights of that side (None: the mean over layers); ``coefs`` are the tree's edge weights (``Tree.coefs``).
        A tree shallower than the layers stops early: its role's weights must be zero past its depth.
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
        weights = self.role_layers.get(role) if role else None
        return F.normalize(combine_layers(outs, weights), dim=-1), hop1

    def forward(self, tree: Tree) -> torch.Tensor:
        """Normalised embeddings of the tree's roots."""
        return self.propagate(self.inputs(tree), tree.masks)[0]

    @torch.no_grad()
    def all_inputs(self, node_type: int, n_rows: int, chunk: int = 8192) -> torch.Tensor:
        """Layer-0 inputs of rows 0..n_rows-1 of ``node_type``."""
        dev = self.tables[0].weight.device
        parts = [
            self.inputs_of(torch.arange(s, min(s + chunk, n_rows), device=dev), node_type)
            for s in range(0, n_rows, chunk)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, device=dev)

    @torch.no_grad()
    def infer_roles(
        self,
        inputs: tuple[torch.Tensor, torch.Tensor],
        query_adj: torch.Tensor,
        key_adj: torch.Tensor,
        normalise_keys: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-graph LightGCN propagation: (query vectors of every user row, key vectors of every item row).

        ``inputs`` = (layer-0 user states, layer-0 item states); ``query_adj`` (users × items) and ``key_adj``
        (items × users) are the normalised sparse adjacencies. Layer l+1 of a user is ``query_adj`` times layer l
        of the items (and vice versa); each role combines its layers with its weights. Queries are L2-normalised;
        keys only with ``normalise_keys`` (otherwise their length carries how central an item is).
        """
        users, items = [inputs[0]], [inputs[1]]
        for _ in range(self.n_layers):
            users, items = (
                users + [torch.sparse.mm(query_adj, items[-1])],
                items + [torch.sparse.mm(key_adj, users[-1])],
            )
        query = combine_layers(users, self.role_layers["query"])
        key = combine_layers(items, self.role_layers["key"])
        return F.normalize(query, dim=-1), F.normalize(key, dim=-1) if normalise_keys else key

    @torch.no_grad()
    def infer(
        self,
        rows: np.ndarray,
        node_type: int,
        adjacency: dict[int, torch.Tensor],
        other: dict[int, int],
        chunk: int = 8192,
    ) -> torch.Tensor:
        """Deterministic embeddings using every buffered neighbour, layer by layer over the whole graph.

        ``adjacency[t]`` is the row-normalised sparse matrix of type-t nodes over their neighbours and
        ``other[t]`` the neighbours' type (see ``GraphStore.adjacency``).
        """
        types = sorted(adjacency)
        dev = self.tables[0].weight.device
        states = {
            t: [
                torch.cat(
                    [
                        self.inputs_of(torch.arange(s, min(s + chunk, adjacency[t].shape[0]), device=dev), t)
                        for s in range(0, max(adjacency[t].shape[0], 1), chunk)
                    ]
                )[: adjacency[t].shape[0]]
            ]
            for t in types
        }
        for layer in self.layers:
            nxt = {t: layer(states[t][-1], torch.sparse.mm(adjacency[t], states[other[t]][-1])) for t in types}
            for t in types:
                states[t].append(nxt[t])
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(dev)
        return F.normalize(torch.stack([s[idx] for s in states[node_type]]).mean(dim=0), dim=-1)
