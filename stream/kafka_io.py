"""Kafka clients for ebrflow: topic creation, the trainer's consumer, producers and the dead-letter writer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"


def ensure_topics(bootstrap_servers: str, topics: dict[str, int], client_kwargs: dict[str, Any] | None = None) -> None:
    """Create each topic with its partition count unless it exists (replication factor 1)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **(client_kwargs or {}))
    try:
        existing = set(admin.list_topics())
        for name, partitions in topics.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, 1)])
                log.info("created topic %s with %d partitions", name, partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def make_consumer(
    bootstrap_servers: str,
    group_id: str,
    session_timeout_ms: int = 10_000,
    max_partition_fetch_bytes: int = 1 << 20,
    client_kwargs: dict[str, Any] | None = None,
) -> KafkaConsumer:
    """A group consumer with manual commits that starts from the earliest uncommitted offset."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(session_timeout_ms // 6, 100),
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        **(client_kwargs or {}),
    )


def make_producer(
    bootstrap_servers: str, client_kwargs: dict[str, Any] | None = None, **overrides: Any
) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and batches for a few ms."""
    settings: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5}
    settings.update(overrides)
    return KafkaProducer(bootstrap_servers=bootstrap_servers, **settings, **(client_kwargs or {}))


class DeadLetterWriter:
    """Sends rejected records to ``<topic>.dlq`` with the original key/bytes and headers naming why and where from.

    Headers: ``ebrflow.reason`` (one of stream.schema.REASONS), ``ebrflow.detail``, ``ebrflow.source.topic``,
    ``ebrflow.source.partition`` and ``ebrflow.source.offset``. ``flush`` must succeed before the
    source offsets are committed, so a dead letter is never lost.
    """

    def __init__(self, producer_factory: Callable[[], KafkaProducer], topic: str) -> None:
        self.producer_factory = producer_factory
        self.producer = producer_factory()
        self.topic = topic + DLQ_SUFFIX
        self._pending: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self._futures: list = []

    def send(
        self,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        detail: str,
        source_topic: str,
        partition: int,
        offset: int,
    ) -> None:
        """Queue one dead letter."""
        headers = [
            ("ebrflow.reason", reason.encode()),
            ("ebrflow.detail", detail[:1000].encode("utf-8", "replace")),
            ("ebrflow.source.topic", source_topic.encode()),
            ("ebrflow.source.partition", str(partition).encode()),
            ("ebrflow.source.offset", str(offset).encode()),
        ]
        self._pending.append((key, value, headers))
        self._futures.append(self.producer.send(self.topic, key=key, value=value, headers=headers))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued dead letter is acknowledged.

        On failure the producer is recreated (a kafka-python idempotent producer stays broken after a
        broker restart), every pending letter is re-sent, and the error is raised for the caller to retry.
        """
        if not self._pending:
            return
        try:
            self.producer.flush(timeout=timeout_s)
            for future in self._futures:
                future.get(timeout=0)
        except Exception:
            with contextlib.suppress(Exception):
                self.producer.close(timeout=0)
            self.producer = self.producer_factory()
            self._futures = [self.producer.send(self.topic, key=k, value=v, headers=h) for k, v, h in self._pending]
            raise
        self._pending, self._futures = [], []

    def close(self) -> None:
        """Close the producer."""
        self.producer.close(timeout=5)
