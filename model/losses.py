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


def _standardise(z: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) std per column, divided by sqrt(N) so that Z̃ᵀZ̃ is the correlation matrix."""
    z = z - z.mean(dim=0)
    return z / (z.std(dim=0, unbiased=False) + 1e-8) / len(z) ** 0.5


def cca_ssg_terms(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CCA-SSG's invariance ‖Z̃₁ − Z̃₂‖² and decorrelation ‖Z̃₁ᵀZ̃₁ − I‖² + ‖Z̃₂ᵀZ̃₂ − I‖² on standardised views.

    >>> a = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    >>> z = torch.linalg.qr(a - a.mean(0))[0]  # centred, orthonormal columns: already whitened
    >>> inv, dec = cca_ssg_terms(z, z)
    >>> round(inv.item(), 4), dec.item() < 1e-3
    (0.0, True)
    """
    a, b = _standardise(z1), _standardise(z2)
    eye = torch.eye(a.shape[1], device=a.device, dtype=a.dtype)
    invariance = (a - b).pow(2).sum()
    decorrelation = (a.T @ a - eye).pow(2).sum() + (b.T @ b - eye).pow(2).sum()
    return invariance, decorrelation


def cca_ssg_loss(z1: torch.Tensor, z2: torch.Tensor, lam: float) -> torch.Tensor:
    """CCA-SSG objective (Zhang et al. 2021): invariance + ``lam`` · decorrelation."""
    invariance, decorrelation = cca_ssg_terms(z1, z2)
    return invariance + lam * decorrelation


def scaled_cosine_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """GraphMAE's scaled cosine error mean over masked rows of (1 − cos(pred, target))^alpha.

    Rows where ``mask`` is False contribute nothing (and get no gradient); no masked row → 0.

    >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> scaled_cosine_error(p, t, torch.tensor([True, False]), alpha=2.0).item()
    1.0
    """
    if not bool(mask.any()):
        return pred.sum() * 0.0
    cos = F.cosine_similarity(pred[mask], target[mask], dim=-1)
    return (1.0 - cos).clamp_min(0.0).pow(alpha).mean()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views: row i of ``z1`` should match row i of ``z2`` among all rows.

    >>> z = torch.eye(3)
    >>> info_nce(z, z, 0.1).item() < 1e-3
    True
    """
    a, b = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
