"""The built-in synthetic interaction stream: communities, power-law popularity, drifting tastes, arrivals."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EventArrays:
    """A chunk of generated events as parallel arrays (ids are int64, ts in ms)."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    ts_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)


class SyntheticStream:
    """Users and items in ``communities`` latent groups; users mostly pick items of their current community.

    - popularity: item weights follow a power law (Zipf exponent ``zipf``), user activity too;
    - arrivals: ``initial_fraction`` of users and items exist at the start, the rest arrive evenly;
    - drift: each event, a user's community moves to a neighbour community with probability
      ``drift_per_event`` per user-event; ``shift_at`` (event index) permutes all communities at once
      (a planted abrupt change of tastes).

    >>> chunk = next(SyntheticStream(users=50, items=40, communities=4, seed=1).chunks(100, chunk=100))
    >>> len(chunk), int(chunk.item_ids.max()) < 40
    (100, True)
    """

    def __init__(
        self,
        users: int = 3000,
        items: int = 1500,
        communities: int = 12,
        p_home: float = 0.85,
        zipf: float = 1.1,
        initial_fraction: float = 0.6,
        drift_per_event: float = 0.002,
        shift_at: int | None = None,
        start_ms: int = 1_700_000_000_000,
        interval_ms: int = 50,
        seed: int = 7,
    ) -> None:
        self.n_users, self.n_items, self.communities = users, items, communities
        self.p_home, self.initial_fraction, self.drift_per_event = p_home, initial_fraction, drift_per_event
        self.shift_at, self.start_ms, self.interval_ms = shift_at, start_ms, interval_ms
        rng = self._rng = np.random.default_rng(seed)
        self.item_community = rng.integers(0, communities, items)
        self.item_popularity = rng.permutation(1.0 / np.arange(1, items + 1) ** zipf)
        self.user_activity = rng.permutation(1.0 / np.arange(1, users + 1) ** 0.8)
        self.user_community = rng.integers(0, communities, users)
        self.item_arrival = self._arrivals(items)
        self.user_arrival = self._arrivals(users)

    def _arrivals(self, n: int) -> np.ndarray:
        """Event index at which each id becomes active (0 for the initial fraction); filled by ``chunks``."""
        return np.where(self._rng.random(n) < self.initial_fraction, 0.0, self._rng.random(n))

    def chunks(self, n_events: int, chunk: int = 1000) -> Iterator[EventArrays]:
        """Generate ``n_events`` events in time order, ``chunk`` at a time (a planted shift starts a chunk)."""
        rng = self._rng
        bounds = set(range(0, n_events, chunk))
        if self.shift_at is not None and 0 < self.shift_at < n_events:
            bounds.add(self.shift_at)
        edges = sorted(bounds) + [n_events]
        for start, stop in zip(edges[:-1], edges[1:]):
            size = stop - start
            if start == self.shift_at:
                self.user_community = (self.user_community + self.communities // 2) % self.communities
            progress = start / max(n_events, 1)
            users = self._pick(self.user_activity, self.user_arrival <= progress, size)
            movers = users[rng.random(size) < self.drift_per_event]
            self.user_community[movers] = (self.user_community[movers] + 1) % self.communities
            home = rng.random(size) < self.p_home
            comm = np.where(home, self.user_community[users], rng.integers(0, self.communities, size))
            items = self._items_for(comm, self.item_arrival <= progress)
            ts = self.start_ms + (start + np.arange(size)) * self.interval_ms
            yield EventArrays(users.astype(np.int64), items.astype(np.int64), ts.astype(np.int64))

    def _pick(self, weights: np.ndarray, active: np.ndarray, size: int) -> np.ndarray:
        w = np.where(active, weights, 0.0)
        return self._rng.choice(len(w), size=size, p=w / w.sum())

    def _items_for(self, communities: np.ndarray, active: np.ndarray) -> np.ndarray:
        out = np.empty(len(communities), dtype=np.int64)
        for c in np.unique(communities):
            mask = communities == c
            pool = np.flatnonzero((self.item_community == c) & active)
            if len(pool) == 0:
                pool = np.flatnonzero(active)
            w = self.item_popularity[pool]
            out[mask] = self._rng.choice(pool, size=int(mask.sum()), p=w / w.sum())
        return out
