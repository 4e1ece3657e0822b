"""Rolling refresh: which known ids to re-publish next so that no served embedding is older than a bound.

A batch publishes only what it touched; training on replayed events, spectral refits and new edges move other
embeddings too (bounded inference leaves them stale by design). Monolith's answer is delta sync plus a periodic
full sync; this sweeps the full sync in slices, one per batch, sized by the time since the last slice so that a
whole sweep over the known ids takes half of ``max_staleness_s`` (a row's age then stays under the bound even
when a sweep starts just after it was written).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from ebrflow.stream.policy import Policy, Step

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline


class RollingRefresh:
    """Per role ("item"/"user"), a cursor over the known ids in their stable (first-seen) order.

    >>> r = RollingRefresh(max_staleness_s=4.0, now=0.0)
    >>> ids = {"item": np.arange(10)}
    >>> r.next_slice(ids, now=1.0)["item"].tolist()  # 1 s of a 2 s sweep: half of the ids
    [0, 1, 2, 3, 4]
    >>> r.next_slice(ids, now=2.0)["item"].tolist()
    [5, 6, 7, 8, 9]
    >>> r.next_slice(ids, now=2.4)["item"].tolist()  # wraps around
    [0, 1]
    """

    def __init__(self, max_staleness_s: float, now: float) -> None:
        if max_staleness_s <= 0:
            raise ValueError("max_staleness_s must be positive")
        self.sweep_s = max_staleness_s / 2.0
        self._cursor: dict[str, int] = {}
        self._last = now

    def next_slice(self, known: dict[str, np.ndarray], now: float) -> dict[str, np.ndarray]:
        """The ids of each role due for re-publishing at ``now`` (at most every known id once)."""
        share = min(max(now - self._last, 0.0) / self.sweep_s, 1.0)
        self._last = now
        out = {}
        for role, ids in known.items():
            n, start = len(ids), self._cursor.get(role, 0)
            take = min(math.ceil(n * share), n)
            if not take:
                out[role] = ids[:0]
                continue
            start %= n
            idx = (start + np.arange(take)) % n
            self._cursor[role] = (start + take) % n
            out[role] = ids[idx]
        return out


class Refresh(Policy):
    """The loop's rolling refresh: each batch also publishes the next slice of the model's known ids."""

    def __init__(self, max_staleness_s: float) -> None:
        self.rolling = RollingRefresh(max_staleness_s, time.monotonic())

    def before_publish(self, loop: Pipeline, step: Step) -> None:
        """Add the ids due for re-publishing to the batch's."""
        known = {"item": loop.model.known_items(), "user": loop.model.known_users()}
        due = self.rolling.next_slice(known, time.monotonic())
        step.items, step.users = np.union1d(step.items, due["item"]), np.union1d(step.users, due["user"])
