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
        self._rows: dict[int, int] = {}
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._written = np.zeros(capacity, dtype=np.float64)  # when each row was last published (wall clock)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __contains__(self, raw_id: int) -> bool:
        return int(raw_id) in self._rows

    def update(self, ids: np.ndarray, vectors: np.ndarray, at: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Store ``vectors`` for ``ids``, written at ``at`` (wall clock); returns (previous vectors, existed mask)."""
        rows = np.empty(len(ids), dtype=np.int64)
        existed = np.zeros(len(ids), dtype=bool)
        for i, raw in enumerate(ids.tolist()):
            row = self._rows.get(raw)
            if row is None:
                row = self._rows[raw] = self._n
                self._n += 1
                if self._n > len(self._ids):
                    self._grow()
                self._ids[row] = raw
            else:
                existed[i] = True
            rows[i] = row
        previous = self._vectors[rows].copy()
        self._vectors[rows] = vectors
        self._written[rows] = at
        return previous, existed

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
        rows = np.array([self._rows.get(r, -1) for r in ids.tolist()], dtype=np.int64)
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
            get = self._rows.get
            cols = [get(r, -1) for ex in exclude for r in ex.tolist()]
            if cols:
                owner = np.repeat(np.arange(len(exclude)), [len(ex) for ex in exclude])
                cols_arr = np.asarray(cols, dtype=np.int64)
                known = cols_arr >= 0
                scores[torch.from_numpy(owner[known]), torch.from_numpy(cols_arr[known])] = float("-inf")
        kk = min(k, self._n)
        top = torch.topk(scores, kk, dim=1)
        ids = self._ids[top.indices.numpy()]
        ids[~torch.isfinite(top.values).numpy()] = -1
        if kk < k:
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return ids
