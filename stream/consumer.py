"""The consumer thread: the one owner of the ``KafkaConsumer`` (poll, decode, dead letters, pause, seek, commit).

While the loop trains batch n, this thread polls and decodes batch n+1 (``backlog`` closed batches wait at most).
Every consumer call runs here: the loop *asks* (``pause``, ``resume``, ``commit``, ``end_offsets``, ``lag``) and
the request runs between two polls. What does not change (each is tested on the real broker): offsets count once
the loop acknowledged their batch, and only acknowledged offsets are committed; positions, pauses and rebalances
are ``PartitionGate``'s (records polled while paused are sought back, never dropped); a batch with dead letters
is handed over once they are durable (``DeadLetterWriter.flush``, retried while paused); with the backlog full the
thread stops fetching, and after a second pauses and keeps polling (the membership outlives a Milvus outage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from ebrflow.stream.batcher import MicroBatcher, Taken
from ebrflow.stream.kafka_io import DeadLetterWriter, commit_ahead, end_offsets, partition_lag
from ebrflow.stream.pausing import Offsets, PartitionGate
from ebrflow.stream.policy import Observer
from ebrflow.stream.schema import EventCodec, InvalidEvent

log = logging.getLogger(__name__)
T = TypeVar("T")
BLOCKED_PAUSE_S = 1.0  # a full backlog this long pauses the partitions (and polls for the membership)


class _Abandoned(Exception):
    """Stopped while the dead-letter topic kept failing: the open batch is dropped (none of it is committed)."""


class ConsumerThread:
    """Polls ``topic`` into micro-batches on its own thread (see the module doc); the loop ``take``s them."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        topic: str,
        codec: EventCodec,
        dlq: DeadLetterWriter,
        batcher: MicroBatcher,
        observer: Observer,
        max_backoff_s: float = 30.0,
        backlog: int = 1,
        on_demand: bool = False,
    ) -> None:
        self.consumer, self.topic, self.codec, self.dlq = consumer, topic, codec, dlq
        self.batcher, self.observer, self.max_backoff_s, self.backlog = batcher, observer, max_backoff_s, backlog
        self.on_demand = on_demand  # batches close when the loop asks for one (``take``), not on a timer
        self._wanted = False  # the loop is waiting in ``take``
        self.gate = PartitionGate(consumer)
        self.consumed = self.invalid = 0
        self._cond = threading.Condition()
        self._ready: deque[Taken] = deque()
        self._requests: deque[tuple[Callable, Future]] = deque()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = self._closed = self.exhausted = self.idle = self._away = False
        self._limit: int | None = None
        self._idle_exit_s: float | None = None
        self._last_activity = time.monotonic()
        self._blocked_since: float | None = None
        self._batch_invalid = 0
        self._io = {"poll": 0.0, "decode": 0.0}
        self._held: tuple[int, int] = (0, 0)
        self._reported: tuple[tuple[int, int], bool] | None = None
        self._committed: Offsets = {}  # what this process committed last, per partition

    # --- the loop's side ---------------------------------------------------------------------------------------

    def start(
        self, start_offsets: Offsets, from_beginning: bool, max_events: int | None, idle_exit_s: float | None
    ) -> None:
        """Subscribe and start polling: partitions not read yet start at ``start_offsets`` (else their beginning
        when ``from_beginning``, else the group's committed offset); at most ``max_events`` records; ``idle``
        once no record came for ``idle_exit_s`` while the consumer was in its group and not held back."""
        self.gate.start_offsets, self.gate.from_beginning = dict(start_offsets), from_beginning
        self._limit, self._idle_exit_s = max_events, idle_exit_s
        self.exhausted = max_events is not None and max_events <= 0
        if self.exhausted:
            self.gate.pause("exhausted")
        self._last_activity = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ebrflow-consumer", daemon=True)
        self._thread.start()

    def take(self, timeout_s: float, flush: bool = False) -> Taken:
        """The next closed batch, waiting up to ``timeout_s``; with ``on_demand`` the open batch (everything that
        arrived since the last one, up to ``max_events``) is closed for the waiting loop as soon as it holds a
        record; with ``flush`` it is closed at the deadline (the ranks' cadence); else ``Taken.nothing`` (``last``
        when no batch will follow)."""
        with self._cond:
            self._wanted = self.on_demand and not flush
            try:
                self._cond.wait_for(lambda: self._ready or self._error or self._finished(), timeout_s)
            finally:
                self._wanted = False
            if self._error is not None:
                raise self._error
            if self._ready:
                taken = self._ready.popleft()
                self._cond.notify_all()
                return taken
        if flush and self.call(self._close_open, timeout_s=30.0):
            return self.take(0.0)
        with self._cond:
            return Taken.nothing(last=self._finished())

    def call(self, fn: Callable[[], T], wait: bool = True, timeout_s: float = 30.0) -> T | None:
        """Run ``fn`` on the consumer thread (inline when it does not run); with ``wait``, return its result."""
        future: Future = Future()
        with self._cond:
            queued = self._thread is not None and self._thread.is_alive()
            if queued:
                self._requests.append((fn, future))
        if not queued:
            _run(fn, future)
        return future.result(timeout_s) if wait else None

    def pause(self, reason: str) -> None:
        """Stop fetching until ``resume(reason)`` (reasons stack; see ``PartitionGate``)."""
        self.call(lambda: self.gate.pause(reason), wait=False)

    def resume(self, reason: str) -> None:
        """Drop a pause reason."""
        self.call(lambda: self.gate.resume(reason), wait=False)

    def commit(self, offsets: Offsets, wait: bool = False) -> None:
        """Commit ``offsets`` of held partitions that are ahead of the last commit (never backwards)."""
        offsets = dict(offsets)
        self.call(lambda: commit_ahead(self.consumer, offsets, self._committed, self.observer), wait, 60.0)

    def held(self) -> tuple[int, int]:
        """(partitions of the topic this consumer holds, partitions of the topic), as last polled."""
        return self._held

    def holding(self) -> bool:
        """Whether this consumer holds every partition of the topic."""
        assigned, total = self._held
        return total > 0 and assigned == total

    @property
    def joined(self) -> bool:
        """In the group: between an assignment and the next revocation."""
        return self.gate.joined

    def positions(self) -> Offsets:
        """The next offset each partition continues at (a copy)."""
        return self.call(lambda: dict(self.gate.next_offsets))

    def raise_positions(self, offsets: Offsets) -> None:
        """Continue each partition at least at ``offsets`` once (re)assigned here (ranks: where the job trained)."""

        def apply() -> None:
            for key, offset in offsets.items():
                if self.gate.next_offsets.get(key, -1) < offset:
                    self.gate.next_offsets[key] = offset

        self.call(apply, wait=False)

    def end_offsets(self) -> Offsets:
        """The broker's end offset of every partition of the topic."""
        return self.call(lambda: end_offsets(self.consumer, self.topic))

    def lag(self, report: Callable[[dict[int, int]], None]) -> None:
        """Measure records behind the end per held partition and hand them to ``report`` (asynchronously)."""

        def measure() -> None:
            try:
                report(partition_lag(self.consumer))
            except KafkaError as exc:
                self.observer.on_error("lag", exc)

        self.call(measure, wait=False)

    def leave(self) -> None:
        """Leave the group (its partitions move to the other members) until ``join``."""

        def away() -> None:
            self.gate.joined, self._away = False, True
            self.consumer.unsubscribe()

        self.call(away, wait=False)

    def join(self) -> None:
        """Join the group again after ``leave``."""

        def back() -> None:
            self.consumer.subscribe([self.topic], listener=self.gate)
            self._away = False

        self.call(back, wait=False)

    def stop(self) -> None:
        """Read no more records: the open batch is closed and handed over, then ``take`` reports ``last``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread once it ran the requests queued so far (the consumer itself stays open)."""
        self.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _finished(self) -> bool:
        return not self._ready and (self.exhausted or self.idle)

    # --- the thread's side -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.consumer.subscribe([self.topic], listener=self.gate)
            while not self._closed:
                self._serve_requests()
                if self.exhausted or self._away:
                    self._keepalive(0.1)
                    continue
                self._poll()
                self._close_if_due()
                self._report_held()
        except _Abandoned:
            self.exhausted = True
        except BaseException as exc:  # noqa: BLE001 - surfaced by the loop's next take()
            log.exception("consumer thread failed")
            self._error = exc
        finally:
            with self._cond:
                self._cond.notify_all()
            while not self._closed and self._error is None:  # keep answering requests (the final commit)
                self._serve_requests()
                time.sleep(0.02)
            self._serve_requests()

    def _serve_requests(self) -> None:
        while True:
            with self._cond:
                if not self._requests:
                    return
                fn, future = self._requests.popleft()
            _run(fn, future)

    def _room(self) -> int:
        """Records the next poll may take (0: the backlog is full, the limit is reached, or stopping)."""
        with self._cond:
            blocked = len(self._ready) >= self.backlog
        limit = 0 if blocked or self._stopping else self.batcher.room()
        if self._limit is not None:
            limit = min(limit, self._limit - self.consumed)
        return max(limit, 0)

    def _poll(self) -> None:
        room = self._room()
        if room == 0 and not self._hold_back_for_room():
            return
        wait_ms = 100
        if self.batcher.pending():
            due_in = 0.0 if self._wanted else 0.1 if self.on_demand else self.batcher.max_wait_s - self.batcher.age()
            wait_ms = int(min(max(due_in, 0.0), 0.1) * 1000)
        t0 = time.perf_counter()
        try:
            polled = self.consumer.poll(timeout_ms=wait_ms, max_records=max(room, 1))
        except KafkaError as exc:
            self.observer.on_error("poll", exc)
            time.sleep(0.5)
            return
        t1 = time.perf_counter()
        holding = self.gate.joined and "exclusive" not in self.gate.reasons
        if self.gate.paused or room == 0:
            self.gate.hold_back(polled)  # leaked through a rebalance, or no room: read again later
            polled = {}
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._take(rec, tp)
                n += 1
        if n:
            self._io["poll"] += t1 - t0
            self._io["decode"] += time.perf_counter() - t1
            self.consumed += n
            self.observer.on_consumed(n)
        if n or not holding:  # joining the group, waiting for the topic: not idleness
            self._last_activity = time.monotonic()
        idle_s = self._idle_exit_s
        self.idle = (
            idle_s is not None and time.monotonic() - self._last_activity > idle_s and not self.batcher.pending()
        )

    def _hold_back_for_room(self) -> bool:
        """No room: wait for the loop; after ``BLOCKED_PAUSE_S`` pause and poll (True) to stay in the group."""
        now = time.monotonic()
        if self._blocked_since is None:
            self._blocked_since = now
        if now - self._blocked_since < BLOCKED_PAUSE_S or self._stopping:
            with self._cond:
                self._cond.wait(0.02)
            return False
        if "backlog" not in self.gate.reasons:
            self.gate.pause("backlog")
        return True

    def _take(self, rec: ConsumerRecord, tp: TopicPartition) -> None:
        self.gate.taken(tp.topic, tp.partition, rec.offset)
        self.batcher.add_offset((tp.topic, tp.partition), rec.offset)
        try:
            event = self.codec.decode(rec.value)
        except InvalidEvent as exc:
            self.dlq.send(rec.key, rec.value, exc.reason, exc.detail, tp.topic, tp.partition, rec.offset)
            self._batch_invalid += 1
            self.invalid += 1
            self.observer.on_invalid(exc.reason, exc.detail)
            return
        self.batcher.add(event, record_ts_ms=rec.timestamp or 0)

    def _close_if_due(self) -> None:
        limit_reached = self._limit is not None and self.consumed >= self._limit
        # on demand, the batch grows while the loop is busy and closes when it asks (or when full): its size follows
        # the loop's pace; else it closes at max_events or max_wait
        due = self.batcher.room() == 0 if self.on_demand else self.batcher.due()
        if due or ((self._wanted or self._stopping or limit_reached) and self.batcher.pending()):
            self._close()
        if self._room() > 0:
            self._blocked_since = None
            if "backlog" in self.gate.reasons:
                self.gate.resume("backlog")
        if (self._stopping or limit_reached) and not self.batcher.pending():
            self.exhausted = True
            self.gate.pause("exhausted")  # nothing more is read: keep the membership without fetching
            with self._cond:
                self._cond.notify_all()

    def _close_open(self) -> bool:
        """Close the open batch now (the ranks' cadence); True if there was one."""
        if not self.batcher.pending():
            return False
        try:
            self._close()
        except _Abandoned:
            self.exhausted = True
            return False
        return True

    def _close(self) -> None:
        """Hand the open batch to the loop, once its dead letters are durable."""
        taken = self.batcher.close()
        taken.invalid, self._batch_invalid = self._batch_invalid, 0
        if taken.invalid:
            self._flush_letters()
        taken.io_seconds, self._io = self._io, {"poll": 0.0, "decode": 0.0}
        with self._cond:
            self._ready.append(taken)
            self._cond.notify_all()

    def _flush_letters(self) -> None:
        """Flush the dead letters, retrying with backoff while every partition is paused."""
        backoff = 0.5
        while True:
            try:
                self.dlq.flush(timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - a broker failure is retried, never fatal
                self.observer.on_error("dlq", exc)
                if "dlq" not in self.gate.reasons:
                    log.warning("dlq failed (%s); pausing consumption and retrying with backoff", exc)
                    self.gate.pause("dlq")
                if self._stopping or self._closed:
                    raise _Abandoned from exc
                self._keepalive(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if "dlq" in self.gate.reasons:
                log.info("dlq recovered")
                self.gate.resume("dlq")
            return

    def _keepalive(self, seconds: float) -> None:
        """Wait ``seconds`` while answering requests and polling (records leaking through are sought back)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._closed:
            self._serve_requests()
            if self._away:
                time.sleep(0.05)
                continue
            try:
                self.gate.hold_back(self.consumer.poll(timeout_ms=100, max_records=1))
            except KafkaError:
                time.sleep(0.1)
            self._report_held()

    def _report_held(self) -> None:
        """Publish (assigned, total) partitions; tell the observer when they or the pause changed."""
        assigned = sum(1 for tp in self.consumer.assignment() if tp.topic == self.topic)
        total = len(self.consumer.partitions_for_topic(self.topic) or ())
        self._held = (assigned, total)
        state = (self._held, self.gate.paused)
        if state != self._reported:  # gauges only on change: this runs every poll
            self._reported = state
            self.observer.on_partitions(assigned, total, self.gate.paused)


def _run(fn: Callable[[], object], future: Future) -> None:
    """Run a request, handing its result or error to whoever waits on ``future``."""
    try:
        future.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - handed to the caller
        future.set_exception(exc)
