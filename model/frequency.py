"""Streaming estimate of how often each item is sampled into a batch, for the logQ correction."""

from __future__ import annotations

import numpy as np
import torch


class ItemFrequency:
    """Exponentially decayed per-row counts; ``log_q`` is the log share of each row.

    Decay ``d`` per update keeps the estimate tracking a drifting popularity
    (half-life ≈ ln 2 / (1 - d) updates).

    >>> f = ItemFrequency(decay=1.0)
    >>> f.update(np.array([0, 0, 1]))
    >>> np.round(np.exp(f.log_q(np.array([0, 1]))), 3).tolist()
    [0.667, 0.333]
    """

    def __init__(self, decay: float = 0.999) -> None:
        self.decay = decay
        self._counts = np.zeros(0, dtype=np.float64)
        self._total = 0.0

    def update(self, rows: np.ndarray) -> None:
        """Count one batch of item rows."""
        if len(rows) and rows.max() >= len(self._counts):
            grown = np.zeros(max(int(rows.max()) + 1, 2 * len(self._counts)), dtype=np.float64)
            grown[: len(self._counts)] = self._counts
            self._counts = grown
        if self.decay != 1.0:  # lifetime counts (decay 1) skip the O(rows seen) pass
            self._counts *= self.decay
        self._total = self._total * self.decay + len(rows)
        np.add.at(self._counts, rows, 1.0)

    def reset(self, rows: np.ndarray) -> None:
        """Forget the counts of ``rows`` (removed ids: another id may reuse the row)."""
        rows = rows[rows < len(self._counts)]
        self._total = max(self._total - float(self._counts[rows].sum()), 0.0)
        self._counts[rows] = 0.0

    def log_q(self, rows: np.ndarray) -> np.ndarray:
        """Log of each row's estimated share of sampled items (floored to avoid -inf)."""
        share = self._counts[rows] / max(self._total, 1.0)
        return np.log(np.maximum(share, 1e-9))

    def state_dict(self) -> dict:
        """Counts and total as tensors."""
        return {
            "counts": torch.from_numpy(self._counts.copy()),
            "total": torch.tensor(self._total, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self._counts = state["counts"].numpy().astype(np.float64)
        self._total = float(state["total"])
