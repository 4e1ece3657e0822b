"""A uniform replay reservoir of past events (Vitter's algorithm R) held in numpy arrays."""

from __future__ import annotations

import numpy as np
import torch


class Reservoir:
    """Keeps a uniform sample of at most ``size`` of all events ever added, as (user row, item row, weight).

    >>> r = Reservoir(size=3, seed=0)
    >>> r.add(np.arange(10), np.arange(10), np.ones(10, np.float32))
    >>> len(r), r.seen
    (3, 10)
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.users = np.zeros(size, dtype=np.int64)
        self.items = np.zeros(size, dtype=np.int64)
        self.weights = np.zeros(size, dtype=np.float32)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def add(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> None:
        """Offer events in order: event number n replaces a random slot with probability size / (n + 1)."""
        n = len(users)
        if n == 0 or self.size == 0:
            self.seen += n
            return
        pos = self.seen + np.arange(n)
        slot = np.where(pos < self.size, pos, np.floor(self._rng.random(n) * (pos + 1)).astype(np.int64))
        take = slot < self.size
        # a later event replacing the same slot wins, as in the sequential algorithm
        src = np.flatnonzero(take)[::-1]
        dst, first = np.unique(slot[src], return_index=True)
        src = src[first]
        self.users[dst], self.items[dst], self.weights[dst] = users[src], items[src], weights[src]
        self.seen += n

    def drop(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        """Remove the stored events of ``user_rows`` or ``item_rows`` (removed ids: their rows will be reused)."""
        n = len(self)
        keep = ~(np.isin(self.users[:n], user_rows) | np.isin(self.items[:n], item_rows))
        if keep.all():
            return
        m = int(keep.sum())
        self.users[:m], self.items[:m], self.weights[:m] = (
            self.users[:n][keep],
            self.items[:n][keep],
            self.weights[:n][keep],
        )
        self.seen = m  # the survivors are a uniform sample of what is left; sampling goes on from there

    def sample(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``k`` stored events drawn uniformly with replacement (fewer if the reservoir is empty)."""
        if len(self) == 0 or k <= 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.float32)
        idx = rng.integers(0, len(self), size=k)
        return self.users[idx], self.items[idx], self.weights[idx]

    def state_dict(self) -> dict:
        """Arrays and count as tensors."""
        n = len(self)
        return {
            "users": torch.from_numpy(self.users[:n].copy()),
            "items": torch.from_numpy(self.items[:n].copy()),
            "weights": torch.from_numpy(self.weights[:n].copy()),
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        n = len(state["users"])
        self.users[:n], self.items[:n], self.weights[:n] = state["users"], state["items"], state["weights"]
        self.seen = int(state["seen"])
