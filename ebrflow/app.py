"""Wiring: builds the broker, Kafka clients, model, Milvus publisher and observers from ``Settings``."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from threadpoolctl import threadpool_limits

from ebrflow.config import ConfigError, ModelConfig, Settings
from ebrflow.indexer.generations import ROLES, Generations
from ebrflow.indexer.milvus_store import MilvusStore, connect
from ebrflow.indexer.publisher import Publisher
from ebrflow.model.backfill import BackfillSummary
from ebrflow.model.base import RetrievalModel
from ebrflow.model.checkpoint import CheckpointStore
from ebrflow.model.prior import PopularityPrior
from ebrflow.model.two_tower import TwoTowerModel
from ebrflow.ops.drift import DriftMonitor
from ebrflow.ops.history import HistoryWriter
from ebrflow.ops.metrics import PipelineMetrics
from ebrflow.ops.observer import MetricsObserver
from ebrflow.ops.prequential import NoEvaluation, PrequentialEvaluator
from ebrflow.ops.status import StatusLine
from ebrflow.stream.batcher import MicroBatcher
from ebrflow.stream.broker import EmbeddedBroker
from ebrflow.stream.checkpointer import Checkpointer
from ebrflow.stream.consumer import ConsumerThread
from ebrflow.stream.exclusive import Exclusivity
from ebrflow.stream.expiry import Expiry
from ebrflow.stream.generation_switch import GenerationSwitch
from ebrflow.stream.generator import EventArrays
from ebrflow.stream.guard import GuardPolicy, RecallGuard
from ebrflow.stream.kafka_io import DeadLetterWriter, ensure_topics, make_consumer, make_producer
from ebrflow.stream.lag import LagReport
from ebrflow.stream.pipeline import Pipeline, RunSummary
from ebrflow.stream.policy import Coordinator, Policy
from ebrflow.stream.publishing import Publishing
from ebrflow.stream.refresh import Refresh, RollingRefresh
from ebrflow.stream.schema import EventCodec
from ebrflow.stream.shadow import ShadowVariants, Variant, variant_prefix

log = logging.getLogger(__name__)
POPULARITY_SCALE = 0.1  # weight of log recent popularity when model.popularity_scale is unset


def build_model(cfg: ModelConfig, expire_after_s: float = 0.0) -> RetrievalModel:
    """The configured model, ``cfg.dim`` coordinates wide; ``options`` go to its constructor as keyword arguments.

    SSMTL serves its popularity block itself (``popularity_*``); the two-tower model is wrapped in
    ``PopularityPrior`` (built one dimension smaller) when ``popularity_half_life`` > 0. ``graph="user_user"`` makes
    the SSMTL graph user–user with both edge directions stored; ``temperature`` is the softmax temperature of the
    two-tower model or of SSMTL's retrieval task (None: the model's own). ``expire_after_s`` > 0 (expiry on) is
    also the SSMTL graph's TTL: edges older than the span are not sampled.
    """
    torch.set_num_threads(cfg.threads)
    threadpool_limits(cfg.threads)  # BLAS too (spectral refits): oversubscribed BLAS threads cost up to 8x here
    common: dict[str, Any] = dict(steps_per_batch=cfg.steps_per_batch, device=cfg.device, seed=cfg.seed)
    if cfg.lr is not None:
        common["lr"] = cfg.lr
    scale = POPULARITY_SCALE if cfg.popularity_scale is None else cfg.popularity_scale
    if cfg.kind == "ssmtl":
        from ebrflow.model.ssmtl import DEFAULT_TASKS, SSMTLModel

        graph = {"graph_mode": "user_user", "symmetric": True} if cfg.graph == "user_user" else {}
        options = {**graph, **cfg.options}
        if expire_after_s > 0:
            options.setdefault("ttl_ms", int(expire_after_s * 1000))
        tasks = {name: dict(settings) for name, settings in options.pop("tasks", DEFAULT_TASKS).items()}
        if "retrieval" in tasks and cfg.temperature is not None:
            tasks["retrieval"].setdefault("temperature", cfg.temperature)
        popularity = dict(
            popularity_half_life=cfg.popularity_half_life,
            popularity_scale=scale,
            popularity_lifetime=cfg.popularity_lifetime,
        )
        return SSMTLModel(dim=cfg.dim, **common, **popularity, **options, tasks=tasks)
    prior = cfg.popularity_half_life > 0
    if cfg.temperature is not None:
        common["temperature"] = cfg.temperature
    model = TwoTowerModel(dim=cfg.dim - 1 if prior else cfg.dim, **common, **cfg.options)
    if not prior:
        return model
    return PopularityPrior(model, cfg.popularity_half_life, scale=scale, lifetime=cfg.popularity_lifetime)


HELD_OUT_SHARE, HELD_OUT_MAX = 0.01, 10_000  # a backfill's latest events that choose the served blend


def backfill_file(
    settings: Settings,
    path: Path | str,
    fmt: str,
    epochs: int,
    *,
    progress: bool = False,
    max_seconds: float | None = None,
    spectral_refits: Literal["epoch", "stream"] = "epoch",
) -> tuple[RetrievalModel, EventArrays, BackfillSummary]:
    """What ``ebrflow backfill`` trains: ``build_model(settings.model)``, then ``epochs`` passes over the file's
    events in time order, in batches of ``settings.batch.max_events`` (``model.backfill``: ``max_seconds`` stops
    after the batch that crosses the budget; ``spectral_refits`` chooses the refit schedule). A model that chooses
    its served blend (SSMTL) keeps the file's latest 1% of events (at most 10,000) out of the epochs: they choose
    the blend, then it trains on them once. Returns the model, the events and the summary; saves nothing."""
    from ebrflow.model.backfill import backfill
    from ebrflow.model.base import Batch
    from ebrflow.stream.replay import as_arrays, read_events

    events = as_arrays(read_events(path, fmt))
    size = settings.batch.max_events
    model = build_model(settings.model)
    selector = getattr(model, "selector", None)
    held = min(HELD_OUT_MAX, int(HELD_OUT_SHARE * len(events))) if selector and len(selector.candidates) > 1 else 0
    held = held if held >= 200 else 0
    trained = len(events) - held

    def chunks(start: int, stop: int) -> Iterator[Batch]:
        for s in range(start, stop, size):
            e = slice(s, min(s + size, stop))
            yield Batch.of(events.user_ids[e], events.item_ids[e], ts_ms=events.ts_ms[e])

    summary = backfill(
        model,
        lambda: chunks(0, trained),
        epochs,
        progress=progress,
        max_seconds=max_seconds,
        total_batches=-(-trained // size),
        spectral_refits=spectral_refits,
        held_out=list(chunks(trained, len(events))),
    )
    return model, events, summary


def evaluator_for(settings: Settings, publisher: Publisher) -> PrequentialEvaluator:
    """Test-then-train scoring over what ``publisher`` serves, as configured under ``[metrics]``."""
    m = settings.metrics
    return PrequentialEvaluator(
        publisher.items,
        publisher.users,
        publisher.seen,
        k=m.recall_k,
        cold_max_events=m.cold_start_max_events,
        sample=m.eval_sample,
    )


def build_variant(settings: Settings, name: str, served: MilvusStore) -> Variant:
    """Shadow variant ``name`` of ``model.variants``: its model, collections under its own prefix, evaluation."""
    cfg = settings.model.variant(name)
    m = settings.milvus
    prefix = variant_prefix(m.collection_prefix, name)
    store = MilvusStore(served.client, cfg.dim, prefix, m.index_type, m.seen_capacity)
    publisher = Publisher(store)
    evaluator = evaluator_for(settings, publisher)
    refresh = RollingRefresh(settings.run.max_staleness_s, time.monotonic())
    return Variant(name, build_model(cfg), publisher, evaluator, refresh)


def model_fingerprint(cfg: ModelConfig) -> dict:
    """What a checkpoint's model must share with the configured one to be restored into it."""
    return {
        "kind": cfg.kind,
        "graph": cfg.graph if cfg.kind == "ssmtl" else None,
        "dim": cfg.dim,
        "prior": cfg.popularity_half_life > 0,
        "options": {k: cfg.options[k] for k in sorted(cfg.options)},
    }


LOCK_NAME = "ebrflow.lock"  # in run.data_dir: held (flock) by the one process that owns the directory


class DataDirBusy(RuntimeError):
    """Another ebrflow process owns the data directory (its checkpoints, history and audit log)."""

    exit_code = 75  # EX_TEMPFAIL: retry once the other process is gone


@contextlib.contextmanager
def own_data_dir(path: Path | str, empty: bool = False) -> Iterator[Path]:
    """Hold ``path`` (created if missing) for the block: an exclusive ``flock`` on ``<path>/ebrflow.lock``, so a
    second trainer of the same data dir, whatever its topic or group, is refused with ``DataDirBusy`` before it
    creates anything. The kernel releases the lock when the process dies, so a crash never leaves it stale.
    ``empty``: remove everything else in the directory once it is held (the demo starts from nothing)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirBusy(
            f"run.data_dir {directory} is owned by another ebrflow process (pid {holder}): one trainer per data dir "
            "(its checkpoints, history and audit log); stop that one, or give this one its own run.data_dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if empty:
            for child in directory.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        yield directory
    finally:
        os.close(fd)


def check_served_dim(store: MilvusStore, settings: Settings, new_generation: bool) -> None:
    """Without checkpoints a trainer writes the served generation (``GenerationSwitch._decide``): refuse one
    whose collections have another dimension than ``model.dim`` before anything starts (``ConfigError``, 78)."""
    if settings.run.checkpoints or new_generation:
        return
    generations = Generations(store.client, settings.milvus.collection_prefix)
    served = generations.served()
    for role in ROLES if served is not None else ():
        name = generations.physical(role, served)
        dim = store.dim_of(name)
        if dim is not None and dim != settings.model.dim:
            raise ConfigError(
                f"the served collection {name} has dim {dim}, model.dim is {settings.model.dim}; with "
                f"run.checkpoints = false the trainer writes the served collections: set model.dim = {dim}, or pass "
                f"--new-generation to build collections of dim {settings.model.dim} behind the served ones"
            )


@contextlib.contextmanager
def kafka_endpoint(settings: Settings) -> Iterator[str]:
    """The configured bootstrap servers, or an embedded Tansu broker for the duration of the block."""
    if settings.kafka.bootstrap_servers:
        yield settings.kafka.bootstrap_servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


def open_store(settings: Settings) -> MilvusStore:
    """Connect to Milvus; the store names the served aliases (their generation is loaded for reading) until a
    trainer picks the generation it writes. Nothing is created here: see ``indexer.generations``."""
    client = connect(settings.milvus.uri, settings.milvus.token.get_secret_value())
    store = MilvusStore(
        client,
        settings.model.dim,
        settings.milvus.collection_prefix,
        settings.milvus.index_type,
        settings.milvus.seen_capacity,
        settings.milvus.flush_interval_s,
    )
    generations = Generations(client, settings.milvus.collection_prefix)
    served = generations.served()
    if served is not None:
        generations.load(served)
    return store


@dataclass
class Trainer:
    """A ready-to-run pipeline plus the pieces tests and the CLI inspect afterwards."""

    pipeline: Pipeline
    model: RetrievalModel
    store: MilvusStore
    publisher: Publisher
    metrics: PipelineMetrics
    observer: MetricsObserver
    metrics_port: int | None
    consumer: ConsumerThread
    variants: list[Variant] = field(default_factory=list)

    def run(self, max_events: int | None = None, idle_exit_s: float | None = None) -> RunSummary:
        """Run the loop (SIGINT/SIGTERM finish the current batch and stop) and flush Milvus at the end."""
        self.metrics.up.set(1)
        previous = _install_stop_handlers(self.pipeline.stop)
        try:
            summary = self.pipeline.run(max_events=max_events, idle_exit_s=idle_exit_s)
        finally:
            _restore_handlers(previous)
            self.metrics.up.set(0)
            try:
                self.store.flush_if_due(force=True)
            except Exception as exc:  # noqa: BLE001 - an unreachable Milvus must not turn a stop into a crash
                log.warning("final Milvus flush failed (%s); upserted rows are kept and flushed later", exc)
        total = self.observer.evaluator.total
        summary.extra.update(
            recall=total.all.recall or 0.0,
            recall_cold=total.cold.recall or 0.0,
            recall_warm=total.warm.recall or 0.0,
            recall_recent=self.observer.recent_recall() or 0.0,
            items_indexed=len(self.publisher.items),
            users_indexed=len(self.publisher.users),
        )
        return summary

    def close(self) -> None:
        """Stop the consumer thread; close the Kafka clients, the history file and the Milvus connection."""
        self.consumer.close()
        with contextlib.suppress(Exception):
            self.consumer.consumer.close()
        with contextlib.suppress(Exception):
            self.consumer.dlq.close()
        if self.pipeline.audit_log is not None:
            self.pipeline.audit_log.close()
        if self.observer.history is not None:
            self.observer.history.close()
        with contextlib.suppress(Exception):
            self.store.client.close()


def build_observer(
    settings: Settings, metrics: PipelineMetrics, publisher: Publisher, data_dir: Path, scores: bool = True
) -> MetricsObserver:
    """Metrics, prequential evaluation over what ``publisher`` serves (unless not ``scores``: ranks other than 0),
    drift, history and the status line."""
    history = HistoryWriter(data_dir / "history.jsonl")
    # neighbour churn costs a probe × catalogue product: every 10th batch keeps it off most batches
    drift = DriftMonitor(
        publisher.items, k=settings.metrics.recall_k, every=10, prior_coordinate=settings.model.popularity_half_life > 0
    )
    run = settings.run
    status = StatusLine(metrics, run.status_interval_s, settings.metrics.recall_k) if run.status_interval_s else None
    evaluator = (
        evaluator_for(settings, publisher) if scores else NoEvaluation(publisher.items, publisher.users, publisher.seen)
    )
    return MetricsObserver(metrics, evaluator, drift=drift, history=history, status=status)


def build_consumer(settings: Settings, bootstrap_servers: str, observer: MetricsObserver) -> ConsumerThread:
    """The consumer thread: the group consumer, the dead-letter writer, micro-batching."""
    k = settings.kafka
    client_kwargs = k.client_kwargs()
    consumer = make_consumer(
        bootstrap_servers, k.group_id, k.session_timeout_ms, max(k.max_event_bytes * 4, 1 << 20), client_kwargs
    )
    dlq = DeadLetterWriter(lambda: make_producer(bootstrap_servers, client_kwargs), k.dead_letter_topic())
    batcher = MicroBatcher(settings.batch.max_events, settings.batch.max_wait_ms / 1000.0)
    codec = EventCodec(max_bytes=k.max_event_bytes)
    return ConsumerThread(consumer, k.topic, codec, dlq, batcher, observer, on_demand=settings.batch.on_demand)


def build_checkpointer(
    settings: Settings, model: RetrievalModel, publisher: Publisher, variants: list[Variant], directory: Path
) -> Checkpointer:
    """Checkpoints of the model, seen items and every shadow variant under ``directory``."""
    run = settings.run
    return Checkpointer(
        CheckpointStore(directory, run.checkpoint_keep),
        model,
        publisher.seen,
        run.checkpoint_every_batches,
        run.checkpoint_every_s,
        fingerprint=model_fingerprint(settings.model),
        stream={"topic": settings.kafka.topic, "group": settings.kafka.group_id},
        variants={
            v.name: (v.model, v.publisher.seen, model_fingerprint(settings.model.variant(v.name))) for v in variants
        },
    )


def build_policies(
    settings: Settings,
    store: MilvusStore,
    variants: list[Variant],
    new_generation: bool = False,
    coordinator: Coordinator | None = None,
) -> list[Policy]:
    """The configured policies, in the order the loop calls them (a switched-off one is left out)."""
    run, g = settings.run, settings.guard
    generations = Generations(store.client, settings.milvus.collection_prefix)
    policies: list[Policy] = [
        GenerationSwitch(generations, new_generation, settings.milvus.generation_grace_s, coordinator),
        LagReport(),
        Refresh(run.max_staleness_s),
    ]
    if variants:
        policies.append(ShadowVariants(variants, coordinator))
    if g.enabled:
        guard = RecallGuard(g.mode, g.margin, g.window, g.baseline, g.patience, g.min_events, g.loss_factor)
        policies.append(GuardPolicy(guard, g.snapshot_every))
    if run.expire_after_s:
        policies.append(Expiry(run.expire_after_s))
    return policies


def serve_metrics(
    settings: Settings, metrics: PipelineMetrics, built: list[Pipeline], port_offset: int = 0
) -> int | None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` (asking the pipeline once it exists) when enabled.

    ``port_offset``: rank r of a ranked job serves on ``metrics.port + r`` (port 0: an ephemeral port each)."""
    m = settings.metrics
    metrics.set_build_info(_version(), settings.model.kind, settings.model.dim, m.recall_k)
    if not m.enabled:
        return None
    port = metrics.serve(
        m.host, m.port + port_offset if m.port else 0, readiness=lambda: built[0].readiness() if built else {}
    )
    log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", m.host, port)
    return port


def build_trainer(
    settings: Settings,
    bootstrap_servers: str,
    model: RetrievalModel | None = None,
    metrics: PipelineMetrics | None = None,
    new_generation: bool = False,
) -> Trainer:
    """Assemble the pipeline against ``bootstrap_servers`` (topics are created if missing and ``kafka.create_topics``).

    ``new_generation``: train a new model generation behind the served aliases even when a checkpoint exists.
    """
    k, run = settings.kafka, settings.run
    store = open_store(settings)
    try:
        check_served_dim(store, settings, new_generation)
    except ConfigError:
        store.client.close()
        raise
    if k.create_topics:
        ensure_topics(
            bootstrap_servers,
            {k.topic: k.partitions, k.dead_letter_topic(): 1},
            k.client_kwargs(),
            k.replication_factor,
        )
    model = model or build_model(settings.model, run.expire_after_s)
    publisher = Publisher(store)
    metrics = metrics or PipelineMetrics()
    built: list[Pipeline] = []  # /readyz asks the pipeline once it exists
    port = serve_metrics(settings, metrics, built)
    observer = build_observer(settings, metrics, publisher, Path(run.data_dir))
    variants = [build_variant(settings, name, store) for name in settings.model.variants]
    source = build_consumer(settings, bootstrap_servers, observer)
    data = Path(run.data_dir)
    checkpointer = (
        build_checkpointer(settings, model, publisher, variants, data / "checkpoints") if run.checkpoints else None
    )
    policies = build_policies(settings, store, variants, new_generation)
    if run.exclusive_grace_s:
        policies.insert(0, Exclusivity(k.topic, k.group_id, run.exclusive_grace_s))
    audit = (data / "processed.log").open("a", encoding="utf-8") if run.audit_log else None
    publishing = Publishing(publisher)
    pipeline = Pipeline(source, model, publishing, observer, checkpointer, policies, audit)
    built.append(pipeline)
    return Trainer(pipeline, model, store, publisher, metrics, observer, port, source, variants)


def _version() -> str:
    try:
        return importlib.metadata.version("ebrflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _install_stop_handlers(stop: Callable[[], None]) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop())
    return previous


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
