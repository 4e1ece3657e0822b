"""Expiry (``run.expire_after_s``, off by default): ids unseen for a span of event time are forgotten everywhere.

An id's clock is the event time of its last event; "now" is the newest event time trained. Each time "now" moved
a quarter of the span, and every ``every`` batches (events of other partitions may arrive late), the ids whose
last event is older than ``now - span`` leave, in this order: the model (its id tables, graph and everything keyed
by their rows, which new ids then reuse: ``RetrievalModel.expire``), the served state (mirrors, seen lists:
``Publisher.forget``), Milvus (their rows are deleted) and the observer (its counts;
``ebrflow_expired_total``). Memory then follows the ids active within the span, not every id ever seen.

The trade-off: an id that comes back after the span starts cold (a new embedding, no history), clients get
nothing for it meanwhile, and the graph only holds edges within the span (it is also the graph's TTL). Checkpoints
hold the expired state (a restore does not bring ids back); after a restart an id's clock restarts at the first
trained batch. Ranks expire the same ids at the same batch (their batches and clocks are the job's); each deletes
the rows it owns.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ebrflow.stream.policy import Policy, Step

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline

log = logging.getLogger(__name__)


class LastSeen:
    """Event time of the last event per id (live ids only).

    >>> c = LastSeen()
    >>> c.update(np.array([3, 4, 3]), np.array([10, 20, 30]))
    >>> c.older_than(25).tolist(), c.forget(np.array([4])), len(c)
    ([4], None, 1)
    """

    def __init__(self) -> None:
        self._last: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._last)

    def update(self, ids: np.ndarray, ts_ms: np.ndarray) -> None:
        """Record events (the latest time per id wins)."""
        order = np.lexsort((ts_ms, ids))
        ids, ts_ms = ids[order], ts_ms[order]
        last = np.r_[ids[1:] != ids[:-1], True]
        self._last.update(zip(ids[last].tolist(), ts_ms[last].tolist()))

    def seed(self, ids: np.ndarray, ts_ms: int) -> None:
        """Start the clock of ``ids`` not tracked yet at ``ts_ms`` (ids restored from a checkpoint)."""
        for i in ids.tolist():
            self._last.setdefault(i, ts_ms)

    def older_than(self, cutoff_ms: int) -> np.ndarray:
        """Ids whose last event is older than ``cutoff_ms``."""
        return np.fromiter((i for i, t in self._last.items() if t < cutoff_ms), dtype=np.int64)

    def forget(self, ids: np.ndarray) -> None:
        """Stop tracking ``ids``."""
        for i in ids.tolist():
            self._last.pop(i, None)


class Expiry(Policy):
    """The loop's expiry of ids unseen for ``span_s`` seconds of event time (see the module doc)."""

    def __init__(self, span_s: float, every: int = 50) -> None:
        self.span_ms, self.every = int(span_s * 1000), every
        self._batches = 0
        self.users, self.items = LastSeen(), LastSeen()
        self.expired = {"users": 0, "items": 0}
        self._now: int | None = None
        self._checked: int | None = None  # "now" at the last check

    def before_train(self, loop: Pipeline, step: Step) -> None:
        """Advance the clocks with the batch's events."""
        batch = step.batch
        if self._now is None:  # ids restored from a checkpoint start their clock with the first batch
            self._checked = first = int(batch.ts_ms.min())
            self.users.seed(loop.model.known_users(), first)
            self.items.seed(loop.model.known_items(), first)
        self.users.update(batch.user_ids, batch.ts_ms)
        self.items.update(batch.item_ids, batch.ts_ms)
        newest = int(batch.ts_ms.max())
        self._now = newest if self._now is None else max(self._now, newest)
        self._batches += 1

    def on_tick(self, loop: Pipeline, now: float) -> None:
        """Once event time moved a quarter of the span, or ``every`` batches, forget the ids unseen for the span."""
        if self._now is None or (self._now - self._checked < self.span_ms // 4 and self._batches < self.every):
            return
        self._checked, self._batches = self._now, 0
        cutoff = self._now - self.span_ms
        users, items = self.users.older_than(cutoff), self.items.older_than(cutoff)
        if len(users) or len(items):
            self.expire(loop, users, items)

    def expire(self, loop: Pipeline, users: np.ndarray, items: np.ndarray) -> None:
        """Forget ``users`` and ``items`` in the model, the served state, Milvus and the observer."""
        loop.drain()  # no job in flight names them
        loop.model.expire(users, items)
        loop.publisher.forget(users, items)
        store = loop.publisher.store
        deleted = {
            "items": loop.retrying("publish", lambda: store.delete_ids(store.items, items)),
            "users": loop.retrying("publish", lambda: store.delete_ids(store.users, users)),
        }
        for policy in loop.policies:
            policy.on_expire(loop, users, items)
        self.users.forget(users)
        self.items.forget(items)
        for role, n in deleted.items():
            self.expired[role] += n
        loop.observer.on_expired(users, items, deleted)
        log.info(
            "expired %d users and %d items unseen for %.0f s of event time", len(users), len(items), self.span_ms / 1000
        )
