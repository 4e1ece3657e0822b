"""The Milvus sink: upserts of trained batches on a worker thread, in order, each retried until Milvus accepts it.

Training of batch n+1 overlaps the upsert of batch n. The queue is bounded (``depth`` jobs in flight), jobs
complete strictly in submission order, and a failing job blocks the ones behind it, so Milvus never receives
an older embedding after a newer one. The trainer reads completions with ``completed()`` and only then
commits what they cover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ebrflow.indexer.milvus_store import MilvusStore

log = logging.getLogger(__name__)


@dataclass
class UpsertJob:
    """Rows of one publish: vectors of items and users at one model version, plus the users' seen lists
    (None for a user whose list Milvus already holds unchanged: written as a partial update).

    ``context`` is the caller's (what to do once acknowledged); the sink never reads it.
    """

    version: int
    item_ids: np.ndarray
    item_vectors: np.ndarray
    user_ids: np.ndarray
    user_vectors: np.ndarray
    seen: list[np.ndarray | None] | None
    context: Any = None
    upsert_seconds: dict[str, float] = field(default_factory=dict)
    acked_at: float = 0.0
    hold: bool = False  # the recall guard holds Milvus writes: acknowledge without writing
    seq: int = 0  # the publisher's job number (which seen lists an acknowledgement makes current)


def write(store: MilvusStore, job: UpsertJob) -> None:
    """Upsert ``job``'s items, then its users (with seen lists), recording the time of each and the ack time.

    A held job (``hold``) is acknowledged without writing: clients keep the embeddings Milvus already has."""
    if job.hold:
        job.acked_at = time.time()
        return
    t0 = time.perf_counter()
    store.upsert(store.items, job.item_ids, job.item_vectors, job.version)
    t1 = time.perf_counter()
    store.upsert(store.users, job.user_ids, job.user_vectors, job.version, seen=job.seen)
    job.upsert_seconds = {"items": t1 - t0, "users": time.perf_counter() - t1}
    job.acked_at = time.time()


class SinkStopped(RuntimeError):
    """The sink was stopped while a job was still failing; that job and the ones behind it were not written."""


class MilvusSink:
    """One worker thread writing ``UpsertJob`` s to Milvus in order, and flushing on the store's schedule."""

    def __init__(
        self,
        store: MilvusStore,
        stop: threading.Event,
        depth: int = 2,
        max_backoff_s: float = 30.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.store = store
        self.depth = max(depth, 1)
        self.max_backoff_s = max_backoff_s
        self._stop = stop
        self._on_error = on_error or (lambda exc: None)
        self._cond = threading.Condition()
        self._queue: deque[UpsertJob] = deque()
        self._done: deque[UpsertJob] = deque()
        self._failing = False
        self._aborted = False
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ebrflow-milvus-sink", daemon=True)
        self._thread.start()

    @property
    def failing(self) -> bool:
        """True while the job at the head of the queue keeps failing."""
        return self._failing

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet acknowledged."""
        with self._cond:
            return len(self._queue)

    def has_room(self) -> bool:
        """True when another job can be submitted without exceeding ``depth``."""
        with self._cond:
            return len(self._queue) < self.depth

    def submit(self, job: UpsertJob) -> None:
        """Queue a job (the caller checks ``has_room`` first to bound memory)."""
        with self._cond:
            if self._aborted:
                raise SinkStopped("the sink stopped with unwritten jobs")
            self._queue.append(job)
            self._cond.notify_all()

    def completed(self) -> list[UpsertJob]:
        """Acknowledged jobs since the last call, in submission order."""
        with self._cond:
            out = list(self._done)
            self._done.clear()
            if self._aborted and not out:
                raise SinkStopped("stopped while Milvus was failing: unacknowledged jobs were dropped")
            return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (pending jobs are dropped: the checkpoint does not cover them)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return
                job = self._queue[0] if self._queue else None
            if job is not None:
                if not self._write(job):
                    with self._cond:
                        self._aborted = True
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._queue.popleft()
                    self._done.append(job)
                    self._cond.notify_all()
            self._flush_if_due()  # on schedule, busy or idle: unflushed rows are searched on a slow path

    def _write(self, job: UpsertJob) -> bool:
        """Upsert one job, retrying with exponential backoff; False if stopped while failing."""
        backoff = 0.5
        while True:
            try:
                write(self.store, job)
                if self._failing:
                    log.info("Milvus accepts upserts again")
                self._failing = False
                return True
            except Exception as exc:  # noqa: BLE001 - any sink failure is retried, never fatal
                if not self._failing:
                    log.warning("Milvus upsert failed (%s); retrying with backoff, consumption pauses", exc)
                self._failing = True
                self._on_error(exc)
                with self._cond:
                    self._cond.notify_all()
                if self._stop.wait(backoff) or self._closed:
                    return False
                backoff = min(backoff * 2, self.max_backoff_s)

    def _flush_if_due(self) -> None:
        try:
            self.store.flush_if_due()
        except Exception as exc:  # noqa: BLE001 - a failed flush is retried on the next schedule
            log.warning("Milvus flush failed (%s); retried on schedule", exc)


class InlineSink:
    """``MilvusSink``'s interface without a thread: ``submit`` writes the job at once, retrying with backoff until
    Milvus accepts it (ranks: each step's writes finish inside the step, so every rank's loop sees the same
    acknowledgements at the same point; the other ranks wait in the next collective meanwhile)."""

    depth = 0

    def __init__(self, store: MilvusStore, max_backoff_s: float = 30.0, on_error: Callable | None = None) -> None:
        self.store = store
        self.max_backoff_s = max_backoff_s
        self._on_error = on_error or (lambda exc: None)
        self._done: list[UpsertJob] = []

    failing = False
    in_flight = 0

    def has_room(self) -> bool:
        """Always: a job is written before ``submit`` returns."""
        return True

    def submit(self, job: UpsertJob) -> None:
        """Write ``job`` now (retried until it succeeds), then flush on the store's schedule."""
        backoff = 0.5
        while True:
            try:
                write(self.store, job)
                break
            except Exception as exc:  # noqa: BLE001 - any sink failure is retried, never fatal
                log.warning("Milvus upsert failed (%s); retrying in %.1f s", exc, backoff)
                self._on_error(exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        self._done.append(job)
        try:
            self.store.flush_if_due()
        except Exception as exc:  # noqa: BLE001 - a failed flush is retried on the next schedule
            log.warning("Milvus flush failed (%s); retried on schedule", exc)

    def completed(self) -> list[UpsertJob]:
        """Jobs written since the last call, in submission order."""
        out, self._done = self._done, []
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        """Nothing runs in the background."""
