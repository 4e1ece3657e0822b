"""The training-free block of the served vectors: spectral embeddings of the live graph, refitted as it grows.

Items (keys) are rows of ``V S^power`` of the degree-normalised interaction matrix (``model.spectral``), times
``d_i^key_degree``; a user (query) is the normalised, recency-weighted sum of its buffered items' vectors, so a
user is served from its first event and the score is a rank-k item-kNN (``a = 0, b = ½``). Refits come on a
schedule that grows with the graph and are rotated onto the previous fit (orthogonal Procrustes), so vectors
published from consecutive fits stay comparable.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from ebrflow.model.graph import GraphStore
from ebrflow.model.spectral import procrustes, spectral_embeddings

log = logging.getLogger(__name__)
Schedule = Literal["stream", "double", "off"]


class SpectralBlock:
    """Spectral vectors of ``graph`` (``dim`` columns) and the served query/key parts built from them.

    Refit when ``max(every, growth × edges at the last fit)`` events arrived since it (``schedule="stream"``), only
    when the graph at most doubled (``"double"``: O(log edges) fits while a backfill builds the graph) or never
    (``"off"``). ``iters`` > 0 warm-starts a refit from the last one (``model.spectral.warm_svd``).
    """

    def __init__(
        self,
        graph: GraphStore,
        dim: int,
        *,
        a: float = 0.0,
        b: float = 0.5,
        power: float = 1.0,
        every: int = 256,
        growth: float = 0.03,
        iters: int = 0,
        key_degree: float = 0.0,
        recency_half_life: float = 20.0,
        seed: int = 0,
    ) -> None:
        self.graph, self.dim = graph, dim
        self.a, self.b, self.power, self.key_degree = a, b, power, key_degree
        self.every, self.growth, self.iters, self.seed = every, growth, iters, seed
        self.recency_half_life = recency_half_life
        self.schedule: Schedule = "stream"
        self.base = [np.zeros((0, dim), np.float32) for _ in range(graph.n_types)]
        self.fitted_edges = 0
        self.since: int | None = None  # events since the last fit (None: never fitted)

    def observe(self, n_events: int) -> bool:
        """Count ``n_events`` new events and refit when the schedule says so; True if it refitted.

        A failed fit never stops the stream: the previous vectors stay until the next one.
        """
        if not self.dim or (self.schedule == "off" and self.since is not None):
            return False
        self.since = None if self.since is None else self.since + n_events
        growth = 1.0 if self.schedule == "double" else self.growth
        if self.since is not None and self.since < max(self.every, growth * self.fitted_edges):
            return False
        try:
            self.refit()
        except Exception:  # noqa: BLE001 - keep serving the last fit
            log.exception("spectral refit failed; keeping the previous spectral vectors until the next one")
            self.since = 0
            return False
        return True

    def refit_if_changed(self) -> bool:
        """Refit now if the graph's distinct edges differ from the last fit's; True if it refitted."""
        if not self.dim or self.graph.history_matrix().nnz == self.fitted_edges:
            return False
        self.refit()
        return True

    def refit(self) -> None:
        """Fit the spectral vectors of the whole live history, rotated onto the previous fit.

        Bipartite: users get ``U S`` and items ``V S``; user–user: every node gets its column vector ``V S``.
        """
        g = self.graph
        history = g.history_matrix()
        self.fitted_edges = history.nnz
        start = self.base[g.item_type] if self.iters > 0 else None
        rows, cols = spectral_embeddings(
            history, self.dim, self.a, self.b, seed=self.seed, power=self.power, start=start, iters=self.iters
        )
        new = [rows, cols] if g.mode == "bipartite" else [cols]
        shared = [min(len(o), len(n)) for o, n in zip(self.base, new)]
        if sum(shared):
            q = procrustes(
                np.concatenate([n[:k] for n, k in zip(new, shared)]),
                np.concatenate([o[:k] for o, k in zip(self.base, shared)]),
            )
            new = [n @ q for n in new]
        self.base = [n.astype(np.float32) for n in new]
        self.since = 0

    def _rows_of(self, node_type: int, rows: np.ndarray) -> np.ndarray:
        """Base vectors of ``rows`` (zero for rows newer than the last fit)."""
        base = self.base[node_type]
        out = np.zeros((len(rows), self.dim), np.float32)
        inside = rows < len(base)
        out[inside] = base[rows[inside]]
        return out

    def keys(self, rows: np.ndarray) -> np.ndarray:
        """Served item parts: the item's vector times ``d_i^key_degree`` (``d``: users buffering it)."""
        g = self.graph
        rows = np.asarray(rows, dtype=np.int64)
        out = self._rows_of(g.item_type, rows)
        if self.key_degree:
            out *= (np.maximum(g.column_degree[rows], 1.0) ** self.key_degree).astype(np.float32)[:, None]
        return out

    def queries(self, rows: np.ndarray) -> np.ndarray:
        """Served user parts: ``Σ_i d_u^-½ · recency · d_i^-½ · key_i`` over the buffered items, L2-normalised."""
        g = self.graph
        rows = np.asarray(rows, dtype=np.int64)
        pos, nbr, w = g.user_edges(rows, self.recency_half_life)
        count = np.bincount(pos, minlength=len(rows))
        coef = np.maximum(count[pos], 1.0) ** -0.5 * w * np.maximum(g.column_degree[nbr], 1.0) ** -0.5
        out = np.zeros((len(rows), self.dim), np.float64)
        np.add.at(out, pos, self._rows_of(g.item_type, nbr) * coef[:, None])
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norm, 1e-12)).astype(np.float32)

    def forget(self, rows_by_type: tuple[np.ndarray, ...]) -> None:
        """Zero the vectors of removed rows (another id may reuse a row before the next fit)."""
        for base, rows in zip(self.base, rows_by_type):
            base[rows[rows < len(base)]] = 0.0

    def state_dict(self) -> dict:
        """Base vectors and the schedule's counters as tensors."""
        state: dict = {f"base_{t}": torch.from_numpy(b.copy()) for t, b in enumerate(self.base)}
        state["since"] = -1 if self.since is None else self.since
        state["fitted_edges"] = self.fitted_edges
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.base = [state[f"base_{t}"].numpy().astype(np.float32).copy() for t in range(len(self.base))]
        since = int(state["since"])
        self.since = None if since < 0 else since
        self.fitted_edges = int(state["fitted_edges"])
