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
    from ebrflow.indexer.seen import SeenItems
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.model.distributed import ReplicatedTrainer, replica_digest
    from ebrflow.stream.checkpointer import Checkpointer
    from ebrflow.stream.rank_checkpoints import RankCheckpoints

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def checkpoints(trainer: ReplicatedTrainer) -> RankCheckpoints:
        store = CheckpointStore(Path(out, f"rank{rank}"))
        return RankCheckpoints(Checkpointer(store, trainer.served, SeenItems(), fingerprint={"kind": "t"}), rank, world)

    try:
        trainer = ReplicatedTrainer(small_model())
        ckpts = checkpoints(trainer)
        stream = events(1024)
        digests = []
        for step in (1, 2):
            part = slice((step - 1) * 512 + rank * 128, (step - 1) * 512 + (rank + 1) * 128)
            trainer.step(Batch.of(stream.user_ids[part], stream.item_ids[part], ts_ms=stream.ts_ms[part]))
            digests.append(trainer.model.version)
            if rank == 0 or (rank == 1 and step == 1):
                ckpts.step, ckpts.generation = step, 1
                ckpts.save({("t", 0): step * 100})
        fresh = ReplicatedTrainer(small_model())
        again = checkpoints(fresh)
        restored = again.restore()
        result = {"step": again.step, "offsets": restored.offsets[("t", 0)], "digest": replica_digest(fresh.served),
                  "versions": digests, "restored_version": fresh.model.version}  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_grow(out: Path, world: int = 3) -> list[dict]:
    """``world`` ranks through ``grow_worker``."""
    import torch.multiprocessing as mp

    mp.spawn(grow_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def rebalance_worker(rank: int, world: int, port: int, config: str, out: str, leave_after: int, away_s: float) -> None:
    """One rank of ``ebrflow run --ranks`` built in-process (``ebrflow.ranks.build_rank``); rank 1's consumer leaves
    its group once the job trained ``leave_after`` batches and joins again once rank 0 trained one of its partitions
    (or ``away_s`` later): its partitions move to rank 0 and back.
    Writes the partitions this rank held over time, what its ``/metrics`` and ``/readyz`` answered, and its summary."""
    import threading
    import time
    import urllib.error
    import urllib.request

    from ebrflow.config import load_settings
    from ebrflow.ranks import build_rank, init_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    init_group("gloo")
    settings = load_settings(config)
    trainer, _ = build_rank(settings, settings.kafka.bootstrap_servers, rank, world)
    held: list[list[int]] = []
    probes: dict[str, int] = {}
    done = threading.Event()

    first: list[int] = []

    def rank0_took(_: list[int]) -> bool:
        """Rank 0's audit log shows a batch of a partition rank 1 held first."""
        if not first:
            first.extend(next((parts for parts in held if parts), []))
        audit = Path(settings.run.data_dir) / "rank0" / "processed.log"
        lines = audit.read_text().splitlines() if audit.exists() else []
        return any(int(line.split()[1]) in first for line in lines if len(line.split()) == 4)

    def watch() -> None:
        left_at = None if rank == 1 else -1.0
        while not done.wait(0.05):
            parts = sorted(tp.partition for tp in trainer.consumer.consumer.assignment())
            if not held or held[-1] != parts:
                held.append(parts)
            if left_at is None and trainer.metrics.batches._value.get() >= leave_after:
                trainer.consumer.leave()
                left_at = time.monotonic()
            if left_at is not None and left_at >= 0 and (time.monotonic() - left_at > away_s or rank0_took(parts)):
                trainer.consumer.join()
                left_at = -1.0
            due = time.monotonic() >= probes.get("next", 0.0) and trainer.metrics.batches._value.get() >= 2
            if due and probes.get("readyz") != 200:  # /readyz is 503 while the rank's consumer rejoins: poll
                probes["next"] = time.monotonic() + 0.5
                for path in ("/metrics", "/readyz"):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{trainer.metrics_port}{path}", timeout=5) as r:
                            probes[path.strip("/")] = r.status
                    except urllib.error.HTTPError as err:
                        probes[path.strip("/")] = err.code
                        probes["body"] = err.read().decode()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = trainer.run(idle_exit_s=6)
        dist.barrier()
    finally:
        done.set()
        watcher.join(timeout=10)
        trainer.close()
        dist.destroy_process_group()
    expired = sum(trainer.metrics.expired.labels(c)._value.get() for c in ("items", "users"))
    probes = {k: v for k, v in probes.items() if k in ("metrics", "readyz")}
    result = {"held": held, "probes": probes, "port": trainer.metrics_port, "trained": summary.trained,
              "recall": summary.extra.get("recall"), "version": trainer.model.version, "expired": expired}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_rebalance(config: Path, out: Path, leave_after: int, away_s: float, world: int = 2) -> list[dict]:
    """``world`` ranks through ``rebalance_worker``."""
    import torch.multiprocessing as mp

    args = (world, free_port(), str(config), str(out), leave_after, away_s)
    mp.spawn(rebalance_worker, args=args, nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
