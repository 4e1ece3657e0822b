"""Property test of the pause/offset rules: random interleavings of poll, pause, rebalance (assign/revoke), publish
failure, leaked records and resume never skip or repeat an offset.

The consumer below models the kafka-python behaviour the gate must survive: a rebalance hands every partition
back unpaused and positioned at the committed offset unless the listener seeks; a poll may return records of a
paused partition when a rebalance unpaused it inside that poll.
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import given, settings
from kafka import TopicPartition

from ebrflow.stream.pausing import PartitionGate

TOPIC = "t"


@dataclass
class Record:
    offset: int


class FakeConsumer:
    """Positions, pauses and rebalances like kafka-python, over in-memory partition logs."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.assigned: set[TopicPartition] = set()
        self.position: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.listener: PartitionGate | None = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.position[tp] = 0

    def rebalance(self, partitions: set[int]) -> None:
        assert self.listener is not None
        self.listener.on_partitions_revoked(self.assigned)
        self.assigned = {TopicPartition(TOPIC, p) for p in partitions}
        self.paused = set()  # fresh partition state: unpaused
        self.position = {tp: self.committed.get(tp, 0) for tp in self.assigned}
        self.listener.on_partitions_assigned(set(self.assigned))

    def poll(self, max_records: int, leak: bool = False) -> dict[TopicPartition, list[Record]]:
        out: dict[TopicPartition, list[Record]] = {}
        for tp in sorted(self.assigned, key=lambda t: t.partition):
            if tp in self.paused and not leak:
                continue
            start = self.position[tp]
            stop = min(start + max_records, self.lengths[tp.partition])
            if stop > start:
                out[tp] = [Record(o) for o in range(start, stop)]
                self.position[tp] = stop
        return out


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("poll"), st.integers(1, 7)),
        st.tuples(st.just("leak"), st.integers(1, 7)),
        st.tuples(st.just("fail"), st.sampled_from(["publish", "dlq"])),
        st.tuples(st.just("recover"), st.sampled_from(["publish", "dlq"])),
        st.tuples(st.just("rebalance"), st.sets(st.integers(0, 3))),
        st.tuples(st.just("checkpoint"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 25), min_size=4, max_size=4), actions=ACTIONS)
def test_no_offset_is_skipped_or_repeated(lengths: list[int], actions: list[tuple]) -> None:
    consumer = FakeConsumer(lengths)
    gate = PartitionGate(consumer, from_beginning=True)  # type: ignore[arg-type]
    consumer.listener = gate
    consumer.rebalance({0, 1, 2, 3})
    taken: dict[int, list[int]] = {p: [] for p in range(4)}

    def step(polled: dict[TopicPartition, list[Record]]) -> None:
        if gate.paused:  # as Pipeline._poll_once does
            gate.hold_back(polled)
            return
        for tp, records in polled.items():
            for rec in records:
                gate.taken(tp.topic, tp.partition, rec.offset)
                taken[tp.partition].append(rec.offset)

    for action, arg in actions:
        if action == "poll":
            step(consumer.poll(arg))
        elif action == "leak":
            step(consumer.poll(arg, leak=True))
        elif action == "fail":
            gate.pause(arg)
        elif action == "recover":
            gate.resume(arg)
        elif action == "rebalance":
            consumer.rebalance(arg)
        else:  # a checkpoint commits what was taken
            for (_, p), off in gate.next_offsets.items():
                tp = TopicPartition(TOPIC, p)
                assert off >= consumer.committed.get(tp, 0), "committed offsets never move backwards"
                consumer.committed[tp] = off
    # Drain: every partition assigned, every failure recovered.
    if len(consumer.assigned) < 4:
        consumer.rebalance({0, 1, 2, 3})
    for reason in list(gate.reasons):
        gate.resume(reason)
    while polled := consumer.poll(100):
        step(polled)
    for p in range(4):
        assert taken[p] == list(range(lengths[p])), f"partition {p}: {taken[p]}"
