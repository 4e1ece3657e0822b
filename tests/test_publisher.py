"""Seen lists are written only where Milvus may lack the current one; other user rows are partial updates that
keep the seen list Milvus holds (real Milvus Lite)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from ebrflow.indexer.milvus_store import MilvusStore
from ebrflow.indexer.publisher import Publisher
from ebrflow.indexer.sink import UpsertJob, write

DIM = 4
U = np.array([7])
NONE = (np.empty(0, np.int64), np.empty(0, np.int64))


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    store = MilvusStore(MilvusClient(str(tmp_path / "m.db")), dim=DIM, prefix="t")
    store.ensure_collections()
    return Publisher(store)


def job(pub: Publisher, version: int, interactions: tuple[np.ndarray, np.ndarray] = NONE) -> UpsertJob:
    vec = np.full((1, DIM), version, np.float32)
    return pub.prepare(version, np.empty(0, np.int64), np.empty((0, DIM), np.float32), U, vec, interactions)


def served(pub: Publisher) -> tuple[int, list[int]]:
    row = pub.store.client.get(pub.store.users, ids=[7], output_fields=["version", "seen"])[0]
    return int(row["version"]), [int(x) for x in row["seen"]]


def test_refresh_rows_keep_the_served_seen_list(publisher: Publisher) -> None:
    first = job(publisher, 1, (np.array([7, 7]), np.array([10, 11])))
    assert first.seen is not None and first.seen[0].tolist() == [10, 11]
    publisher.publish(first)
    refresh = job(publisher, 2)  # nothing new for user 7: the vector alone
    assert refresh.seen == [None]
    publisher.publish(refresh)
    assert served(publisher) == (2, [10, 11])


def test_a_user_never_acknowledged_gets_a_full_row(publisher: Publisher) -> None:
    publisher.publish(job(publisher, 1))  # a refresh of a user Milvus has no row for yet
    assert served(publisher) == (1, [])


def test_a_held_write_leaves_the_seen_list_due(publisher: Publisher) -> None:
    publisher.publish(job(publisher, 1, (np.array([7]), np.array([10]))))
    held = job(publisher, 2, (np.array([7]), np.array([12])))
    held.hold = True
    publisher.publish(held)  # acknowledged without writing: Milvus still serves [10]
    assert served(publisher) == (1, [10])
    after = job(publisher, 3)
    assert after.seen is not None and after.seen[0].tolist() == [10, 12]
    publisher.publish(after)
    assert served(publisher) == (3, [10, 12])


def test_an_acknowledgement_does_not_vouch_for_a_later_change(publisher: Publisher) -> None:
    a = job(publisher, 1, (np.array([7]), np.array([10])))
    b = job(publisher, 2, (np.array([7]), np.array([11])))  # prepared before a is acknowledged
    write(publisher.store, a)
    publisher.acknowledged(a)
    c = job(publisher, 3)  # b is still in flight: its list is not known to be served
    assert c.seen is not None and c.seen[0].tolist() == [10, 11]
    for j in (b, c):
        write(publisher.store, j)
        publisher.acknowledged(j)
    assert served(publisher) == (3, [10, 11])
    assert job(publisher, 4).seen == [None]
