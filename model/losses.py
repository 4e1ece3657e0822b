"""Loss functions on tensors only: no ids, no tables, no config."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_ids: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    extra_keys: torch.Tensor | None = None,
    extra_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax: row i's positive is key i, the other keys of the batch are negatives.

    ``log_q`` (log sampling probability of each key) applies the logQ correction; keys sharing
    ``key_ids`` with the positive (accidental hits) are masked out; ``extra_keys`` are extra
    random negatives with their own ``extra_log_q``. ``weights`` weight each row's loss.

    >>> q = torch.eye(2); k = torch.eye(2)
    >>> round(sampled_softmax(q, k, torch.tensor([0, 1]), temperature=1.0).item(), 4)
    0.3133
    """
    logits = queries @ keys.T / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = key_ids.unsqueeze(0) == key_ids.unsqueeze(1)
    hits = same & ~torch.eye(len(key_ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(hits, float("-inf"))
    if extra_keys is not None and len(extra_keys):
        extra = queries @ extra_keys.T / temperature
        if extra_log_q is not None:
            extra = extra - extra_log_q.unsqueeze(0)
        logits = torch.cat([logits, extra], dim=1)
    target = torch.arange(len(queries), device=logits.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum()
