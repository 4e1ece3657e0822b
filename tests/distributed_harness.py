"""Runs ``ReplicatedTrainer`` on N local gloo ranks (``torch.multiprocessing`` spawn) over a synthetic stream split
by user like keyed Kafka partitions; rank 0 scores prequential recall. Results go to a JSON file per rank."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ebrflow.model.base import Batch


def free_port() -> int:
    """A TCP port free on loopback now (for the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_model():  # noqa: ANN201 - SSMTLModel, imported lazily in the child
    """The SSMTL default at dim 16 (what the tests train)."""
    from ebrflow.model.ssmtl import SSMTLModel

    return SSMTLModel(dim=16, device="cpu", seed=3)


def events(n: int):  # noqa: ANN201 - EventArrays
    """The demo's synthetic stream, first ``n`` events."""
    from bench.common import synthetic_events

    return synthetic_events(n)


class _Learner:
    """A bench ``Scorer`` whose ``learn`` trains this rank's share of the batch through the collective step."""

    def __init__(self, trainer, rank: int, world: int, skew_every: int = 0) -> None:  # noqa: ANN001
        self.name, self.trainer, self.rank, self.world = "ranks", trainer, rank, world
        self.model, self.skew_every, self._n = trainer.model, skew_every, 0

    def learn(self, batch: Batch) -> None:
        """Keep the events of this rank's users (as a user-keyed partitioning does) and step with every rank.

        Every ``skew_every``-th batch goes to rank 0 whole: the other ranks step with an empty slice (lockstep).
        """
        from ebrflow.model.distributed import owner

        self._n += 1
        if self.skew_every and self._n % self.skew_every == 0:
            mine = np.full(len(batch), self.rank == 0)
        else:
            mine = owner(batch.user_ids, self.world) == self.rank
        self.trainer.step(Batch(batch.user_ids[mine], batch.item_ids[mine], batch.weights[mine], batch.ts_ms[mine]))

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Inner products of the replica's embeddings."""
        return self.model.user_embeddings(users) @ self.model.item_embeddings(items).T


def worker(rank: int, world: int, port: int, out: str, n_events: int, batch_size: int, skew_every: int = 0) -> None:
    """One rank: join the gloo group, train the stream, write digest, recall (rank 0) and comm stats."""
    from bench.common import batches, evaluate_stream
    from ebrflow.model.distributed import ReplicatedTrainer, replica_digest

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = ReplicatedTrainer(small_model())
        learner = _Learner(trainer, rank, world, skew_every)
        stream = events(n_events)
        recall = None
        if rank == 0:
            result = evaluate_stream(stream, learner, batch_size=batch_size, k=20, sample=64)
            recall = result.total()["recall"]
        else:
            for batch in batches(stream, batch_size):
                learner.learn(batch)
        s = trainer.stats
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "digest": replica_digest(trainer.model),
                    "version": trainer.model.version,
                    "recall": recall,
                    "bytes_events": s.bytes_events,
                    "bytes_grads": s.bytes_grads,
                    "comm_s": s.seconds,
                    "compute_s": s.compute_seconds,
                    "replicated_s": s.replicated_seconds,
                    "steps": s.steps,
                    "events": n_events,
                }
            )
        )
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, out: Path, n_events: int, batch_size: int, skew_every: int = 0) -> list[dict]:
    """Spawn ``world`` gloo ranks on loopback and return each rank's JSON result."""
    import torch.multiprocessing as mp

    args = (world, free_port(), str(out), n_events, batch_size, skew_every)
    mp.spawn(worker, args=args, nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def diverge_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train a little, perturb rank 1's replica, then ``verify_replicas``: it must report and repair the divergence."""
    from ebrflow.model.distributed import ReplicatedTrainer, replica_digest, verify_replicas

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = ReplicatedTrainer(small_model())
        stream = events(2048)
        for s in range(0, 2048, 512):
            part = slice(s + rank * 256, s + (rank + 1) * 256)
            trainer.step(Batch.of(stream.user_ids[part], stream.item_ids[part], ts_ms=stream.ts_ms[part]))
        first = verify_replicas(trainer)
        if rank == 1:
            with torch.no_grad():
                trainer.model.encoder.tables[0].weight[0] += 1e-6  # one bit-level difference
        second = verify_replicas(trainer)
        third = verify_replicas(trainer)
        trainer.step(Batch.of(stream.user_ids[:64], stream.item_ids[:64], ts_ms=stream.ts_ms[:64]))
        result = {"checks": [first, second, third], "digest": replica_digest(trainer.model)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_diverge(out: Path) -> list[dict]:
    """Two ranks through ``diverge_worker``."""
    import torch.multiprocessing as mp

    mp.spawn(diverge_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def grow_worker(rank: int, world: int, port: int, out: str) -> None:
    """Ranks 0 and 1 checkpoint a trained replica at steps 1 and 2 (rank 1 misses step 2, as if killed first); then
    all ``world`` ranks restore: the newest common step, and the rank without checkpoints receives it."""
    from types import SimpleNamespace

    from ebrflow.indexer.seen import SeenItems
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.model.distributed import ReplicatedTrainer, replica_digest
    from ebrflow.stream.ranked import RankCheckpoints

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = ReplicatedTrainer(small_model())
        publisher = SimpleNamespace(seen=SeenItems())
        ckpts = RankCheckpoints(CheckpointStore(Path(out, f"rank{rank}")), trainer, publisher, {"kind": "t"})  # type: ignore[arg-type]
        stream = events(1024)
        digests = []
        for step in (1, 2):
            part = slice((step - 1) * 512 + rank * 128, (step - 1) * 512 + (rank + 1) * 128)
            trainer.step(Batch.of(stream.user_ids[part], stream.item_ids[part], ts_ms=stream.ts_ms[part]))
            digests.append(trainer.model.version)
            if rank == 0 or (rank == 1 and step == 1):
                ckpts.save(step, {("t", 0): step * 100}, 1)
        fresh = ReplicatedTrainer(small_model())
        again = RankCheckpoints(CheckpointStore(Path(out, f"rank{rank}")), fresh, publisher, {"kind": "t"})  # type: ignore[arg-type]
        restored = again.restore()
        result = {"step": restored[0], "offsets": restored[1][("t", 0)], "digest": replica_digest(fresh.served),
                  "versions": digests, "restored_version": fresh.model.version}  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_grow(out: Path, world: int = 3) -> list[dict]:
    """``world`` ranks through ``grow_worker``."""
    import torch.multiprocessing as mp

    mp.spawn(grow_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
