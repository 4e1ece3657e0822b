"""Edge storage of the live graph: per-node ring buffers of recent neighbours, and the append-only edge log."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class RingBuffers:
    """For each row, the last ``capacity`` neighbour rows and their event times (O(1) append per edge).

    ``count[r]`` is how many edges row r received since it was last cleared; slot ``count % capacity``
    is written next, so once full the oldest neighbour is overwritten first.

    >>> rb = RingBuffers(capacity=2)
    >>> rb.append(np.array([0, 0, 0]), np.array([5, 6, 7]), np.array([1, 2, 3]))
    >>> sorted(rb.nbr[0].tolist()), int(rb.count[0])
    ([6, 7], 3)
    """

    def __init__(self, capacity: int, rows: int = 1024) -> None:
        self.capacity = capacity
        self.nbr = np.zeros((rows, capacity), dtype=np.int64)
        self.ts = np.zeros((rows, capacity), dtype=np.int64)
        self.count = np.zeros(rows, dtype=np.int64)
        self.last_ts = np.zeros(rows, dtype=np.int64)

    def grow(self, n_rows: int) -> None:
        """Ensure at least ``n_rows`` rows (capacity doubles)."""
        old = len(self.count)
        if n_rows <= old:
            return
        new = max(n_rows, 2 * old)
        for name in ("nbr", "ts", "count", "last_ts"):
            arr = getattr(self, name)
            grown = np.zeros((new, *arr.shape[1:]), dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)

    def append(self, src: np.ndarray, dst: np.ndarray, ts: np.ndarray) -> None:
        """Append edges src→dst in event order, vectorised (several edges per src are fine).

        An edge already buffered only refreshes its time, so a repeated interaction does not crowd out others.
        """
        if not len(src):
            return
        src, dst, ts = self._refresh_known(src, dst, ts)
        if not len(src):
            return
        order = np.argsort(src, kind="stable")
        s, d, t = src[order], dst[order], ts[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        sizes = np.diff(np.r_[starts, len(s)])
        rank = np.arange(len(s)) - np.repeat(starts, sizes)
        keep = rank >= np.repeat(sizes, sizes) - self.capacity  # older edges would be overwritten anyway
        slot = (self.count[s[keep]] + rank[keep]) % self.capacity
        self.nbr[s[keep], slot] = d[keep]
        self.ts[s[keep], slot] = t[keep]
        self.count[s[starts]] += sizes
        np.maximum.at(self.last_ts, s, t)

    def _refresh_known(
        self, src: np.ndarray, dst: np.ndarray, ts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Refresh edges already buffered; return the new ones, each (src, dst) pair once (its last event)."""
        present = (self.nbr[src] == dst[:, None]) & self.valid(src, None)
        hit = present.any(axis=1)
        if hit.any():
            rows, slot = src[hit], present[hit].argmax(axis=1)
            np.maximum.at(self.ts, (rows, slot), ts[hit])
            np.maximum.at(self.last_ts, rows, ts[hit])
            src, dst, ts = src[~hit], dst[~hit], ts[~hit]
        rev = np.arange(len(src))[::-1]
        _, last = np.unique(np.stack([src[rev], dst[rev]], axis=1), axis=0, return_index=True)
        keep = np.sort(rev[last])
        return src[keep], dst[keep], ts[keep]

    def valid(self, rows: np.ndarray, cutoff: int | None) -> np.ndarray:
        """(len(rows), capacity) mask of filled slots whose edge is not older than ``cutoff``."""
        filled = np.arange(self.capacity)[None, :] < np.minimum(self.count[rows], self.capacity)[:, None]
        if cutoff is not None:
            filled &= self.ts[rows] >= cutoff
        return filled

    def sample(
        self, rows: np.ndarray, fanout: int, cutoff: int | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``fanout`` distinct valid neighbours per row: (rows, mask), both (len(rows), fanout)."""
        valid = self.valid(rows, cutoff)
        nbr = self.nbr[rows]
        if fanout >= self.capacity:
            pad = fanout - self.capacity
            return np.pad(nbr, ((0, 0), (0, pad))), np.pad(valid, ((0, 0), (0, pad)))
        keys = rng.random(valid.shape, dtype=np.float32)
        keys[~valid] = 2.0
        pick = np.argpartition(keys, fanout - 1, axis=1)[:, :fanout]
        return np.take_along_axis(nbr, pick, axis=1), np.take_along_axis(valid, pick, axis=1)

    def clear(self, rows: np.ndarray) -> None:
        """Forget every neighbour of ``rows``."""
        self.count[rows] = 0


class EdgeLog:
    """Every distinct (src, dst) edge ever added, with its last event time: the whole history, not a ring buffer.

    Appends are O(1) amortised; duplicates are removed lazily (``compact``), so memory is O(distinct edges).

    >>> log = EdgeLog()
    >>> log.append(np.array([0, 0, 1]), np.array([5, 5, 6]), np.array([1, 2, 3]))
    >>> log.compact(); log.src.tolist(), log.dst.tolist(), log.ts.tolist()
    ([0, 1], [5, 6], [2, 3])
    """

    def __init__(self) -> None:
        self.src = np.zeros(0, dtype=np.int64)
        self.dst = np.zeros(0, dtype=np.int64)
        self.ts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0

    def append(self, src: np.ndarray, dst: np.ndarray, ts: np.ndarray) -> None:
        """Record edges (duplicates allowed until the next ``compact``, which runs by itself once the pending edges
        reach a tenth of the compacted ones: amortised O(log edges) per edge)."""
        self._pending.append((np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(ts, np.int64)))
        self._pending_n += len(self._pending[-1][0])
        if self._pending_n > max(0.1 * len(self.src), 100_000):
            self.compact()

    def targets_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every edge out of ``rows`` (unique rows) in the whole history: (positions in ``rows``, destinations).

        >>> log = EdgeLog(); log.append(np.array([0, 0, 2]), np.array([5, 6, 7]), np.zeros(3, np.int64))
        >>> log.compact(); log.append(np.array([2]), np.array([8]), np.zeros(1, np.int64))
        >>> [a.tolist() for a in log.targets_of(np.array([2, 0]))]
        [[0, 1, 1, 0], [7, 5, 6, 8]]
        """
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = np.searchsorted(self.src, rows, "left"), np.searchsorted(self.src, rows, "right")
        counts = hi - lo
        pos = [np.repeat(np.arange(len(rows)), counts)]
        starts = np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts)
        dst = [self.dst[np.arange(int(counts.sum())) + starts]]
        order = np.argsort(rows)
        for src_p, dst_p, _ in self._pending:  # not compacted yet: at most a tenth of the history
            at = np.searchsorted(rows[order], src_p)
            hit = (at < len(rows)) & (rows[order][np.minimum(at, len(rows) - 1)] == src_p)
            pos.append(order[at[hit]])
            dst.append(dst_p[hit])
        return np.concatenate(pos), np.concatenate(dst)

    def compact(self) -> None:
        """Merge pending edges and keep each (src, dst) once, with its latest time."""
        if not self._pending:
            return
        src = np.concatenate([self.src, *(p[0] for p in self._pending)])
        dst = np.concatenate([self.dst, *(p[1] for p in self._pending)])
        ts = np.concatenate([self.ts, *(p[2] for p in self._pending)])
        self._pending = []
        order = np.lexsort((-ts, dst, src))
        src, dst, ts = src[order], dst[order], ts[order]
        first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]
        self.src, self.dst, self.ts = src[first], dst[first], ts[first]
        self._pending_n = 0

    def expire(self, cutoff: int | None, src_rows: np.ndarray, dst_rows: np.ndarray) -> None:
        """Drop edges older than ``cutoff`` and every edge of ``src_rows``/``dst_rows`` (removed ids)."""
        self.compact()
        keep = ~(np.isin(self.src, src_rows) | np.isin(self.dst, dst_rows))
        if cutoff is not None:
            keep &= self.ts >= cutoff
        self.src, self.dst, self.ts = self.src[keep], self.dst[keep], self.ts[keep]

    def matrix(self, shape: tuple[int, int], cutoff: int | None = None, symmetric: bool = False) -> sp.csr_matrix:
        """Binary (src × dst) sparse matrix of the edges not older than ``cutoff`` (both directions if symmetric)."""
        self.compact()
        keep = self.ts >= cutoff if cutoff is not None else np.ones(len(self.ts), dtype=bool)
        r, c = self.src[keep], self.dst[keep]
        if symmetric:
            r, c = np.r_[r, c], np.r_[c, r]
        m = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=shape)
        m.data[:] = 1.0  # duplicates summed by the constructor count once
        return m

    def state_dict(self) -> dict:
        """The compacted edges as tensors."""
        self.compact()
        return {
            "src": torch.from_numpy(self.src.copy()),
            "dst": torch.from_numpy(self.dst.copy()),
            "ts": torch.from_numpy(self.ts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.src, self.dst, self.ts = (state[k].numpy().copy() for k in ("src", "dst", "ts"))
        self._pending, self._pending_n = [], 0
