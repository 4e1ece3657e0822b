"""Outages under a running trainer: the broker stopped for tens of seconds and restarted, Milvus failing for a
while, a consumer-group rebalance while the broker comes back. The trainer survives, pauses instead of
growing memory, and loses no event whose broker data exists."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer

from ebrflow.app import build_trainer
from ebrflow.config import Settings, load_settings
from ebrflow.stream.broker import EmbeddedBroker, port_answers
from ebrflow.stream.kafka_io import ensure_topics, make_producer
from ebrflow.stream.schema import Event, EventCodec
from tests.crash_harness import coverage
from tests.faults import FlakyMilvus, s3_server, trained_count, wait_for


def _send(bootstrap: str, topic: str, first_user: int, n: int) -> None:
    producer = make_producer(bootstrap)
    codec = EventCodec()
    for k in range(n):
        u = first_user + k % 300
        producer.send(topic, key=str(u).encode(), value=codec.encode(Event(user_id=u, item_id=k % 97, ts=k)))
    producer.flush()
    producer.close()


def _refill(bootstrap: str, positions: dict[tuple[str, int], int]) -> None:
    producer = make_producer(bootstrap)
    for (topic, partition), n in positions.items():
        for _ in range(n):
            producer.send(topic, value=b"filler", partition=partition)
    producer.flush()
    producer.close()


def _send_counted(bootstrap: str, topic: str, first_user: int, n: int, ends: dict[int, int]) -> None:
    """As ``_send``, raising ``ends[partition]`` to one past the highest offset the broker acknowledged."""
    producer = make_producer(bootstrap)
    codec = EventCodec()
    futures = []
    for k in range(n):
        u = first_user + k % 300
        value = codec.encode(Event(user_id=u, item_id=k % 97, ts=k))
        futures.append(producer.send(topic, key=str(u).encode(), value=value))
    producer.flush()
    for future in futures:
        meta = future.get(timeout=30)
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    producer.close()


def _member_as_broker_returns(
    settings: Settings, port: int, trainer_holds: Callable[[], bool], seen: dict[str, object], hold_s: float = 4.0
) -> None:
    """A second member of the trainer's group, started while the broker is down: it joins the moment the broker
    answers again (racing the trainer's own rejoin), reads (committing nothing) until it shares the topic with
    the trainer and ``hold_s`` more, and leaves; ``seen`` gets its assignment and how many records it read.

    It leaves only once the group has formed with both members: Tansu (0.6.0, and upstream since) keeps a leader
    that sends LeaveGroup while the group is re-forming as its leader, so the other members never get an
    assignment again (tests/test_outage.py::test_tansu_leader_leaving_a_forming_group_stalls_it).
    """
    wait_for(lambda: port_answers(port), 120, every_s=0.05)
    consumer = KafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=1000,
    )
    total = settings.kafka.partitions
    read, deadline, shared_at = 0, time.monotonic() + 90, None
    while time.monotonic() < deadline:
        read += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        held = sorted(tp.partition for tp in consumer.assignment())
        if held:
            seen.setdefault("assigned", held)
        if shared_at is None and 0 < len(held) < total and trainer_holds():
            shared_at, seen["shared"] = time.monotonic(), held
        if shared_at is not None and time.monotonic() - shared_at >= hold_s and 0 < len(held) < total:
            break
    seen["read"] = read
    consumer.close()


def _settings(bootstrap: str, tmp_path: Path) -> Settings:
    return load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": "outage.events",
            "group_id": "outage",
            "partitions": 2,
            "session_timeout_ms": 6000,
        },
        batch={"max_events": 256, "max_wait_ms": 200},
        milvus={"uri": str(tmp_path / "milvus.db")},
        metrics={"port": 0, "eval_sample": 16},
        run={"data_dir": str(tmp_path / "data")},
        model={"dim": 8, "device": "cpu"},
    )


def test_trainer_survives_broker_restart_and_milvus_outage(tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()
    port = broker.port
    try:
        settings = _settings(broker.bootstrap_servers, tmp_path)
        trainer = build_trainer(settings, broker.bootstrap_servers)
        flaky = trainer.store.client = FlakyMilvus(trainer.store.client)
        trained = trainer.metrics.events_trained._value.get
        runner = threading.Thread(target=trainer.run, daemon=True)
        runner.start()

        _send(broker.bootstrap_servers, settings.kafka.topic, 0, 3000)
        assert wait_for(lambda: trained() == 3000, 90), trained()

        # Milvus fails: training pauses (nothing more is read), then everything is published after recovery.
        flaky.failing.set()
        _send(broker.bootstrap_servers, settings.kafka.topic, 1000, 2000)
        assert wait_for(lambda: flaky.failures >= 2, 120), flaky.failures
        assert runner.is_alive()
        stalled = trained()
        assert stalled <= 3000 + settings.batch.max_events  # at most the batch that hit the outage
        flaky.failing.clear()
        assert wait_for(lambda: trained() == 5000, 90), trained()
        assert trainer.metrics.publish_errors._value.get() >= 2

        # The broker goes away (memory-only Tansu: its data is gone when it comes back) until the trainer has
        # failed against it a few times.
        errors = trainer.metrics.broker_errors
        before = sum(c._value.get() for c in errors._metrics.values())
        broker.stop()
        assert wait_for(lambda: sum(c._value.get() for c in errors._metrics.values()) >= before + 3, 120)
        assert runner.is_alive()
        broker = EmbeddedBroker(port=port).start()
        assert broker.port == port
        # A real Kafka keeps its topics and logs across a restart; memory-only Tansu must be given them back:
        # the topic with its partition count, and each partition's log up to where the trainer stands (filler
        # it never reads). Tansu answers a fetch past its end with nothing instead of OFFSET_OUT_OF_RANGE.
        ensure_topics(broker.bootstrap_servers, {settings.kafka.topic: settings.kafka.partitions})
        _refill(broker.bootstrap_servers, trainer.consumer.positions())
        # (A second member joining and leaving here made this test flaky on memory-only Tansu: 4 failures in
        # ~20 runs under load, each with some partitions never read again; not understood yet. The rebalance
        # during a Milvus outage is covered by tests/test_reliability.py.)
        _send(broker.bootstrap_servers, settings.kafka.topic, 5000, 2000)
        assert wait_for(lambda: trained() >= 7000, 180), trained()
        assert runner.is_alive()
    finally:
        trainer.pipeline.stop()
        runner.join(timeout=60)
        trainer.close()
        broker.stop()
    assert trained() == 7000, f"{trained()} trained: events lost or duplicated after the broker restart"
    items = trainer.publisher.items
    assert len(items) == 97


def test_rebalance_during_broker_outage_loses_nothing(tmp_path: Path) -> None:
    """Durable Tansu (S3 storage on moto: logs and group offsets survive its restart, as on a real Kafka) stops
    under a running trainer for longer than the session timeout; a second group member joins the moment it is
    back and leaves after its assignment, while events are produced. Offsets audit: every event acknowledged by
    the broker is trained, once."""
    with s3_server() as env:
        broker = EmbeddedBroker(storage="s3://tansu/", env=env).start()
        port = broker.port
        settings = _settings(broker.bootstrap_servers, tmp_path)
        settings = settings.model_copy(update={"run": settings.run.model_copy(update={"audit_log": True})})
        trainer = build_trainer(settings, broker.bootstrap_servers)
        runner = threading.Thread(target=trainer.run, daemon=True)
        seen: dict[str, object] = {}
        member = threading.Thread(
            target=_member_as_broker_returns,
            args=(settings, port, lambda: bool(trainer.consumer.consumer.assignment()), seen),
            daemon=True,
        )
        ends: dict[int, int] = {}
        topic = settings.kafka.topic
        try:
            runner.start()
            _send_counted(broker.bootstrap_servers, topic, 0, 3000, ends)
            assert wait_for(lambda: trained_count(trainer) == 3000, 90), trained_count(trainer)

            broker.stop()
            member.start()  # waits for the broker to answer again
            errors = trainer.metrics.broker_errors
            assert wait_for(lambda: sum(c._value.get() for c in errors._metrics.values()) > 0, 30)
            time.sleep(settings.kafka.session_timeout_ms / 1000 + 2)  # the outage outlasts the trainer's session
            assert runner.is_alive()
            broker = EmbeddedBroker(port=port, storage="s3://tansu/", env=env).start()
            assert broker.port == port
            _send_counted(broker.bootstrap_servers, topic, 3000, 2000, ends)  # while the group rebalances
            member.join(timeout=90)
            assert not member.is_alive() and seen.get("shared"), f"the group never formed with both members: {seen}"
            _send_counted(broker.bootstrap_servers, topic, 5000, 1000, ends)  # after it left
            assert wait_for(lambda: trained_count(trainer) >= 6000, 180), trained_count(trainer)
            assert wait_for(lambda: trainer.pipeline.readiness()["partitions"], 30), "partitions not all held"
            assert runner.is_alive()
        finally:
            trainer.pipeline.stop()
            runner.join(timeout=60)
            trainer.close()
            broker.stop()
    counts = coverage(Path(settings.run.data_dir) / "processed.log", topic)
    padded = {p: np.pad(counts.get(p, np.zeros(0, np.int64)), (0, n))[:n] for p, n in ends.items()}
    missing = {p: int((c < 1).sum()) for p, c in padded.items()}  # offsets the broker holds, never trained
    retrained = int(sum(np.clip(c - 1, 0, None).sum() for c in counts.values()))
    print(
        f"rebalance during broker outage: {sum(ends.values())} sent over partitions {dict(sorted(ends.items()))}, "
        f"{trained_count(trainer)} trained, {retrained} re-trained, missing {missing}; second member got "
        f"partitions {seen.get('assigned')} and read {seen.get('read')}"
    )
    assert sum(ends.values()) == 6000 and not any(missing.values()), f"events lost: {missing}"
    assert trained_count(trainer) == 6000 and retrained == 0


def test_tansu_leader_leaving_a_forming_group_stalls_it(broker: EmbeddedBroker) -> None:
    """Pins a Tansu group-coordinator bug the rebalance test above steps around (it fails once Tansu fixes it).

    Member A leads the group; B's join starts a new generation (Tansu's group is "Forming"); A sends LeaveGroup
    before rejoining. Tansu's Forming state removes A from the members but keeps A as leader (its Formed state
    and its missed-heartbeat eviction do clear the leader), so B's SyncGroup answers REBALANCE_IN_PROGRESS and
    its JoinGroup never makes it leader: B never gets a partition again. Same with s3:// storage (checked by hand).
    """
    topic, group = "leader-leave.events", "leader-leave"
    ensure_topics(broker.bootstrap_servers, {topic: 2})

    def member() -> KafkaConsumer:
        return KafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=group,
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )

    a, b = member(), None
    try:
        assert wait_for(lambda: bool(a.poll(timeout_ms=100) is not None and a.assignment()), 30, every_s=0)
        b = member()
        for _ in range(5):  # B joins: a new generation forms; A does not poll, so it does not rejoin
            b.poll(timeout_ms=100)
        a.close()  # LeaveGroup from the leader while the group is forming
        got = wait_for(lambda: b.poll(timeout_ms=200) is not None and bool(b.assignment()), 15, every_s=0)
    finally:
        a.close()
        if b is not None:
            b.close()
    assert not got, "Tansu now re-forms the group after its leader left mid-rebalance: simplify the test above"
