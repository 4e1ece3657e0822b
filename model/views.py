"""Augmented views of a sampled subgraph for the self-supervised tasks: edge drop, feature drop, masking, noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rand(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(device)


def drop_edges(masks: list[torch.Tensor], p: float, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Drop each sampled neighbour slot with probability ``p`` (hop 0, the roots, is kept); children follow parents.

    >>> m = [torch.ones(2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)]
    >>> [x.all().item() for x in drop_edges(m, 0.0)]
    [True, True]
    """
    if p <= 0:
        return masks
    out = [masks[0]]
    for m in masks[1:]:
        kept = m & (_rand(tuple(m.shape), gen, m.device) >= p)
        out.append(kept & out[-1].unsqueeze(-1))
    return out


def drop_features(xs: list[torch.Tensor], p: float, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """Zero the same random ``p`` share of feature columns in every node input (CCA-SSG's feature masking)."""
    if p <= 0:
        return xs
    keep = (_rand((xs[0].shape[-1],), gen, xs[0].device) >= p).to(xs[0].dtype)
    return [x * keep for x in xs]


def mask_rows(
    xs: list[torch.Tensor],
    rows: list[torch.Tensor],
    types: list[int],
    masked: torch.Tensor,
    node_type: int,
    token: torch.Tensor,
) -> list[torch.Tensor]:
    """Replace the input of every occurrence of the ``masked`` rows (of ``node_type``) by ``token``, at any hop.

    Masking all occurrences keeps a masked root from leaking its own input back through a 2-hop path.
    """
    out = []
    for x, r, t in zip(xs, rows, types):
        if t != node_type:
            out.append(x)
            continue
        hit = torch.isin(r, masked).unsqueeze(-1)
        out.append(torch.where(hit, token.expand_as(x), x))
    return out


def perturb(h: torch.Tensor, eps: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """SimGCL's noise: add ``eps`` · a random unit vector that agrees in sign with ``h``."""
    if eps <= 0:
        return h
    noise = F.normalize(_rand(tuple(h.shape), gen, h.device), dim=-1)
    return h + eps * noise * torch.sign(h)
