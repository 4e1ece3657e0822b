"""The live interaction graph: per node a bounded ring buffer of its most recent neighbours, sampled in numpy."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from ebrflow.model.edges import EdgeLog, RingBuffers
from ebrflow.model.tables import IdIndex

USER, ITEM = 0, 1


class GraphStore:
    """Bipartite user–item or user–user interaction graph fed by events, with TTL eviction and fanout sampling.

    In ``bipartite`` mode users and items are separate node types (0 and 1) with their own ids; in
    ``user_user`` mode (friend recommendation) both ends of an event are users (type 0) and
    ``symmetric`` says whether an edge u→v is also stored as v→u. Rows idle for more than
    ``ttl_ms`` of event time are cleared by ``evict`` and edges older than that are never sampled.

    >>> g = GraphStore(capacity=4)
    >>> _ = g.add_events(np.array([10, 11]), np.array([7, 7]), np.array([0, 0]))
    >>> rows, masks, types = g.sample(np.array([0]), USER, [2, 2])
    >>> [r.shape for r in rows], types
    ([(1,), (1, 2), (1, 2, 2)], [0, 1, 0])
    """

    def __init__(
        self,
        mode: Literal["bipartite", "user_user"] = "bipartite",
        symmetric: bool | None = None,
        capacity: int = 32,
        ttl_ms: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("bipartite", "user_user"):
            raise ValueError(f"unknown graph mode {mode!r}")
        if mode == "user_user" and symmetric is None:
            raise ValueError("user_user mode needs symmetric=True or False stated explicitly")
        self.mode = mode
        self.symmetric = bool(symmetric)
        self.capacity = capacity
        self.ttl_ms = ttl_ms
        self.users = IdIndex()
        self.items = IdIndex() if mode == "bipartite" else self.users
        self.buffers = [RingBuffers(capacity)] + ([RingBuffers(capacity)] if mode == "bipartite" else [])
        self.degree = np.zeros(1024, dtype=np.int64)
        self.log = EdgeLog()
        self.column_degree = np.zeros(1024, dtype=np.int64)  # valid user-side buffer slots per neighbour row
        self.generation = 0
        self._now: int | None = None
        self._rng = np.random.default_rng(seed)

    @property
    def n_types(self) -> int:
        """Node types: 2 for bipartite, 1 for user–user."""
        return len(self.buffers)

    @property
    def item_type(self) -> int:
        """The node type of the item side of an event."""
        return ITEM if self.mode == "bipartite" else USER

    def n_rows(self, node_type: int) -> int:
        """Rows assigned so far for ``node_type``."""
        return len(self.users) if node_type == USER else len(self.items)

    def other(self, node_type: int) -> int:
        """Type of the neighbours of a ``node_type`` node."""
        return 1 - node_type if self.mode == "bipartite" else node_type

    def cutoff(self) -> int | None:
        """Oldest event time still alive, or None without TTL."""
        if self.ttl_ms is None or self._now is None:
            return None
        return self._now - self.ttl_ms

    def add_events(
        self, user_ids: np.ndarray, item_ids: np.ndarray, ts_ms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Map raw ids to rows (new ids get new rows), append the edges, count user degrees; returns the rows."""
        u = self.users.add(np.asarray(user_ids, dtype=np.int64))
        i = self.items.add(np.asarray(item_ids, dtype=np.int64))
        ts = np.asarray(ts_ms, dtype=np.int64)
        for t in range(self.n_types):
            self.buffers[t].grow(self.n_rows(t))
        if len(self.degree) < len(self.users):
            self.degree = np.pad(self.degree, (0, max(len(self.users), 2 * len(self.degree)) - len(self.degree)))
        np.add.at(self.degree, u, 1)
        self.log.append(u, i, ts)
        if self.mode == "user_user" and self.symmetric:
            src, dst, when = np.r_[u, i], np.r_[i, u], np.r_[ts, ts]
        else:
            src, dst, when = u, i, ts
        touched = np.unique(src)
        self._count_columns(touched, -1)
        self.buffers[USER].append(src, dst, when)
        self._count_columns(touched, +1)
        if self.mode == "bipartite":
            self.buffers[ITEM].append(i, u, ts)
        if len(ts):
            self._now = int(ts.max()) if self._now is None else max(self._now, int(ts.max()))
        self.generation += 1
        return u, i

    def _count_columns(self, rows: np.ndarray, sign: int) -> None:
        """Add ``sign`` × the valid user-side buffer slots of ``rows`` to ``column_degree`` (O(rows × capacity))."""
        have, need = len(self.column_degree), self.n_rows(self.other(USER))
        if have < need:
            self.column_degree = np.pad(self.column_degree, (0, max(need, 2 * have) - have))
        rb = self.buffers[USER]
        nbr = rb.nbr[rows][rb.valid(rows, self.cutoff())]
        cols, counts = np.unique(nbr, return_counts=True)  # O(touched edges), not O(rows of the graph)
        self.column_degree[cols] += sign * counts

    def _recount_columns(self) -> None:
        """Recount ``column_degree`` over every row (after TTL expiry, eviction or a restore)."""
        self.column_degree[:] = 0
        self._count_columns(np.arange(self.n_rows(USER)), +1)

    def evict(self) -> int:
        """Clear rows idle for longer than the TTL; returns how many rows were cleared."""
        cutoff = self.cutoff()
        if cutoff is None:
            return 0
        evicted = 0
        for t, rb in enumerate(self.buffers):
            n = self.n_rows(t)
            idle = np.flatnonzero((rb.count[:n] > 0) & (rb.last_ts[:n] < cutoff))
            rb.clear(idle)
            evicted += len(idle)
        self._recount_columns()  # edges older than the cutoff stopped counting (O(graph), only with a TTL)
        if evicted:
            self.generation += 1
        return evicted

    def expire(self, user_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forget ``user_ids`` and ``item_ids``: their rows (returned; ids added later reuse them) lose their
        neighbours and degree, and the edge history keeps only edges within the TTL that touch no removed id.

        Buffered edges of other rows that point at a removed row are older than the TTL (an id expires only once
        its last event is), so they are never sampled, also once the row is reused."""
        users = self.users.remove(np.asarray(user_ids, dtype=np.int64))
        items = self.items.remove(np.asarray(item_ids, dtype=np.int64)) if self.mode == "bipartite" else users
        if self.mode == "user_user":
            items = np.r_[users, self.users.remove(np.asarray(item_ids, dtype=np.int64))]
            users = items
        for t, rows in enumerate((users, items)[: self.n_types]):
            rb = self.buffers[t]
            rb.clear(rows)
            rb.last_ts[rows] = 0
        self.degree[users[users < len(self.degree)]] = 0
        self.log.expire(self.cutoff(), users, items)
        self._recount_columns()
        self.generation += 1
        return users, items

    def sample(
        self, rows: np.ndarray, node_type: int, fanouts: list[int], rng: np.random.Generator | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """Sampled computation tree of ``rows``: per hop the neighbour rows, validity masks and node type.

        Hop k has shape (len(rows), f1, ..., fk); a child of an invalid slot is invalid. ``rng`` defaults
        to the store's own generator.
        """
        rng = self._rng if rng is None else rng
        rows = np.asarray(rows, dtype=np.int64)
        level_rows, masks, types = [rows], [np.ones(len(rows), dtype=bool)], [node_type]
        cutoff = self.cutoff()
        for fanout in fanouts:
            parent, parent_mask, t = level_rows[-1], masks[-1], types[-1]
            nbr, ok = self.buffers[t].sample(parent.reshape(-1), fanout, cutoff, rng)
            shape = (*parent.shape, nbr.shape[1])
            level_rows.append(nbr.reshape(shape))
            masks.append(ok.reshape(shape) & parent_mask[..., None])
            types.append(self.other(t))
        return level_rows, masks, types

    def neighbours(
        self, node_type: int, rows: np.ndarray, recency_half_life: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buffered, unexpired neighbours of ``rows`` of ``node_type``: (positions in ``rows``, neighbour rows,
        weights), O(rows × capacity).

        With ``recency_half_life`` > 0 an edge's weight halves for every ``recency_half_life`` newer neighbours
        in the same row's buffer (its most recent interaction weighs 1); otherwise every weight is 1.
        """
        rb = self.buffers[node_type]
        rows = np.asarray(rows, dtype=np.int64)
        valid = rb.valid(rows, self.cutoff())
        r, c = np.nonzero(valid)
        w = np.ones(len(r))
        if recency_half_life > 0 and len(r):
            newness = (np.arange(rb.capacity)[None, :] - rb.count[rows, None]) % rb.capacity  # later write: larger
            key = np.where(valid, np.maximum(rb.ts[rows], 0) * rb.capacity + newness, -1)
            order = np.argsort(-key, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(rb.capacity), order.shape), axis=1)
            w = 0.5 ** (rank[r, c] / recency_half_life)
        return r, rb.nbr[rows[r], c], w

    def user_edges(self, rows: np.ndarray, recency_half_life: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``neighbours`` of user ``rows`` (the user side of every event)."""
        return self.neighbours(USER, rows, recency_half_life)

    def degree_of(self, node_type: int, rows: np.ndarray) -> np.ndarray:
        """Distinct neighbours of ``rows`` of ``node_type`` (those a TTL expired excluded), at least 1: the degree
        of the symmetric LightGCN normalisation, counted even where the ring buffer keeps only the latest."""
        rb = self.buffers[node_type]
        rows = np.asarray(rows, dtype=np.int64)
        if self.cutoff() is None:
            return np.maximum(rb.count[rows], 1)
        return np.maximum(rb.valid(rows, self.cutoff()).sum(axis=1), 1)

    def history_matrix(self) -> sp.csr_matrix:
        """Binary (users × neighbour rows) matrix of every distinct edge within the TTL, from the whole history
        (not only the ring buffers); user–user graphs stored symmetric get both directions."""
        shape = (self.n_rows(USER), self.n_rows(self.other(USER)))
        return self.log.matrix(shape, self.cutoff(), symmetric=self.mode == "user_user" and self.symmetric)

    def user_degree(self, user_ids: np.ndarray) -> np.ndarray:
        """Lifetime number of events per user (as the user side); a small number marks a cold user."""
        return self.degree[self.users.lookup(np.asarray(user_ids, dtype=np.int64))]

    def state_dict(self) -> dict:
        """Id maps, ring buffers, degrees and clock as tensors."""
        state: dict = {"users": self.users.state_dict(), "degree": torch.from_numpy(self.degree.copy())}
        if self.mode == "bipartite":
            state["items"] = self.items.state_dict()
        for t, rb in enumerate(self.buffers):
            for name in ("nbr", "ts", "count", "last_ts"):
                state[f"{t}.{name}"] = torch.from_numpy(getattr(rb, name).copy())
        state["now"] = torch.tensor(-1 if self._now is None else self._now, dtype=torch.int64)
        state["has_now"] = self._now is not None
        state["generation"] = self.generation
        state["log"] = self.log.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.users.load_state_dict(state["users"])
        if self.mode == "bipartite":
            self.items.load_state_dict(state["items"])
        self.degree = state["degree"].numpy().copy()
        for t, rb in enumerate(self.buffers):
            for name in ("nbr", "ts", "count", "last_ts"):
                setattr(rb, name, state[f"{t}.{name}"].numpy().copy())
        self._now = int(state["now"]) if state["has_now"] else None
        self.generation = int(state["generation"]) + 1
        if "log" in state:
            self.log.load_state_dict(state["log"])
        self._recount_columns()
