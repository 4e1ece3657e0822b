"""Kafka in production: replication factor, pre-created topics, the DLQ name, client settings pass-through, and
``--idle-exit`` not counting the group join as idle time — against the real Tansu broker."""

from __future__ import annotations

import pytest
from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.schema import Event, EventCodec

from ebrflow.app import build_trainer
from ebrflow.config import Settings


def produce_events(settings: Settings, n: int, bad: list[bytes] = ()) -> None:
    """``n`` valid events, then ``bad`` raw records, all flushed to the events topic."""
    producer, codec = make_producer(settings.kafka.bootstrap_servers), EventCodec()
    for i in range(n):
        ev = Event(user_id=i % 41, item_id=(i * 7) % 29, ts=1_700_000_000_000 + i)
        producer.send(settings.kafka.topic, key=str(ev.user_id).encode(), value=codec.encode(ev))
    for payload in bad:
        producer.send(settings.kafka.topic, key=b"bad", value=payload)
    producer.flush()
    producer.close()


@pytest.mark.parametrize("grace", [60.0, 0.0])
def test_idle_exit_does_not_count_the_group_join(settings: Settings, grace: float) -> None:
    """Events already wait; the group join (~5 s on Tansu at a 10 s session timeout) is longer than the idle bound,
    yet every waiting event is trained before the run exits."""
    s = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"session_timeout_ms": 10_000}),
            "run": settings.run.model_copy(update={"exclusive_grace_s": grace}),
        }
    )
    produce_events(s, 300)
    trainer = build_trainer(s, s.kafka.bootstrap_servers)
    try:
        summary = trainer.run(idle_exit_s=1.0)
    finally:
        trainer.close()
    assert summary.trained == 300
