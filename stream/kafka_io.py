"""Kafka clients for ebrflow: topic creation, the trainer's consumer, producers and the dead-letter writer."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import (
    CommitFailedError,
    IncompatibleBrokerVersion,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
)

log = logging.getLogger(__name__)
Offsets = dict[tuple[str, int], int]


class OldBroker(RuntimeError):
    """The broker cannot apply its own default replication factor (CreateTopics v4+, Kafka 2.4+)."""

    exit_code = 78  # EX_CONFIG: set kafka.replication_factor


def settings_for(client: type, client_kwargs: dict[str, Any] | None, **owned: Any) -> dict[str, Any]:
    """The keys of ``client_kwargs`` that ``client`` (a kafka-python client class) knows, with ``owned`` on top.

    >>> settings_for(KafkaAdminClient, {"client_id": "a", "linger_ms": 9}, bootstrap_servers="b")
    {'client_id': 'a', 'bootstrap_servers': 'b'}
    """
    known = client.DEFAULT_CONFIG
    return {**{k: v for k, v in (client_kwargs or {}).items() if k in known}, **owned}


def make_admin(bootstrap_servers: str, client_kwargs: dict[str, Any] | None = None, **owned: Any) -> KafkaAdminClient:
    """An admin client with the settings it knows from ``client_kwargs``."""
    return KafkaAdminClient(
        **settings_for(KafkaAdminClient, client_kwargs, bootstrap_servers=bootstrap_servers, **owned)
    )


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    client_kwargs: dict[str, Any] | None = None,
    replication_factor: int | None = None,
) -> dict[str, int]:
    """Create each topic with its partition count unless it exists; returns the created topics' replication factors.

    ``replication_factor`` None asks for the broker's ``default.replication.factor`` (KIP-464: -1 in CreateTopics
    v4+, Kafka 2.4+); the factor the broker applied is logged as it reports it (CreateTopics v5+).
    """
    admin = make_admin(bootstrap_servers, client_kwargs)
    created: dict[str, int] = {}
    try:
        existing = set(admin.list_topics())
        for name, partitions in topics.items():
            if name in existing:
                continue
            spec = {"num_partitions": partitions, "replication_factor": replication_factor or -1}
            try:
                reply = admin.create_topics({name: spec})
            except TopicAlreadyExistsError:
                continue
            except IncompatibleBrokerVersion:
                raise OldBroker(
                    f"Kafka at {bootstrap_servers} is older than 2.4 and cannot apply its default replication factor "
                    "to new topics: set kafka.replication_factor"
                ) from None
            factor = next((t.get("replication_factor", -1) for t in reply["topics"] if t["name"] == name), -1)
            created[name] = factor if factor > 0 else spec["replication_factor"]
            log.info("created topic %s: %d partitions, replication factor %d", name, partitions, created[name])
    finally:
        admin.close()
    return created


def make_consumer(
    bootstrap_servers: str,
    group_id: str,
    session_timeout_ms: int = 10_000,
    max_partition_fetch_bytes: int = 1 << 20,
    client_kwargs: dict[str, Any] | None = None,
) -> KafkaConsumer:
    """A group consumer with manual commits that starts from the earliest uncommitted offset."""
    return KafkaConsumer(
        **settings_for(
            KafkaConsumer,
            client_kwargs,
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(session_timeout_ms // 6, 100),
            max_partition_fetch_bytes=max_partition_fetch_bytes,
        )
    )


def commit_ahead(consumer: KafkaConsumer, offsets: Offsets, committed: Offsets, observer: Any) -> None:
    """Commit the ``offsets`` of held partitions that are ahead of ``committed`` (updated; never backwards). A failed
    commit is reported to ``observer.on_error`` and left: the checkpoint holds the position, the next one retries."""
    held = {(tp.topic, tp.partition) for tp in consumer.assignment()}
    ahead = {k: o for k, o in offsets.items() if k in held and o > committed.get(k, -1)}
    if not ahead:
        return
    try:
        consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in ahead.items()}, 5000)
    except (CommitFailedError, KafkaError) as exc:
        observer.on_error("commit", exc)
        log.warning("offset commit failed (%s); the checkpoint still holds the position", exc)
        return
    committed.update(ahead)


def end_offsets(consumer: KafkaConsumer, topic: str) -> Offsets:
    """The broker's end offset of every partition of ``topic``."""
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    ends = consumer.end_offsets(parts) if parts else {}
    return {(tp.topic, tp.partition): int(end) for tp, end in ends.items()}


def partition_lag(consumer: KafkaConsumer) -> dict[int, int]:
    """Records behind the end per held partition (from the broker's end offsets: too low on Tansu, see FACTS)."""
    assigned = list(consumer.assignment())
    if not assigned:
        return {}
    ends = consumer.end_offsets(assigned, timeout_ms=2000)  # never stall polling for long
    return {tp.partition: max(ends[tp] - (consumer.position(tp) or 0), 0) for tp in assigned}


def make_producer(
    bootstrap_servers: str, client_kwargs: dict[str, Any] | None = None, **overrides: Any
) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and batches for a few ms (``client_kwargs`` may change
    ``linger_ms`` and ``retries``, not ``acks``)."""
    settings = {"linger_ms": 5, "retries": 5, **settings_for(KafkaProducer, client_kwargs), "acks": "all"}
    return KafkaProducer(bootstrap_servers=bootstrap_servers, **{**settings, **overrides})


LETTER_MARGIN = 4096  # bytes left for the record batch framing the producer and broker add


def _size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v) + 8 for k, v in headers)


def fit_letter(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], limit: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Truncate ``key``/``value`` so the letter fits ``limit`` bytes, naming the originals in headers.

    >>> k, v, h = fit_letter(b"k", b"x" * 100, [], 80)
    >>> len(v) < 100, dict(h)["ebrflow.original.size"]
    (True, b'100')
    """
    if _size(key, value, headers) <= limit:
        return key, value, headers
    original = value or b""
    if not any(name == "ebrflow.truncated" for name, _ in headers):  # a second cut keeps the first original
        headers = [
            *headers,
            ("ebrflow.truncated", b"1"),
            ("ebrflow.original.size", str(len(original)).encode()),
            ("ebrflow.original.sha256", hashlib.sha256(original).hexdigest().encode()),
        ]
    if key is not None and len(key) > 256:
        headers.append(("ebrflow.original.key.sha256", hashlib.sha256(key).hexdigest().encode()))
        key = key[:256]
    room = max(limit - _size(key, None, headers), 0)
    return key, original[:room], headers


class DeadLetterWriter:
    """Sends rejected records to ``topic`` (the dead-letter topic, ``kafka.dlq_topic``) with the original key/bytes
    and headers naming why and where from.

    Headers: ``ebrflow.reason`` (one of stream.schema.REASONS), ``ebrflow.detail``, ``ebrflow.source.topic``,
    ``ebrflow.source.partition`` and ``ebrflow.source.offset``; a letter that would exceed the producer's
    ``max_request_size`` is truncated and also carries ``ebrflow.truncated``, ``ebrflow.original.size`` and
    ``ebrflow.original.sha256``. ``flush`` must succeed before the
    source offsets are committed, so a dead letter is never lost.
    """

    def __init__(self, producer_factory: Callable[[], KafkaProducer], topic: str) -> None:
        self.producer_factory = producer_factory
        self.producer = producer_factory()
        self.topic = topic
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
        """Queue one dead letter; a record too large to re-send with its headers is truncated to fit."""
        headers = [
            ("ebrflow.reason", reason.encode()),
            ("ebrflow.detail", detail[:1000].encode("utf-8", "replace")),
            ("ebrflow.source.topic", source_topic.encode()),
            ("ebrflow.source.partition", str(partition).encode()),
            ("ebrflow.source.offset", str(offset).encode()),
        ]
        limit = int(self.producer.config.get("max_request_size", 1 << 20)) - LETTER_MARGIN
        key, value, headers = fit_letter(key, value, headers, limit)
        try:
            future = self.producer.send(self.topic, key=key, value=value, headers=headers)
        except MessageSizeTooLargeError:  # our estimate was short: keep only a 1 KiB prefix
            key, value, headers = fit_letter(key, value, headers, 1024 + _size(None, None, headers) + 512)
            future = self.producer.send(self.topic, key=key, value=value, headers=headers)
        self._pending.append((key, value, headers))
        self._futures.append(future)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued dead letter is acknowledged.

        On failure the producer is recreated (a kafka-python idempotent producer stays broken after a
        broker restart), every pending letter is re-sent (one the broker refused as too large, cut to
        64 KiB), and the error is raised for the caller to retry.
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
            for i, future in enumerate(self._futures):
                if future.is_done and "TooLarge" in type(future.exception).__name__:
                    self._pending[i] = fit_letter(*self._pending[i], limit=64 * 1024)
            self._futures = [self.producer.send(self.topic, key=k, value=v, headers=h) for k, v, h in self._pending]
            raise
        self._pending, self._futures = [], []

    def close(self) -> None:
        """Close the producer."""
        self.producer.close(timeout=5)
