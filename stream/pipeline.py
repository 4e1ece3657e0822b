"""The trainer's main loop: poll → decode (bad records to the DLQ) → micro-batch → train → publish → commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO, TypeVar

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError

from indexer.publisher import Published, Publisher
from model.base import Batch, RetrievalModel, TrainReport
from stream.batcher import MicroBatcher
from stream.checkpointer import Checkpointer, Offsets
from stream.kafka_io import DeadLetterWriter
from stream.schema import EventCodec, InvalidEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class BatchResult:
    """One processed micro-batch, handed to observers after it was published and committed."""

    batch: Batch
    record_ts_ms: np.ndarray
    report: TrainReport
    published: Published
    published_at: float
    stage_seconds: dict[str, float]
    invalid: int


class Observer(Protocol):
    """Hooks the pipeline calls; ``ops`` implements them (metrics, evaluation, drift, history)."""

    def on_consumed(self, n: int) -> None:
        """``n`` records were read from Kafka."""

    def on_invalid(self, reason: str, detail: str) -> None:
        """A record was rejected and dead-lettered."""

    def before_train(self, batch: Batch) -> None:
        """Test-then-train: called with the batch before the model sees it."""

    def after_batch(self, result: BatchResult) -> None:
        """The batch is trained, published and committed."""

    def on_lag(self, lag: dict[int, int]) -> None:
        """Records behind the end per partition."""

    def on_error(self, op: str, exc: BaseException) -> None:
        """A retried failure of ``op`` (poll, commit, publish, dlq)."""


@dataclass
class RunSummary:
    """Totals of a run, for the CLI's closing line."""

    consumed: int = 0
    trained: int = 0
    invalid: int = 0
    batches: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        """Records consumed per wall-clock second."""
        return self.consumed / self.seconds if self.seconds else 0.0


class DivergedModel(RuntimeError):
    """The model produced non-finite embeddings; they are never published."""


class _SeekOnAssign(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the restored checkpoint's offsets (each partition once)."""

    def __init__(self, consumer: KafkaConsumer, offsets: Offsets) -> None:
        self.consumer = consumer
        self.offsets = dict(offsets)

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Nothing to do: uncommitted work is re-read by the next owner (at most one batch)."""

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Seek each partition the checkpoint knows to its saved offset."""
        for tp in assigned:
            offset = self.offsets.pop((tp.topic, tp.partition), None)
            if offset is not None:
                self.consumer.seek(tp, offset)
                log.info("partition %s:%d resumes at checkpoint offset %d", tp.topic, tp.partition, offset)


class Pipeline:
    """Runs the consumer loop until stopped; offsets are committed only after a batch is published.

    Publish failures are retried with exponential backoff while the assigned partitions are paused
    (backpressure: nothing more is read until Milvus accepts the batch).
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        topic: str,
        codec: EventCodec,
        dlq: DeadLetterWriter,
        model: RetrievalModel,
        publisher: Publisher,
        batcher: MicroBatcher,
        observer: Observer,
        checkpointer: Checkpointer | None = None,
        audit_log: TextIO | None = None,
        refresh_every_s: float | None = 300.0,
        lag_interval_s: float = 5.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.codec = codec
        self.dlq = dlq
        self.model = model
        self.publisher = publisher
        self.batcher = batcher
        self.observer = observer
        self.checkpointer = checkpointer
        self.audit_log = audit_log
        self.offsets: Offsets = {}
        self.refresh_every_s = refresh_every_s
        self._last_refresh = time.monotonic()
        self.lag_interval_s = lag_interval_s
        self.max_backoff_s = max_backoff_s
        self.stop_event = threading.Event()
        self.summary = RunSummary()
        self._invalid_in_batch = 0
        self._last_lag = 0.0

    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit."""
        self.stop_event.set()

    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> RunSummary:
        """Consume until ``stop()``, ``max_events`` records, or ``idle_exit_s`` without records."""
        restored = self.checkpointer.restore() if self.checkpointer else None
        if restored is not None:
            self.offsets.update(restored)
            self.republish_all()
        self.consumer.subscribe([self.topic], listener=_SeekOnAssign(self.consumer, restored or {}))
        start = last_record = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if max_events is not None and self.summary.consumed >= max_events:
                    break
                n = self._poll_once(max_events)
                now = time.monotonic()
                if n:
                    last_record = now
                if self.batcher.due():
                    self._process()
                    if self.refresh_every_s is not None and now - self._last_refresh >= self.refresh_every_s:
                        self.republish_all()
                self._report_lag(now)
                if idle_exit_s is not None and now - last_record > idle_exit_s and not self.batcher.pending():
                    break
            if self.batcher.pending():
                self._process()
            if self.summary.batches:
                self.republish_all()
            if self.checkpointer and self.summary.batches:
                self.checkpointer.batch_done(self.offsets, force=True)
        finally:
            self.summary.seconds = time.monotonic() - start
        return self.summary

    def _poll_once(self, max_events: int | None) -> int:
        limit = self.batcher.room()
        if max_events is not None:
            limit = min(limit, max_events - self.summary.consumed)
        try:
            polled = self.consumer.poll(timeout_ms=100, max_records=max(limit, 1))
        except KafkaError as exc:
            self.observer.on_error("poll", exc)
            time.sleep(0.5)
            return 0
        n = 0
        for tp, records in polled.items():
            for rec in records:
                self._take(rec, tp)
                n += 1
        if n:
            self.summary.consumed += n
            self.observer.on_consumed(n)
        return n

    def _take(self, rec: ConsumerRecord, tp: TopicPartition) -> None:
        self.batcher.add_offset((tp.topic, tp.partition), rec.offset)
        try:
            event = self.codec.decode(rec.value)
        except InvalidEvent as exc:
            self.dlq.send(rec.key, rec.value, exc.reason, exc.detail, tp.topic, tp.partition, rec.offset)
            self._invalid_in_batch += 1
            self.summary.invalid += 1
            self.observer.on_invalid(exc.reason, exc.detail)
            return
        self.batcher.add(event, record_ts_ms=rec.timestamp or 0)

    def _process(self) -> None:
        ranges = self.batcher.ranges()
        batch, record_ts, offsets = self.batcher.take()
        invalid, self._invalid_in_batch = self._invalid_in_batch, 0
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        if len(batch):
            self.observer.before_train(batch)
            t1 = time.perf_counter()
            report = self.model.fit_batch(batch)
            t2 = time.perf_counter()
            published = self._publish_with_retry(batch)
            t3 = time.perf_counter()
            stages.update(evaluate=t1 - t0, train=t2 - t1, publish=t3 - t2)
        t4 = time.perf_counter()
        self._retrying("dlq", self.dlq.flush)
        self.offsets.update(offsets)
        if self.audit_log is not None:
            self.audit_log.writelines(f"{t} {p} {lo} {hi}\n" for (t, p), (lo, hi) in ranges.items())
            self.audit_log.flush()
        if self.checkpointer is not None:
            self.checkpointer.batch_done(self.offsets)
        self._commit(offsets)
        stages["commit"] = time.perf_counter() - t4
        self.summary.batches += 1
        self.summary.trained += len(batch)
        if len(batch):
            self.observer.after_batch(BatchResult(batch, record_ts, report, published, time.time(), stages, invalid))

    def republish_all(self, chunk: int = 5000) -> None:
        """Upsert every known item and user at the model's current version, in chunks.

        Run after a restore, every ``refresh_every_s`` and at a clean stop: a batch publishes only the ids it
        touched, while shared parameters (user histories, graph layers, the popularity prior) move others too.
        """
        empty = np.empty(0, np.int64)
        items, users = self.model.known_items(), self.model.known_users()
        for start in range(0, max(len(items), len(users)), chunk):
            i, u = items[start : start + chunk], users[start : start + chunk]
            self._checked_publish(i, u, (empty, empty))
        self._last_refresh = time.monotonic()

    def _checked_publish(
        self, items: np.ndarray, users: np.ndarray, interactions: tuple[np.ndarray, np.ndarray]
    ) -> Published:
        """Publish the model's vectors for ``items``/``users`` (retrying), refusing non-finite ones."""
        item_vecs, user_vecs = self.model.item_embeddings(items), self.model.user_embeddings(users)
        if not (np.isfinite(item_vecs).all() and np.isfinite(user_vecs).all()):
            raise DivergedModel(f"non-finite embeddings at model version {self.model.version}; not publishing")
        version = self.model.version
        return self._retrying(
            "publish", lambda: self.publisher.publish(version, items, item_vecs, users, user_vecs, interactions)
        )

    def _publish_with_retry(self, batch: Batch) -> Published:
        return self._checked_publish(
            np.unique(batch.item_ids), np.unique(batch.user_ids), (batch.user_ids, batch.item_ids)
        )

    def _retrying(self, op: str, fn: Callable[[], T]) -> T:
        backoff = 0.5
        paused = False
        while True:
            try:
                result = fn()
                if paused:
                    self.consumer.resume(*self.consumer.assignment())
                    log.info("%s recovered; resuming consumption", op)
                return result
            except Exception as exc:  # noqa: BLE001 - any sink/broker failure is retried, never fatal
                self.observer.on_error(op, exc)
                if not paused:
                    log.warning("%s failed (%s); pausing consumption and retrying with backoff", op, exc)
                    self.consumer.pause(*self.consumer.assignment())
                    paused = True
                if self.stop_event.is_set() and op == "dlq":
                    raise
                self._wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def _wait(self, seconds: float) -> None:
        """Sleep while keeping the group membership alive (poll on paused partitions returns nothing)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.consumer.poll(timeout_ms=min(200, int(seconds * 1000)), max_records=1)
            except KafkaError:
                time.sleep(0.2)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        meta = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            self.consumer.commit(meta)
        except (CommitFailedError, KafkaError) as exc:
            # The work is published; after a rebalance the next owner re-reads at most this batch.
            self.observer.on_error("commit", exc)
            log.warning("offset commit failed (%s); the batch may be re-trained after a rebalance", exc)

    def _report_lag(self, now: float) -> None:
        if now - self._last_lag < self.lag_interval_s:
            return
        self._last_lag = now
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned, timeout_ms=2000)  # never stall the loop for long
            lag = {tp.partition: max(ends[tp] - (self.consumer.position(tp) or 0), 0) for tp in assigned}
        except KafkaError as exc:
            self.observer.on_error("lag", exc)
            return
        self.observer.on_lag(lag)
