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
    """Items seen only in the first second are re-written while later events touch other items."""
    bound = 1.5
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"max_staleness_s": bound})})
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    runner = threading.Thread(target=trainer.run, kwargs={"idle_exit_s": 3}, daemon=True)
    runner.start()
    producer, codec = make_producer(settings.kafka.bootstrap_servers), EventCodec()
    try:
        assert wait_for(lambda: trainer.pipeline.readiness()["partitions"], 60)
        sent = 0
        for step in range(30):  # 3 s of traffic: items 0-49 in the first 0.3 s, then only items 1000-1049
            base = 0 if step < 3 else 1000
            for k in range(50):
                value = codec.encode(Event(user_id=step * 50 + k, item_id=base + k, ts=sent))
                producer.send(settings.kafka.topic, key=str(k).encode(), value=value)
                sent += 1
            producer.flush()
            time.sleep(0.1)
        assert wait_for(lambda: trained_count(trainer) == sent, 60), trained_count(trainer)
        oldest_age = time.time() - trainer.publisher.items.oldest_write()  # before the clean stop's full re-publish
        staleness = trainer.metrics.staleness.labels("items")._value.get()
        early = trainer.store.get(trainer.store.items, list(range(50)))
        late_version = min(row["version"] for row in early.values())
        version = trainer.model.version
    finally:
        producer.close()
        runner.join(timeout=60)
        trainer.close()
    assert not runner.is_alive()
    print(f"rolling refresh: {sent} events over 3 s, oldest item age {oldest_age:.2f} s, gauge {staleness:.2f} s")
    # items 0-49 had no event after the first 0.3 s, yet every served item is younger than the bound (plus a
    # batch), and Milvus holds them at a version written after the early phase
    assert 0 < staleness <= bound + 1.0, staleness
    assert oldest_age <= bound + 1.0, oldest_age
    assert len(early) == 50 and late_version > version // 2, (late_version, version)
