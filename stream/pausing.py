"""Pausing and positioning the trainer's partitions so that no record is ever skipped.

kafka-python forgets a partition's paused state on a rebalance (re-assigned partitions come back
unpaused) and positions it at the group's committed offset. ``PartitionGate`` owns the answer to
"where does each partition continue and is it paused": it re-applies pauses and positions on every
assignment, hands back records that leak through while paused by seeking to them, and on resume seeks
every partition to the first record not yet taken. The reference design is quix-streams'
``processing/pausing.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]


class PartitionGate(ConsumerRebalanceListener):
    """Pause reasons, and the next offset to process per partition; one per consumer.

    Start positions of a partition this process has not read yet: ``start_offsets[tp]`` if given, else
    its beginning when ``from_beginning`` (the restored state has seen none of it), else the group's
    committed offset (kafka-python's default).
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        start_offsets: Offsets | None = None,
        from_beginning: bool = False,
        on_assigned: Callable[[set[TopicPartition]], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.start_offsets = dict(start_offsets or {})
        self.from_beginning = from_beginning
        self.next_offsets: Offsets = {}
        self.reasons: set[str] = set()
        self.joined = False  # between an assignment and the next revocation: the group is not (re)forming
        self._on_assigned = on_assigned

    @property
    def paused(self) -> bool:
        """True while any reason to pause holds."""
        return bool(self.reasons)

    def taken(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset`` was handed to the batch: the partition continues after it."""
        self.next_offsets[(topic, partition)] = offset + 1

    def pause(self, reason: str) -> None:
        """Stop fetching every assigned partition until ``resume(reason)`` (reasons stack)."""
        if not self.reasons:
            log.info("pausing consumption (%s)", reason)
        self.reasons.add(reason)
        self.consumer.pause(*self.consumer.assignment())

    def resume(self, reason: str) -> None:
        """Drop ``reason``; when none is left, seek to the first untaken record and fetch again."""
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if self.reasons:
            return
        assigned = self.consumer.assignment()
        for tp in assigned:
            self._position(tp)
        self.consumer.resume(*assigned)
        log.info("resumed consumption (%s cleared)", reason)

    def hold_back(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> int:
        """Records polled but not taken (paused, or no room): seek each partition back to them, and pause again
        if a pause holds (a rebalance unpaused it); returns how many."""
        n = 0
        for tp, records in polled.items():
            if records:
                self.consumer.seek(tp, self.next_offsets.get((tp.topic, tp.partition), records[0].offset))
                n += len(records)
        if n and self.reasons:
            self.consumer.pause(*self.consumer.assignment())
        return n

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance starts (nothing to undo: taken records are trained here; positions are kept)."""
        self.joined = False

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Position every assigned partition and re-apply the pause (kafka-python reset both)."""
        self.joined = True
        for tp in assigned:
            self._position(tp)
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        if self._on_assigned is not None:
            self._on_assigned(assigned)

    def _position(self, tp: TopicPartition) -> None:
        key = (tp.topic, tp.partition)
        if key in self.next_offsets:
            self.consumer.seek(tp, self.next_offsets[key])
        elif key in self.start_offsets:
            self.consumer.seek(tp, self.start_offsets[key])
            log.info("partition %s:%d resumes at checkpoint offset %d", tp.topic, tp.partition, self.start_offsets[key])
        elif self.from_beginning:
            self.consumer.seek_to_beginning(tp)
            log.info("partition %s:%d is not in the restored state: reading it from its beginning", *key)
