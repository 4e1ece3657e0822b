"""Embedding drift: how far refreshed embeddings moved, and river detectors on the per-batch series."""

from __future__ import annotations

import numpy as np

from indexer.publisher import Published


class NoDrift:
    """The null drift monitor: measures nothing, never alarms."""

    def observe(self, published: Published, recall: float | None) -> tuple[dict[str, float], list[str]]:
        """Return (figures, names of signals that drifted)."""
        return {}, []


def cosine_shift(previous: np.ndarray, current: np.ndarray, existed: np.ndarray) -> np.ndarray:
    """Cosine distance between previous and current rows, for rows that had a previous vector."""
    prev, cur = previous[existed], current[existed]
    denom = np.linalg.norm(prev, axis=1) * np.linalg.norm(cur, axis=1)
    return 1.0 - (prev * cur).sum(axis=1) / np.maximum(denom, 1e-12)
