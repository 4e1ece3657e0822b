"""What each user has already interacted with: a bounded, most-recent-last list per user."""

from __future__ import annotations

import numpy as np
import torch


class SeenItems:
    """Per-user recent distinct items (at most ``capacity``), used to exclude them from recommendations.

    >>> s = SeenItems(capacity=2)
    >>> s.add(np.array([1, 1, 1]), np.array([5, 6, 7]))
    >>> s.get(1).tolist()
    [6, 7]
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._seen: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def count(self, user_id: int) -> int:
        """How many distinct recent items the user has (0 for an unknown user)."""
        items = self._seen.get(int(user_id))
        return 0 if items is None else len(items)

    def get(self, user_id: int) -> np.ndarray:
        """The user's recent items, oldest first (empty for an unknown user)."""
        return self._seen.get(int(user_id), np.empty(0, np.int64))

    def contains(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Whether each (user, item) pair is among the user's recent items, vectorised over the pairs.

        >>> s = SeenItems()
        >>> s.add(np.array([1, 2]), np.array([5, 6]))
        >>> s.contains(np.array([1, 1, 2, 3]), np.array([5, 6, 6, 5])).tolist()
        [True, False, True, False]
        """
        users, owner_of_pair = np.unique(np.asarray(user_ids, np.int64), return_inverse=True)
        lists = [self.get(u) for u in users.tolist()]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        if not lengths.sum():
            return np.zeros(len(owner_of_pair), dtype=bool)
        seen = np.stack([np.repeat(np.arange(len(users)), lengths), np.concatenate(lists)], axis=1)
        pairs = np.stack([owner_of_pair.ravel(), np.asarray(item_ids, np.int64)], axis=1)
        return np.isin(_as_keys(pairs), _as_keys(seen))

    def add(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Record interactions in order; a repeated item moves to the most recent end."""
        if len(user_ids) == 0:
            return
        order = np.argsort(user_ids, kind="stable")
        users, items = user_ids[order], item_ids[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(users)]):
            user = int(users[start])
            new = items[start:end]
            old = self._seen.get(user)
            merged = new if old is None else np.concatenate([old, new])
            # keep the last occurrence of each item, in order of last occurrence
            _, last_rev = np.unique(merged[::-1], return_index=True)
            keep = np.sort(len(merged) - 1 - last_rev)
            self._seen[user] = merged[keep][-self.capacity :]

    def remove(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget the lists of ``user_ids`` and ``item_ids`` from every list (expired ids)."""
        for u in np.asarray(user_ids).tolist():
            self._seen.pop(int(u), None)
        if len(item_ids):
            gone = np.asarray(item_ids, dtype=np.int64)
            for u, items in self._seen.items():
                drop = np.isin(items, gone)
                if drop.any():
                    self._seen[u] = items[~drop]

    def state_dict(self) -> dict:
        """Flat tensors: users, lengths, concatenated items."""
        users = list(self._seen)
        lengths = [len(self._seen[u]) for u in users]
        flat = np.concatenate([self._seen[u] for u in users]) if users else np.empty(0, np.int64)
        return {
            "users": torch.tensor(users, dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "items": torch.from_numpy(flat.astype(np.int64)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        items = state["items"].numpy()
        bounds = np.r_[0, np.cumsum(state["lengths"].numpy())]
        self._seen = {int(u): items[bounds[i] : bounds[i + 1]].copy() for i, u in enumerate(state["users"].tolist())}


def _as_keys(pairs: np.ndarray) -> np.ndarray:
    """Rows of an (n, 2) int64 array as single comparable values (16-byte voids), for set operations on pairs."""
    return np.ascontiguousarray(pairs, dtype=np.int64).view(np.dtype((np.void, 16))).ravel()
