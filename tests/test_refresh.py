"""Rolling refresh: every known id is re-published within the staleness bound (unit and on real parts)."""

from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ebrflow.app import build_trainer
from ebrflow.config import Settings
from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.refresh import RollingRefresh
from ebrflow.stream.schema import Event, EventCodec
from tests.faults import trained_count, wait_for


@hsettings(max_examples=60, deadline=None)
@given(
    st.floats(0.5, 60.0),
    st.lists(st.tuples(st.floats(0.001, 5.0), st.integers(0, 50)), min_size=1, max_size=200),
)
def test_every_known_id_is_due_within_the_bound(bound: float, steps: list[tuple[float, int]]) -> None:
    """Ids arrive over time; each one, once known, is handed out again at most ``bound`` seconds later."""
    refresh, now, known = RollingRefresh(bound, now=0.0), 0.0, np.zeros(0, np.int64)
    last_due: dict[int, float] = {}
    for dt, new in steps:
        now += dt
        known = np.r_[known, np.arange(len(known), len(known) + new)]
        for i in refresh.next_slice({"item": known}, now)["item"].tolist():
            last_due[i] = now
        for i in known.tolist():
            last_due.setdefault(i, now)  # a new id is published by the batch that brought it
            assert now - last_due[i] <= bound + dt, (i, now, last_due[i])


def test_ids_untouched_for_longer_than_the_bound_are_republished(settings: Settings) -> None:
    """Items 0-49 are touched once; then only items 1000-1049 arrive, batch after batch, until the rolling refresh
    has re-written the early items in Milvus at a newer model version (it must, within ``max_staleness_s`` of
    batches). Paced by the trainer, not the clock: under load it trains later, and nothing here depends on when."""
    bound = 1.5
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"max_staleness_s": bound})})
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    runner = threading.Thread(target=trainer.run, kwargs={"idle_exit_s": 3}, daemon=True)
    runner.start()
    producer, codec = make_producer(settings.kafka.bootstrap_servers), EventCodec()
    sent = 0

    def send(base: int) -> None:
        nonlocal sent
        for k in range(50):
            value = codec.encode(Event(user_id=sent, item_id=base + k, ts=sent))
            producer.send(settings.kafka.topic, key=str(k).encode(), value=value)
            sent += 1
        producer.flush()
        assert wait_for(lambda: trained_count(trainer) == sent, 120), (trained_count(trainer), sent)

    def early_versions() -> list[int]:
        return [row["version"] for row in trainer.store.get(trainer.store.items, list(range(50))).values()]

    try:
        assert wait_for(lambda: trainer.pipeline.readiness()["partitions"], 60)
        send(0)
        written = max(early_versions())  # the version the early items were published at
        touched_at, rounds, staleness = time.monotonic(), 0, 0.0
        while min(early_versions()) <= written and time.monotonic() - touched_at < 60 * bound:
            send(1000)  # other items only: the early ones can come back only through the refresh
            rounds += 1
            staleness = trainer.metrics.staleness.labels("items")._value.get()
        republished = min(early_versions())
        elapsed = time.monotonic() - touched_at
    finally:
        producer.close()
        runner.join(timeout=60)
        trainer.close()
    assert not runner.is_alive()
    print(f"rolling refresh: early items re-written after {rounds} batches, {elapsed:.1f} s (bound {bound} s)")
    assert republished > written, f"items 0-49 still at version {written} after {elapsed:.0f} s of other batches"
    # the gauge is the age of the least recently published embedding: the early items were its oldest, and they
    # were re-written, so it stays within the time since they were first published
    assert 0 <= staleness <= elapsed, (staleness, elapsed)
