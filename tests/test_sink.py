"""The Milvus sink writes jobs in submission order, a failing job blocks the ones behind it, and a stop while
failing drops them (nothing unacknowledged is reported done): these three drive the sink alone, with a
``FakeStore`` stand-in for Milvus. The overlap test runs the whole trainer on the real broker and Milvus Lite: it
never lets a commit pass an unacknowledged upsert."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from ebrflow.app import build_trainer
from ebrflow.config import Settings
from ebrflow.indexer.sink import MilvusSink, SinkStopped, UpsertJob
from tests.faults import Intercepted, send_events, trained_count, wait_for


class FakeStore:
    """A stand-in for ``MilvusStore``: records upserts (taking 2 ms each, like a small write), fails while
    ``failing`` is set."""

    items, users = "items", "users"

    def __init__(self) -> None:
        self.written: list[tuple[str, int]] = []
        self.failing = threading.Event()

    def upsert(self, collection: str, ids: np.ndarray, vectors: np.ndarray, version: int, seen=None) -> None:  # noqa: ANN001
        if self.failing.is_set():
            raise ConnectionError("injected")
        time.sleep(0.002)
        self.written.append((collection, version))

    def flush_if_due(self) -> bool:
        return False


def _job(version: int) -> UpsertJob:
    ids = np.arange(3)
    return UpsertJob(version, ids, np.ones((3, 2), np.float32), ids, np.ones((3, 2), np.float32), None)


def _completed(sink: MilvusSink, n: int) -> list[UpsertJob]:
    done: list[UpsertJob] = []
    assert wait_for(lambda: bool(done.extend(sink.completed())) or len(done) >= n, 10, every_s=0.01)
    return done


def test_jobs_complete_in_order_and_a_failure_blocks_the_rest() -> None:
    store, stop = FakeStore(), threading.Event()
    errors: list[BaseException] = []
    sink = MilvusSink(store, stop, depth=8, max_backoff_s=0.05, on_error=errors.append)  # type: ignore[arg-type]
    try:
        store.failing.set()
        for v in range(1, 6):
            sink.submit(_job(v))
        assert wait_for(lambda: len(errors) >= 2, 5)
        assert sink.failing and sink.completed() == [] and store.written == []
        store.failing.clear()
        done = _completed(sink, 5)
        assert [j.version for j in done] == [1, 2, 3, 4, 5]
        assert [v for c, v in store.written if c == "items"] == [1, 2, 3, 4, 5]
        assert all(j.acked_at > 0 and set(j.upsert_seconds) == {"items", "users"} for j in done)
    finally:
        sink.close()


def test_stop_while_failing_drops_unacknowledged_jobs() -> None:
    store, stop = FakeStore(), threading.Event()
    sink = MilvusSink(store, stop, depth=4, max_backoff_s=0.05)  # type: ignore[arg-type]
    sink.submit(_job(1))
    _completed(sink, 1)
    store.failing.set()
    sink.submit(_job(2))
    assert wait_for(lambda: sink.failing, 5)
    stop.set()
    with pytest.raises(SinkStopped):
        assert wait_for(lambda: bool(sink.completed()), 5)
    sink.close()
    assert [v for c, v in store.written if c == "items"] == [1]


class GatedMilvus(Intercepted):
    """Forwards to a real MilvusClient; upserts (row- or column-oriented) block while ``held`` is set."""

    def __init__(self, client: object) -> None:
        super().__init__(client, self._wait)
        self.held = threading.Event()
        self.released = threading.Event()

    def _wait(self) -> None:
        while self.held.is_set() and not self.released.wait(0.05):
            pass

    def _get_connection(self) -> Intercepted:
        """The client's connection behind the same gate."""
        return Intercepted(self._target._get_connection(), self._wait)  # type: ignore[attr-defined]


def test_overlap_never_commits_past_an_unacknowledged_upsert(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"run": settings.run.model_copy(update={"checkpoint_every_batches": 1, "audit_log": True})}
    )
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    gated = trainer.store.client = GatedMilvus(trainer.store.client)
    runner = threading.Thread(target=trainer.run, daemon=True)
    runner.start()
    parts = [TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)]

    def committed() -> dict[int, int]:
        admin_view = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=settings.kafka.group_id,
            enable_auto_commit=False,
        )
        try:
            return {tp.partition: admin_view.committed(tp) or 0 for tp in parts}
        finally:
            admin_view.close()

    try:
        send_events(settings, 0, 2000)
        assert wait_for(lambda: trained_count(trainer) == 2000, 90)
        gated.held.set()
        send_events(settings, 2000, 2000)
        # the trainer keeps training while the upsert is held, up to the queue depth, then pauses
        depth, sink = trainer.pipeline.publishing.depth, trainer.pipeline.publishing.sink
        assert wait_for(lambda: sink.in_flight == depth, 120), sink.in_flight
        seen_committed = committed()
        acked = {p: o for (_, p), o in trainer.pipeline.offsets.items()}
        assert sink.in_flight == depth  # and stays paused there
        for p, off in seen_committed.items():
            assert off <= acked.get(p, 0), f"partition {p}: committed {off} past acknowledged {acked.get(p)}"
        assert trained_count(trainer) == 2000  # nothing counts as trained before Milvus acknowledges it
        gated.released.set()
        assert wait_for(lambda: trained_count(trainer) == 4000, 90), trained_count(trainer)
    finally:
        gated.released.set()
        trainer.pipeline.stop()
        runner.join(timeout=60)
        trainer.close()
    final = committed()
    assert sum(final.values()) == 4000
