"""Trainer ranks: ``ebrflow run --ranks N`` starts ``torchrun`` (elastic: a crashed rank restarts the group), and each
worker it starts (``WORLD_SIZE`` > 1 in its environment) joins the process group and runs the trainer's loop with
``stream.ranked``'s batch forming and writes."""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ebrflow.config import ConfigError, Settings

if TYPE_CHECKING:
    from ebrflow.app import Trainer
    from ebrflow.model.distributed import ReplicatedTrainer
    from ebrflow.stream.pipeline import RunSummary

log = logging.getLogger(__name__)


def in_worker() -> bool:
    """Whether this process is one of several ranks started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_ranked(settings: Settings) -> None:
    """What ranks need beyond a single trainer: an external broker, a shared Milvus server, the SSMTL model."""
    if not settings.kafka.bootstrap_servers:
        raise ConfigError("ranks need kafka.bootstrap_servers: each rank would start its own embedded broker")
    if not settings.milvus.uri.startswith(("http://", "https://", "tcp://", "grpc://")):
        raise ConfigError(
            "ranks need a Milvus server in milvus.uri (Milvus Lite opens a local path in one process only: "
            "serve it with `milvus-lite server --data-dir DIR --port P` and use http://127.0.0.1:P)"
        )
    if settings.model.kind != "ssmtl":
        raise ConfigError("ranks train the SSMTL model: model.kind must be 'ssmtl'")


def torchrun_args(ranks: int, max_restarts: int, argv: list[str]) -> list[str]:
    """``torchrun`` arguments starting ``ranks`` local workers of ``python -m ebrflow <argv>``.

    >>> torchrun_args(2, 3, ["run", "-c", "t.toml"])[:6]
    ['--standalone', '--nproc-per-node', '2', '--max-restarts', '3', '--monitor-interval']
    """
    return [
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.5",
        "-m",
        "ebrflow",
        *argv,
    ]


def worker_argv(
    config: Path | None,
    log_format: str | None,
    max_events: int | None,
    idle_exit: float | None,
    new_generation: bool = False,
) -> list[str]:
    """The ``ebrflow run`` arguments each worker gets (those of this command, without ``--ranks``)."""
    argv = ["run"]
    for flag, value in (("-c", config), ("--log-format", log_format), ("--max-events", max_events)):
        if value is not None:
            argv += [flag, str(value)]
    if idle_exit is not None:
        argv += ["--idle-exit", str(idle_exit)]
    return argv + (["--new-generation"] if new_generation else [])


def launch(ranks: int, max_restarts: int, argv: list[str]) -> int:
    """Run ``torchrun`` in this process until every worker finished (or restarts ran out); returns an exit code."""
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_args(ranks, max_restarts, argv))
    except Exception as exc:  # noqa: BLE001 - torchrun reports failed workers as ChildFailedError
        log.error("ranks failed: %s", exc)
        return 1
    return 0


def init_group(backend: str, timeout: timedelta = timedelta(minutes=10)) -> None:
    """Join the process group from torchrun's environment, under a store prefix of this restart attempt.

    Measured here (torch 2.13 CPU): after torchrun restarted the workers of a SIGKILLed rank, gloo's full-mesh
    connect read the dead attempt's addresses from the shared rendezvous store ("Connection refused") and the
    next attempt hung; keys prefixed with ``TORCHELASTIC_RESTART_COUNT`` keep every attempt's own.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
    is_master = not agent_store and rank == 0
    store = dist.TCPStore(host, port, world, is_master=is_master, timeout=timeout, multi_tenant=is_master)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"ebrflow/attempt{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def build_rank(
    settings: Settings, bootstrap_servers: str, rank: int, world: int, new_generation: bool = False
) -> tuple[Trainer, ReplicatedTrainer]:
    """This rank's trainer and its replicated model: the single trainer's loop and policies around a
    ``ReplicatedTrainer``, with the all-gathering source, an ``OwnedStore``, inline Milvus writes, per-rank
    checkpoints and metrics on ``metrics.port + rank`` (see docs/loop.md)."""
    from ebrflow.app import (
        Trainer,
        build_checkpointer,
        build_consumer,
        build_model,
        build_observer,
        build_policies,
        build_variant,
        open_store,
        serve_metrics,
    )
    from ebrflow.indexer.publisher import Publisher
    from ebrflow.model.distributed import ReplicatedTrainer
    from ebrflow.ops.metrics import PipelineMetrics
    from ebrflow.stream.pipeline import Pipeline
    from ebrflow.stream.publishing import Publishing
    from ebrflow.stream.rank_checkpoints import RankCheckpoints
    from ebrflow.stream.ranked import OwnedStore, OwnIds, RankedSource, RankGroup, ReplicaCheck, SharedScore

    run = settings.run
    trainer = ReplicatedTrainer(build_model(settings.model, run.expire_after_s))  # type: ignore[arg-type]
    served = open_store(settings)
    store = OwnedStore(served, rank, world)
    publisher = Publisher(store)  # type: ignore[arg-type]
    data = Path(run.data_dir) / f"rank{rank}"
    data.mkdir(parents=True, exist_ok=True)
    metrics, built = PipelineMetrics(), []
    port = serve_metrics(settings, metrics, built, port_offset=rank)
    observer = build_observer(settings, metrics, publisher, data, scores=rank == 0)
    variants = [build_variant(settings, name, served) for name in settings.model.variants]
    for v in variants:
        v.publisher.store = OwnedStore(v.publisher.store, rank, world)  # type: ignore[assignment]
    consumer = build_consumer(settings, bootstrap_servers, observer)
    group = RankGroup(rank, world)
    checkpoints = None
    if run.checkpoints:
        checkpointer = build_checkpointer(settings, trainer.served, publisher, variants, data / "checkpoints")
        checkpoints = RankCheckpoints(checkpointer, rank, world)
    policies = [*build_policies(settings, served, variants, new_generation, group), ReplicaCheck(trainer)]
    if settings.guard.enabled:
        policies.insert(0, SharedScore(group))
    if rank:
        policies.append(OwnIds(rank, world))
    audit = (data / "processed.log").open("a", encoding="utf-8") if run.audit_log else None
    source = RankedSource(consumer, trainer, settings.batch.max_wait_ms / 1000.0)
    pipeline = Pipeline(
        source,
        trainer.served,
        Publishing(publisher, depth=0),
        observer,
        checkpoints,
        policies,
        audit,
        trainer.fit_global,
    )
    built.append(pipeline)
    parts = Trainer(pipeline, trainer.served, store, publisher, metrics, observer, port, consumer, variants)  # type: ignore[arg-type]
    return parts, trainer


def run_rank(
    settings: Settings,
    bootstrap_servers: str,
    max_events: int | None,
    idle_exit_s: float | None,
    new_generation: bool = False,
) -> RunSummary:
    """Join the process group (gloo on CPU, nccl on CUDA) and run this rank's loop; returns its ``RunSummary``."""
    from ebrflow.app import own_data_dir
    from ebrflow.stream.kafka_io import ensure_topics

    cuda = settings.model.device.startswith("cuda") and torch.cuda.is_available()
    init_group("nccl" if cuda else "gloo")
    rank, world, k = dist.get_rank(), dist.get_world_size(), settings.kafka
    held = contextlib.ExitStack()
    try:
        if k.create_topics and rank == 0:
            topics = {k.topic: k.partitions, k.dead_letter_topic(): 1}
            ensure_topics(bootstrap_servers, topics, k.client_kwargs(), k.replication_factor)
        dist.barrier()
        held.enter_context(own_data_dir(Path(settings.run.data_dir) / f"rank{rank}"))  # one job per data dir
        trainer, replicated = build_rank(settings, bootstrap_servers, rank, world, new_generation)
        try:
            summary = trainer.run(max_events=max_events, idle_exit_s=idle_exit_s)
            dist.barrier()  # every rank's last rows are written and flushed
        finally:
            trainer.close()
        s = replicated.stats
        summary.extra.update(rank=rank, comm_s=s.seconds, compute_s=s.compute_seconds, bytes=s.bytes_total)
        summary.extra.update(
            owned_items=trainer.store.owned(trainer.model.known_items()),
            owned_users=trainer.store.owned(trainer.model.known_users()),
        )
        log.info(
            "rank %d: %d events consumed, %d global steps, communication %.1f s, compute %.1f s, %d bytes sent",
            rank, summary.consumed, s.steps, s.seconds, s.compute_seconds, s.bytes_total,
        )  # fmt: skip
        return summary
    finally:
        held.close()
        dist.destroy_process_group()
