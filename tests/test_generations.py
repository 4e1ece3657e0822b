"""Model generations behind Milvus aliases: blue-green switch, no mixed or empty reads, new generations on restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ebrflow.app import build_trainer
from ebrflow.config import Settings
from ebrflow.indexer.generations import Generations
from ebrflow.indexer.milvus_store import MilvusStore, connect
from ebrflow.indexer.query import NothingServed, QueryClient
from tests.faults import send_events, trained_count, wait_for


def _fill(client, generation: int, dim: int, item_base: int) -> MilvusStore:  # noqa: ANN001
    """Generation ``generation``: 200 items with ids from ``item_base``, 20 users, all ``dim``-d."""
    store = MilvusStore(client, dim, prefix="gen")
    store.use_generation(generation)
    rng = np.random.default_rng(generation)
    store.upsert(store.items, np.arange(item_base, item_base + 200), rng.standard_normal((200, dim)), generation)
    store.upsert(store.users, np.arange(20), rng.standard_normal((20, dim)), generation, seen=[np.zeros(0)] * 20)
    client.flush(store.items)
    client.flush(store.users)
    return store


def test_queries_during_switches_never_mix_generations_or_come_back_empty(tmp_path: Path) -> None:
    client = connect(str(tmp_path / "milvus.db"))
    gens = Generations(client, "gen")
    _fill(client, 1, 8, item_base=0)
    gens.switch(1)
    reader = QueryClient(client, "gen")
    _fill(client, 2, 12, item_base=10_000)  # another dimension too: a generation is self-contained
    _fill(client, 3, 8, item_base=20_000)
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def query() -> None:
        while not done.is_set():
            try:
                recs = reader.recommend(int(np.random.default_rng().integers(20)), k=10)
                bases = {r.item_id // 10_000 for r in recs}
                assert len(recs) == 10 and len(bases) == 1, (len(recs), bases)
                seen.append(bases.pop() + 1)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    def answered(generation: int, since: int, n: int = 3) -> bool:
        """The reader got ``n`` answers of ``generation`` since ``seen[since]`` (it follows the switch)."""
        return sum(g == generation for g in seen[since:]) >= n

    thread = threading.Thread(target=query)
    thread.start()
    try:
        assert wait_for(lambda: answered(1, 0), 120, every_s=0.01) or errors, "the reader never read generation 1"
        for generation in (2, 3, 2, 3):  # switch only once the reader has seen the previous switch
            mark = len(seen)
            gens.switch(generation)
            followed = lambda g=generation, m=mark: answered(g, m) or bool(errors)  # noqa: E731
            assert wait_for(followed, 120, every_s=0.01), generation
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]
    assert {1, 2, 3} <= set(seen), "the reader followed every switch"
    assert gens.served() == 3
    assert gens.drop_older(3) == [1, 2]
    assert gens.existing() == [3] and reader.recommend(0, k=5)
    with pytest.raises(NothingServed):  # another prefix: nothing served, and nothing created by asking
        QueryClient(client, "other").recommend(0)
    assert not [name for name in client.list_collections() if name.startswith("other")]


def test_a_restart_without_checkpoints_fills_a_new_generation_behind_the_served_one(
    settings: Settings, tmp_path: Path
) -> None:
    """Dim change with a fresh checkpoint dir: clients read generation 1 until generation 2 caught up, then 2."""
    settings = settings.model_copy(update={"milvus": settings.milvus.model_copy(update={"generation_grace_s": 0.0})})
    first = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        send_events(settings, 0, 3000)
        first.run(max_events=3000, idle_exit_s=30)
    finally:
        first.close()

    changed = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"dim": 24}),
            "run": settings.run.model_copy(update={"data_dir": str(tmp_path / "data2")}),
        }
    )
    second = build_trainer(changed, settings.kafka.bootstrap_servers)
    gens = Generations(second.store.client, settings.milvus.collection_prefix)
    reader = QueryClient(second.store.client, settings.milvus.collection_prefix)
    served_during: list[tuple[int | None, int]] = []
    runner = threading.Thread(target=second.run, kwargs={"idle_exit_s": 5}, daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            served, recs = gens.served(), reader.recommend(0, k=10)
            served_during.append((served, len(recs)))
            time.sleep(0.05)
        runner.join()
        assert trained_count(second) == 3000
        dims = {len(second.store.get(reader.collections()[0], [r.item_id])[r.item_id]["embedding"]) for r in recs}
        remaining = gens.existing()
    finally:
        second.close()
    assert served_during[0][0] == 1 and served_during[-1][0] == 2, served_during[:: max(len(served_during) // 10, 1)]
    assert all(n == 10 for _, n in served_during), "a client never saw an empty result"
    assert dims == {24} and remaining == [2], (dims, remaining)


def test_new_generation_flag_keeps_the_restored_model_and_switches_once_republished(settings: Settings) -> None:
    first = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        send_events(settings, 0, 2000)
        first.run(max_events=2000, idle_exit_s=30)
        version = first.model.version
    finally:
        first.close()
    second = build_trainer(settings, settings.kafka.bootstrap_servers, new_generation=True)
    try:
        second.run(max_events=0)
        gens = Generations(second.store.client, settings.milvus.collection_prefix)
        assert second.model.version == version  # the checkpoint was restored, not a fresh model
        assert second.store.generation == 2 and gens.served() == 2
        items = second.model.known_items()
        assert second.store.count(gens.alias("items")) == len(items)
    finally:
        second.close()
