"""An in-process copy of exactly what was last published to Milvus, for evaluation and drift."""

from __future__ import annotations

import numpy as np
import torch


class EmbeddingMirror:
    """Published vectors by raw id, updated with the same rows that are upserted.

    Prequential evaluation and drift read this instead of querying Milvus per event: it holds
    the served state (what a caller of Milvus would get), not the model's newer weights.

    >>> m = EmbeddingMirror(dim=2)
    >>> m.update(np.array([5, 9]), np.array([[1, 0], [0, 1]], np.float32))[1].tolist()
    [False, False]
    >>> m.topk(np.array([[1.0, 0.1]], np.float32), k=1).tolist()
    [[5]]
    """

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._written = np.zeros(capacity, dtype=np.float64)  # when each row was last published (wall clock)
        self._n = 0
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their rows), rebuilt after additions

    def __len__(self) -> int:
        return self._n

    def __contains__(self, raw_id: int) -> bool:
        return bool(self.rows_of(np.array([raw_id], dtype=np.int64))[0] >= 0)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The row of each id, -1 for ids never published (vectorised: a binary search over the sorted ids).

        >>> m = EmbeddingMirror(dim=1)
        >>> _ = m.update(np.array([9, 4]), np.zeros((2, 1), np.float32))
        >>> m.rows_of(np.array([4, 5, 9])).tolist()
        [1, -1, 0]
        """
        ids = np.asarray(ids, dtype=np.int64)
        if self._index is None:
            order = np.argsort(self._ids[: self._n], kind="stable")
            self._index = (self._ids[: self._n][order], order)
        keys, order = self._index
        if not len(keys):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        return np.where(keys[pos] == ids, order[pos], -1)

    def update(self, ids: np.ndarray, vectors: np.ndarray, at: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Store ``vectors`` for ``ids``, written at ``at`` (wall clock); returns (previous vectors, existed mask)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.rows_of(ids)
        known = rows >= 0
        unique, first = np.unique(ids, return_index=True)
        existed = known.copy()
        existed[np.setdiff1d(np.arange(len(ids)), first)] = True  # a repeat within the call: its first made it
        if not known.all():
            new = unique[rows[first] < 0]
            new = new[np.argsort(first[rows[first] < 0], kind="stable")]  # rows in order of first appearance
            end = self._n + len(new)
            while end > len(self._ids):
                self._grow()
            self._ids[self._n : end] = new
            self._n, self._index = end, None
            rows = self.rows_of(ids)
        previous = self._vectors[rows].copy()
        self._vectors[rows] = vectors
        self._written[rows] = at
        return previous, existed

    def remove(self, ids: np.ndarray) -> int:
        """Forget ``ids`` (unknown ones are skipped): the last rows move into the holes; returns how many."""
        rows = np.sort(self.rows_of(ids))
        rows = np.unique(rows[rows >= 0])
        if not len(rows):
            return 0
        keep = np.ones(self._n, dtype=bool)
        keep[rows] = False
        n = int(keep.sum())
        for name in ("_ids", "_vectors", "_written"):
            arr = getattr(self, name)
            arr[:n] = arr[: self._n][keep]
        self._n, self._index = n, None
        return len(rows)

    def oldest_write(self) -> float | None:
        """When the least recently published row was written (None while empty)."""
        return float(self._written[: self._n].min()) if self._n else None

    def _grow(self) -> None:
        cap = 2 * len(self._ids)
        self._ids = np.resize(self._ids, cap)
        self._written = np.resize(self._written, cap)
        vectors = np.zeros((cap, self.dim), dtype=np.float32)
        vectors[: len(self._vectors)] = self._vectors
        self._vectors = vectors

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found mask) for ``ids``; rows of unknown ids are zero."""
        rows = self.rows_of(ids)
        found = rows >= 0
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        out[found] = self._vectors[rows[found]]
        return out, found

    def ids(self) -> np.ndarray:
        """All published ids."""
        return self._ids[: self._n].copy()

    def vectors(self) -> np.ndarray:
        """All published vectors, rows aligned with ``ids()`` (a view: copy before keeping)."""
        return self._vectors[: self._n]

    def topk(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None) -> np.ndarray:
        """Exact inner-product top-``k`` ids per query row; ``exclude[i]`` are ids hidden from row i.

        Rows with fewer than ``k`` candidates are padded with -1.
        """
        if self._n == 0:
            return np.full((len(queries), k), -1, dtype=np.int64)
        scores = torch.from_numpy(queries) @ torch.from_numpy(self.vectors()).T
        if exclude is not None and len(exclude):
            lengths = [len(ex) for ex in exclude]
            if sum(lengths):
                owner = np.repeat(np.arange(len(exclude)), lengths)
                cols = self.rows_of(np.concatenate(exclude))
                known = cols >= 0
                scores[torch.from_numpy(owner[known]), torch.from_numpy(cols[known])] = float("-inf")
        kk = min(k, self._n)
        top = torch.topk(scores, kk, dim=1)
        ids = self._ids[top.indices.numpy()]
        ids[~torch.isfinite(top.values).numpy()] = -1
        if kk < k:
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return ids
