"""Trainer ranks: ``ebrflow run --ranks N`` starts ``torchrun`` (elastic: a crashed rank restarts the group), and each
worker it starts (``WORLD_SIZE`` > 1 in its environment) joins the process group and runs ``stream.ranked``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ebrflow.config import ConfigError, Settings

if TYPE_CHECKING:
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
    if settings.model.variants or settings.guard.enabled:
        raise ConfigError("ranks do not run shadow variants or the recall guard yet: unset model.variants, guard")


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
    config: Path | None, log_format: str | None, max_events: int | None, idle_exit: float | None
) -> list[str]:
    """The ``ebrflow run`` arguments each worker gets (those of this command, without ``--ranks``)."""
    argv = ["run"]
    for flag, value in (("-c", config), ("--log-format", log_format), ("--max-events", max_events)):
        if value is not None:
            argv += [flag, str(value)]
    if idle_exit is not None:
        argv += ["--idle-exit", str(idle_exit)]
    return argv


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


def run_rank(
    settings: Settings, bootstrap_servers: str, max_events: int | None, idle_exit_s: float | None
) -> RunSummary:
    """Join the process group (gloo on CPU, nccl on CUDA) and run this rank's loop; returns its ``RunSummary``."""
    from ebrflow.app import build_model, evaluator_for, model_fingerprint, open_store, own_data_dir
    from ebrflow.indexer.generations import Generations
    from ebrflow.indexer.mirror import EmbeddingMirror
    from ebrflow.indexer.publisher import Publisher
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.model.distributed import ReplicatedTrainer
    from ebrflow.stream.batcher import MicroBatcher
    from ebrflow.stream.kafka_io import DeadLetterWriter, ensure_topics, make_consumer, make_producer
    from ebrflow.stream.ranked import RankCheckpoints, RankedLoop
    from ebrflow.stream.schema import EventCodec

    cuda = settings.model.device.startswith("cuda") and torch.cuda.is_available()
    init_group("nccl" if cuda else "gloo")
    rank, k, run = dist.get_rank(), settings.kafka, settings.run
    held = contextlib.ExitStack()
    try:
        if k.create_topics and rank == 0:
            topics = {k.topic: k.partitions, k.dead_letter_topic(): 1}
            ensure_topics(bootstrap_servers, topics, k.client_kwargs(), k.replication_factor)
        dist.barrier()
        trainer = ReplicatedTrainer(build_model(settings.model))  # type: ignore[arg-type]
        store = open_store(settings)
        publisher = Publisher(store)
        data = held.enter_context(own_data_dir(Path(run.data_dir) / f"rank{rank}"))  # one job per data dir
        checkpoints = None
        if run.checkpoints:
            ckpt_store = CheckpointStore(data / "checkpoints", run.checkpoint_keep)
            checkpoints = RankCheckpoints(ckpt_store, trainer, publisher, model_fingerprint(settings.model))
        evaluator = None
        if rank == 0:  # one rank scores test-then-train recall over what all ranks serve, as the single trainer does
            view = SimpleNamespace(
                items=EmbeddingMirror(store.dim), users=EmbeddingMirror(store.dim), seen=publisher.seen
            )
            evaluator = evaluator_for(settings, view)  # type: ignore[arg-type]
        kwargs = k.client_kwargs()
        fetch_bytes = max(k.max_event_bytes * 4, 1 << 20)
        consumer = make_consumer(bootstrap_servers, k.group_id, k.session_timeout_ms, fetch_bytes, kwargs)
        audit = (data / "processed.log").open("a", encoding="utf-8") if run.audit_log else None
        loop = RankedLoop(
            consumer,
            k.topic,
            EventCodec(max_bytes=k.max_event_bytes),
            DeadLetterWriter(lambda: make_producer(bootstrap_servers, kwargs), k.dead_letter_topic()),
            trainer,
            publisher,
            MicroBatcher(settings.batch.max_events, settings.batch.max_wait_ms / 1000.0),
            checkpoints,
            run.checkpoint_every_batches,
            audit,
            Generations(store.client, settings.milvus.collection_prefix),
            run.max_staleness_s,
            evaluator=evaluator,
        )
        previous = {sig: signal.signal(sig, lambda *_: loop.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            summary = loop.run(max_events=max_events, idle_exit_s=idle_exit_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            consumer.close()
            loop.dlq.close()
            if audit is not None:
                audit.close()
        s = trainer.stats
        summary.extra.update(rank=rank, comm_s=s.seconds, compute_s=s.compute_seconds, bytes=s.bytes_total)
        summary.extra.update(owned_items=loop.owned[0], owned_users=loop.owned[1])
        if evaluator is not None:
            summary.extra["recall"] = evaluator.total.all.recall or 0.0
        log.info(
            "rank %d: %d events consumed, %d global steps, communication %.1f s, compute %.1f s, %d bytes sent",
            rank, summary.consumed, s.steps, s.seconds, s.compute_seconds, s.bytes_total,
        )  # fmt: skip
        return summary
    finally:
        held.close()
        dist.destroy_process_group()
