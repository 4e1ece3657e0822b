"""Micro-batching: events accumulate until the batch is full or its oldest event has waited long enough."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ebrflow.model.base import Batch
from ebrflow.stream.schema import Event


@dataclass
class Taken:
    """What the loop takes: a closed micro-batch (possibly without events: only dead letters), or nothing.

    ``offsets``: next offset per partition once the batch is trained (ranks: every partition the job advanced).
    ``ranges``: first and last offset this process consumed per partition (the audit log). ``own``: events
    this process consumed (ranks: its share of the all-gathered batch). ``last``: no batch follows.
    """

    batch: Batch
    record_ts: np.ndarray
    offsets: dict[tuple[str, int], int]
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    invalid: int = 0
    own: int = -1
    io_seconds: dict[str, float] = field(default_factory=dict)
    last: bool = False

    def __post_init__(self) -> None:
        if self.own < 0:
            self.own = len(self.batch)

    @classmethod
    def nothing(cls, last: bool = False) -> Taken:
        """No batch (yet)."""
        return cls(Batch.of([], []), np.empty(0, np.int64), {}, last=last)

    @property
    def empty(self) -> bool:
        """No event and no offset: nothing to train or acknowledge."""
        return not len(self.batch) and not self.offsets


class MicroBatcher:
    """Collects decoded events plus the offsets they came from; closes by size or by time, whichever first.

    Offsets of every record taken from Kafka (valid or dead-lettered) are tracked per partition so
    the batch's commit covers them all.

    >>> b = MicroBatcher(max_events=2, max_wait_s=60)
    >>> b.add_offset(("t", 0), 5); b.add(Event(user_id=1, item_id=2, ts=3), 0.0)
    >>> b.due(now=0.0), b.room()
    (False, 1)
    """

    def __init__(self, max_events: int = 1024, max_wait_s: float = 1.0) -> None:
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self._events: list[Event] = []
        self._record_ts: list[int] = []
        self._offsets: dict[tuple[str, int], int] = {}
        self._first: dict[tuple[str, int], int] = {}
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._events)

    def room(self) -> int:
        """How many more events fit."""
        return self.max_events - len(self._events)

    def add(self, event: Event, now: float | None = None, record_ts_ms: int = 0) -> None:
        """Append a valid event (and the Kafka timestamp of its record, for freshness)."""
        if self._opened_at is None:
            self._opened_at = time.monotonic() if now is None else now
        self._events.append(event)
        self._record_ts.append(record_ts_ms)

    def add_offset(self, topic_partition: tuple[str, int], offset: int) -> None:
        """Record that ``offset`` of a partition was consumed into this batch (valid or not)."""
        if self._opened_at is None:
            self._opened_at = time.monotonic()
        if offset >= self._offsets.get(topic_partition, -1):
            self._offsets[topic_partition] = offset
        self._first.setdefault(topic_partition, offset)

    def due(self, now: float | None = None) -> bool:
        """True when full, or when the first record has waited ``max_wait_s``."""
        if self._opened_at is None:
            return False
        if len(self._events) >= self.max_events:
            return True
        return (time.monotonic() if now is None else now) - self._opened_at >= self.max_wait_s

    def age(self, now: float | None = None) -> float:
        """Seconds since the open batch took its first record (0 when none is open)."""
        if self._opened_at is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self._opened_at

    def pending(self) -> bool:
        """True if any record (valid or not) awaits processing."""
        return self._opened_at is not None

    def ranges(self) -> dict[tuple[str, int], tuple[int, int]]:
        """First and last offset consumed into the open batch, per partition (for the audit log)."""
        return {tp: (self._first[tp], last) for tp, last in self._offsets.items()}

    def close(self) -> Taken:
        """Close the batch: its events, Kafka record timestamps (ms), next offset per partition and ranges."""
        ranges = self.ranges()
        events = self._events
        batch = Batch(
            user_ids=np.fromiter((e.user_id for e in events), np.int64, len(events)),
            item_ids=np.fromiter((e.item_id for e in events), np.int64, len(events)),
            weights=np.fromiter((e.weight for e in events), np.float32, len(events)),
            ts_ms=np.fromiter((e.ts for e in events), np.int64, len(events)),
        )
        record_ts = np.asarray(self._record_ts, dtype=np.int64)
        commit = {tp: off + 1 for tp, off in self._offsets.items()}
        self._events, self._record_ts, self._offsets, self._first, self._opened_at = [], [], {}, {}, None
        return Taken(batch, record_ts, commit, ranges)
