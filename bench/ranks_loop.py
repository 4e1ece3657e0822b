"""The shared loop's cost on ranks: the same per-rank micro-batches through (a) the ranked step as it was written
before the one loop (exchange → rank 0 scores → train → publish the owned ids → mirror), and (b) the one loop
(``stream.pipeline.Pipeline`` with ``stream.ranked.RankedSource``, inline writes, every policy the ranks run that
needs no broker or Milvus server, the recall guard with rank 0's score shared, and the metrics observer on:
histograms, drift, history).

Both write to an in-memory store (Milvus is not what is compared) and skip checkpoints; ``bench.ranks`` runs them
interleaved and reports (b) / (a) − 1 per round. Used by ``python -m bench.ranks``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


class MemoryStore:
    """A ``MilvusStore`` stand-in that keeps the last row of each id in memory."""

    def __init__(self, dim: int) -> None:
        self.dim, self.items, self.users, self.seen_capacity = dim, "items", "users", 1024
        self.rows: dict[str, dict[int, int]] = {"items": {}, "users": {}}

    def upsert(self, collection: str, ids: np.ndarray, vectors: np.ndarray, version: int, seen: Any = None) -> None:
        """Remember each id's version."""
        self.rows[collection].update(dict.fromkeys(ids.tolist(), version))

    def flush_if_due(self, force: bool = False) -> bool:
        """Nothing to flush."""
        return False


class ListedBatches:
    """A ``ConsumerThread`` stand-in handing out pre-built micro-batches, one per ``take`` (then ``last``)."""

    def __init__(self, batches: list, topic: str, partition: int) -> None:
        from types import SimpleNamespace

        self.topic, self._batches, self._partition = topic, batches, partition
        self.consumer = SimpleNamespace(partitions_for_topic=lambda topic: set(range(4)))
        self.consumed = self.invalid = 0
        self.joined = True
        self.first_take: float | None = None
        self.last_take: float | None = None

    def start(self, start_offsets: dict, from_beginning: bool, max_events: int | None, idle: float | None) -> None:
        """Nothing to subscribe to."""

    def take(self, timeout_s: float, flush: bool = False) -> Any:
        """The next batch; ``last`` once all were handed out."""
        from ebrflow.stream.batcher import Taken

        now = time.perf_counter()
        self.first_take = self.first_take or now
        if not self._batches:
            self.last_take = self.last_take or now
            return Taken.nothing(last=True)
        batch = self._batches.pop(0)
        self.consumed += len(batch)
        offsets = {(self.topic, self._partition): self.consumed}
        return Taken(batch, np.zeros(len(batch), np.int64), offsets, {(self.topic, self._partition): (0, 0)})

    def __getattr__(self, name: str) -> Any:  # commit, pause, resume, raise_positions, lag, stop, close
        return lambda *args, **kwargs: None


def _per_rank_batches(rank: int, world: int, n_events: int, batch: int) -> list:
    """This rank's micro-batches (a user-keyed split), padded with empty ones to the largest rank's count."""
    from bench.common import synthetic_events
    from ebrflow.model.base import Batch
    from ebrflow.model.distributed import owner

    ev = synthetic_events(n_events)
    mine = owner(ev.user_ids, world) == rank
    users, items, ts = ev.user_ids[mine], ev.item_ids[mine], ev.ts_ms[mine]
    n_steps = -(-int(np.bincount(owner(ev.user_ids, world), minlength=world).max()) // batch)
    return [
        Batch.of(
            users[s * batch : (s + 1) * batch],
            items[s * batch : (s + 1) * batch],
            ts_ms=ts[s * batch : (s + 1) * batch],
        )
        for s in range(n_steps)
    ]


def step_worker(trainer: Any, batches: list, settings: Any) -> float:
    """(a) The ranked step as written before the one loop, over ``batches``; returns its wall seconds."""
    from ebrflow.app import evaluator_for
    from ebrflow.indexer.publisher import Publisher
    from ebrflow.model.distributed import owner
    from ebrflow.stream.refresh import RollingRefresh

    model, rank, world = trainer.served, trainer.rank, trainer.world
    publisher = Publisher(MemoryStore(model.dim))  # type: ignore[arg-type]
    evaluator = evaluator_for(settings, publisher) if rank == 0 else None
    refresh = RollingRefresh(settings.run.max_staleness_s, time.monotonic())
    t0 = time.perf_counter()
    for local in batches:
        global_batch, _ = trainer.exchange(local, [0, 0, len(local), -1, -1, -1, -1])
        if evaluator is not None:
            evaluator.evaluate(global_batch)
        trainer.fit_global(global_batch)
        items, users = np.unique(global_batch.item_ids), np.unique(global_batch.user_ids)
        due = refresh.next_slice({"item": model.known_items(), "user": model.known_users()}, time.monotonic())
        items, users = np.union1d(items, due["item"]), np.union1d(users, due["user"])
        if evaluator is None:  # only rank 0 mirrored every id; the others embedded the ids they own
            items, users = items[owner(items, world) == rank], users[owner(users, world) == rank]
        item_vecs, user_vecs = model.item_embeddings(items), model.user_embeddings(users)
        publisher.publish(
            publisher.prepare(
                model.version, items, item_vecs, users, user_vecs, (global_batch.user_ids, global_batch.item_ids)
            )
        )
    return time.perf_counter() - t0


def loop_worker(trainer: Any, batches: list, settings: Any, workdir: Path) -> tuple[float, dict[str, float]]:
    """(b) The one loop over ``batches``; returns its wall seconds (first to last take) and its stage seconds."""
    from ebrflow.app import build_observer
    from ebrflow.indexer.publisher import Publisher
    from ebrflow.ops.metrics import STAGES, PipelineMetrics
    from ebrflow.stream.guard import GuardPolicy, RecallGuard
    from ebrflow.stream.lag import LagReport
    from ebrflow.stream.pipeline import Pipeline
    from ebrflow.stream.publishing import Publishing
    from ebrflow.stream.ranked import OwnedStore, OwnIds, RankedSource, RankGroup, SharedScore
    from ebrflow.stream.refresh import Refresh

    store = OwnedStore(MemoryStore(trainer.served.dim), trainer.rank, trainer.world)  # type: ignore[arg-type]
    publisher = Publisher(store)  # type: ignore[arg-type]
    metrics = PipelineMetrics()
    rank, world = trainer.rank, trainer.world
    observer = build_observer(settings, metrics, publisher, workdir, scores=rank == 0)  # as ebrflow.ranks wires it
    local = ListedBatches(batches, "bench.ranks", trainer.rank)
    source = RankedSource(local, trainer, settings.batch.max_wait_ms / 1000.0)  # type: ignore[arg-type]
    policies = [SharedScore(RankGroup(rank, world)), LagReport(), Refresh(settings.run.max_staleness_s)]
    policies += [GuardPolicy(RecallGuard())] + ([OwnIds(rank, world)] if rank else [])
    pipeline = Pipeline(
        source, trainer.served, Publishing(publisher, depth=0), observer, None, policies, None, trainer.fit_global
    )
    pipeline.run()
    observer.history.close()
    get = metrics.registry.get_sample_value
    stages = {s: float(get("ebrflow_stage_duration_seconds_sum", {"stage": s}) or 0.0) for s in STAGES}
    return local.last_take - local.first_take, stages


def worker(rank: int, world: int, port: int, out: str, n_events: int, batch: int, mode: str) -> None:
    """One rank of one mode ("step" or "loop"): join the group, run its batches, write its timings."""
    import torch.distributed as dist

    from ebrflow.app import build_model
    from ebrflow.config import ModelConfig, load_settings
    from ebrflow.model.distributed import ReplicatedTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        settings = load_settings(model={"device": "cpu"}, metrics={"port": 0}, run={"status_interval_s": 0})
        trainer = ReplicatedTrainer(build_model(ModelConfig(device="cpu")))  # type: ignore[arg-type]
        batches = _per_rank_batches(rank, world, n_events, batch)
        dist.barrier()
        with tempfile.TemporaryDirectory() as tmp:
            if mode == "step":
                wall, stages = step_worker(trainer, batches, settings), {}
            else:
                wall, stages = loop_worker(trainer, batches, settings, Path(tmp))
        result = {"rank": rank, "mode": mode, "wall_s": wall, "steps": len(batches), "stages": stages}
        Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_mode(mode: str, world: int, n_events: int, batch: int, port: int) -> list[dict]:
    """Spawn ``world`` ranks of ``mode`` and return their results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, port, out, n_events, batch, mode), nprocs=world, join=True)
        return [json.loads(Path(out, f"{mode}-rank{r}.json").read_text()) for r in range(world)]
