"""The ``ebrflow`` command: demo, run, replay, query (and report, backfill, config).

Exit codes (also in docs/configuration.md): 0 ok, 1 a failed demo, 2 usage (bad flag or argument), 3 unknown user
(``query``), 65 a bad input file, 69 a service unavailable (Kafka or Milvus unreachable, metrics port in
use, nothing served yet), 75 another trainer holds part of the topic, 78 configuration. Errors are one
``error:`` line on stderr; a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from ebrflow import __version__, logs
from ebrflow.config import CONFIG_ENV, ConfigError, Settings, load_settings
from ebrflow.preflight import EX_UNKNOWN_USER, EX_USAGE

app = typer.Typer(
    help="Streaming, incremental training of embedding-based retrieval.", no_args_is_help=True, add_completion=False
)
console = Console(stderr=True)
log = logging.getLogger("ebrflow.cli")

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="TOML config file (env EBRFLOW_* overrides)."),
]  # noqa: UP007, UP045


class DataFormat(str, Enum):
    """Dataset formats ``replay`` and ``backfill`` read (``stream.replay.FORMATS``)."""

    movielens = "movielens"
    snap = "snap"
    csv = "csv"
    jsonl = "jsonl"


class LogFormat(str, Enum):
    """Log line formats (``run.log_format``)."""

    text = "text"
    json = "json"


LogFormatOpt = Annotated[
    Optional[LogFormat],  # noqa: UP045
    typer.Option("--log-format", help="Log lines as text or JSON objects (default: run.log_format)."),
]


class ShowFormat(str, Enum):
    """Output formats of ``config show``."""

    toml = "toml"
    json = "json"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ebrflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Streaming, incremental training of embedding-based retrieval."""


config_app = typer.Typer(help="Show or validate the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _preflight_trainer(settings: Settings) -> None:
    """Everything a trainer needs, checked before it starts a broker, creates a topic or opens Milvus."""
    from ebrflow.preflight import check_kafka, check_metrics_port, check_milvus, check_settings

    check_settings(settings)
    check_metrics_port(settings.metrics)
    k = settings.kafka
    if k.bootstrap_servers:
        topics = () if k.create_topics else (k.topic, k.dead_letter_topic())
        check_kafka(k.bootstrap_servers, k.client_kwargs(), topics=topics)
    elif not k.create_topics:
        raise ConfigError("kafka.create_topics = false needs kafka.bootstrap_servers (the embedded one starts empty)")
    check_milvus(settings.milvus.uri)


def _settings(config: Path | None, log_format: LogFormat | None = None) -> Settings:
    """Settings from ``config`` and the environment, with ``--log-format`` over ``run.log_format``; sets up logging."""
    try:
        settings = load_settings(config)
    except ConfigError:
        if log_format is not None:  # the error line follows the requested format too
            logs.configure("INFO", log_format.value)
        raise
    if log_format is not None:
        settings = settings.model_copy(update={"run": settings.run.model_copy(update={"log_format": log_format.value})})
    logs.configure(settings.run.log_level, settings.run.log_format)
    return settings


def _say(message: str) -> None:
    """A result line for the operator: printed unwrapped (a command in it stays one line to copy), or logged
    (INFO, plain text) when logs are JSON lines."""
    if logs.json_mode():
        log.info(Text.from_markup(message).plain)
    else:
        console.print(message, soft_wrap=True)


def _ebrflow_command() -> str:
    """How to type this ``ebrflow`` in a shell: ``ebrflow`` when PATH finds this one, else its path (relative to
    the working directory when inside it, e.g. ``.venv/bin/ebrflow``), else ``python -m ebrflow``."""
    script = Path(sys.executable).parent / "ebrflow"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m ebrflow"
    found = shutil.which("ebrflow")
    if found and Path(found).resolve() == script.resolve():
        return "ebrflow"
    relative = os.path.relpath(script)
    return shlex.quote(relative if not relative.startswith("..") else str(script))


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


@app.command()
def demo(
    config: ConfigOpt = None,
    events: Annotated[Optional[int], typer.Option(min=1, help="Synthetic events to stream.")] = None,  # noqa: UP045
    log_format: LogFormatOpt = None,
) -> None:
    """Run the whole path on embedded defaults: Tansu broker, synthetic stream, trainer, Milvus Lite, /metrics."""
    from ebrflow.app import own_data_dir

    settings = _settings(config, log_format)
    _preflight_trainer(settings)
    data_dir = Path(settings.run.data_dir) / "demo"
    with own_data_dir(data_dir, empty=True):  # a fresh demo directory each time, and one demo per directory
        _demo(settings, data_dir, events or settings.demo.events)


def _demo(settings: Settings, data_dir: Path, n: int) -> None:
    """The demo in ``data_dir`` (held by this process): ``n`` synthetic events through the whole path."""
    from ebrflow.app import build_trainer, kafka_endpoint
    from ebrflow.stream.generator import SyntheticStream
    from ebrflow.stream.kafka_io import make_producer
    from ebrflow.stream.replay import events_from_arrays, produce

    settings = settings.model_copy(
        update={
            "run": settings.run.model_copy(update={"data_dir": str(data_dir)}),
            "milvus": settings.milvus.model_copy(update={"uri": str(data_dir / "milvus.db")}),
        }
    )
    d = settings.demo
    stream = SyntheticStream(users=d.users, items=d.items, communities=d.communities, seed=d.seed)
    with kafka_endpoint(settings) as servers:
        trainer = build_trainer(settings, servers)
        producer = make_producer(servers, settings.kafka.client_kwargs())
        now_ms = lambda: int(time.time() * 1000)  # noqa: E731 - live timestamps make freshness meaningful
        sender = threading.Thread(
            target=produce,
            daemon=True,
            args=(producer, settings.kafka.topic, events_from_arrays(stream.chunks(n), restamp=now_ms)),
        )
        sender.start()
        _say(f"demo: streaming {n:,} synthetic events through {servers}; metrics on port {trainer.metrics_port}")
        try:
            summary = trainer.run(max_events=n, idle_exit_s=60)
        finally:
            trainer.close()
            producer.close(timeout=5)
    k = settings.metrics.recall_k
    _say(
        f"[bold green]demo done[/]: {summary.consumed:,} events "
        f"({summary.trained:,} trained, {summary.invalid} invalid) "
        f"in {summary.seconds:.1f} s = {summary.events_per_s:,.0f} events/s; {summary.batches} batches\n"
        f"prequential Recall@{k}: {summary.extra['recall']:.3f} overall, {summary.extra['recall_recent']:.3f} "
        f"over the last 20 batches (cold {summary.extra['recall_cold']:.3f}, warm {summary.extra['recall_warm']:.3f})\n"
        f"indexed in Milvus: {summary.extra['items_indexed']:,.0f} items, {summary.extra['users_indexed']:,.0f} users "
        f"at {settings.milvus.uri}"
    )
    users = trainer.model.known_users()
    if len(users):  # the demo has its own Milvus Lite file: name it, so the next command a user tries works
        uri = shlex.quote(settings.milvus.uri)
        _say(f"try: EBRFLOW_MILVUS__URI={uri} {_ebrflow_command()} query --user {int(users[-1])} -k 10")
    if summary.trained == 0:
        raise typer.Exit(1)


@app.command()
def run(
    config: ConfigOpt = None,
    max_events: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many records.")] = None,  # noqa: UP045
    idle_exit: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0, help="Stop after this many seconds without records, counted once partitions are held."),
    ] = None,
    new_generation: Annotated[
        bool, typer.Option(help="Train a new model generation behind the served aliases (switched once caught up).")
    ] = False,
    log_format: LogFormatOpt = None,
    ranks: Annotated[
        int, typer.Option(min=1, help="Trainer ranks on this machine (torchrun; needs a Kafka and a Milvus server).")
    ] = 1,
    max_restarts: Annotated[int, typer.Option(min=0, help="With --ranks: restarts of the group after a crash.")] = 3,
) -> None:  # noqa: UP045
    """Run the trainer: consume the topic, train, publish to Milvus, serve metrics, until stopped."""
    from ebrflow import ranks as ranked
    from ebrflow.app import build_trainer, kafka_endpoint, own_data_dir

    settings = _settings(config, log_format)
    if ranks > 1 or ranked.in_worker():
        ranked.check_ranked(settings)
    if ranks > 1 and not ranked.in_worker():
        fmt = log_format.value if log_format else None
        argv = ranked.worker_argv(config, fmt, max_events, idle_exit, new_generation)
        raise typer.Exit(ranked.launch(ranks, max_restarts, argv))
    if ranked.in_worker():
        summary = ranked.run_rank(settings, settings.kafka.bootstrap_servers, max_events, idle_exit, new_generation)
        x = {k: int(v) for k, v in summary.extra.items() if k in ("rank", "owned_items", "owned_users")}
        recall = summary.extra.get("recall")
        _say(
            f"rank {x['rank']}: consumed {summary.consumed:,} ({summary.invalid} invalid) in {summary.seconds:.1f} s, "
            f"owns {x['owned_items']:,} items and {x['owned_users']:,} users in Milvus"
            + (f", Recall@{settings.metrics.recall_k} {recall:.3f}" if recall is not None else "")
        )
        return
    _preflight_trainer(settings)
    with own_data_dir(settings.run.data_dir), kafka_endpoint(settings) as servers:
        trainer = build_trainer(settings, servers, new_generation=new_generation)
        if not settings.kafka.bootstrap_servers:  # say where the embedded broker listens, so a replay can feed it
            _say(
                f"embedded Kafka broker at {servers}; send it events with: EBRFLOW_KAFKA__BOOTSTRAP_SERVERS={servers} "
                f"{_ebrflow_command()} replay --synthetic 10000"
            )
        try:
            summary = trainer.run(max_events=max_events, idle_exit_s=idle_exit)
        finally:
            trainer.close()
    _say(
        f"consumed {summary.consumed:,} ({summary.invalid} invalid) in {summary.seconds:.1f} s, "
        f"Recall@{settings.metrics.recall_k} {summary.extra['recall']:.3f}"
    )


@app.command()
def replay(
    path: Annotated[
        Optional[Path], typer.Argument(exists=True, dir_okay=False, help="Dataset file (.gz ok).")  # noqa: UP045
    ] = None,
    fmt: Annotated[DataFormat, typer.Option("--format", help="Dataset format.")] = DataFormat.movielens,
    synthetic: Annotated[int, typer.Option(min=0, help="Instead of a file, send this many synthetic events.")] = 0,
    rate: Annotated[
        Optional[float], typer.Option(min=0, help="Events per second (default or 0: flat out).")  # noqa: UP045
    ] = None,
    speed: Annotated[
        Optional[float], typer.Option(min=0, help="Replay event time this many times faster.")  # noqa: UP045
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option(min=0, help="Send at most this many events (0: none).")  # noqa: UP045
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Produce events to the configured topic in time order, keyed by user id (needs kafka.bootstrap_servers).

    The file is read and checked first, offline (a bad line: exit 65 before Kafka is contacted); ``--limit 0``
    stops there.
    """
    from itertools import islice

    from ebrflow.preflight import check_kafka
    from ebrflow.stream.generator import SyntheticStream
    from ebrflow.stream.kafka_io import ensure_topics, make_producer
    from ebrflow.stream.replay import Pacer, events_from_arrays, produce, read_events

    if synthetic and path is not None:
        raise typer.BadParameter("give a dataset PATH or --synthetic N, not both")
    if not synthetic and path is None:
        raise typer.BadParameter("give a dataset PATH or --synthetic N")
    settings = _settings(config)
    k = settings.kafka
    if synthetic:
        d = settings.demo
        stream = SyntheticStream(users=d.users, items=d.items, communities=d.communities, seed=d.seed)
        events, total = events_from_arrays(stream.chunks(synthetic)), synthetic
    else:
        loaded = read_events(path, fmt.value)
        events = loaded if isinstance(loaded, list) else events_from_arrays([loaded], event_type=fmt.value)
        total = len(loaded)
    if limit == 0:
        console.print(f"{total:,} events read and checked; --limit 0: none sent, Kafka not contacted")
        return
    if limit is not None:
        events, total = islice(events, limit), min(total, limit)
    if not k.bootstrap_servers:
        raise ConfigError("replay needs kafka.bootstrap_servers (EBRFLOW_KAFKA__BOOTSTRAP_SERVERS)")
    check_kafka(k.bootstrap_servers, k.client_kwargs(), topics=() if k.create_topics else (k.topic,))
    if k.create_topics:
        ensure_topics(k.bootstrap_servers, {k.topic: k.partitions}, k.client_kwargs(), k.replication_factor)
    producer = make_producer(k.bootstrap_servers, k.client_kwargs())
    with _progress() as bar:
        task = bar.add_task(f"replay → {k.topic}", total=total)
        sent = produce(producer, k.topic, events, Pacer(rate, speed), lambda n: bar.advance(task, n))
    producer.close()
    console.print(f"sent {sent:,} events to {k.topic}")


@app.command()
def backfill(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Dataset file (.gz ok), replayed in time order.")
    ],
    fmt: Annotated[DataFormat, typer.Option("--format", help="Dataset format.")] = DataFormat.movielens,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the file.")] = 3,
    force: Annotated[bool, typer.Option(help="Replace existing checkpoints (e.g. of a live run).")] = False,
    max_minutes: Annotated[
        Optional[float],  # noqa: UP007, UP045
        typer.Option(min=0, help="Stop training after the batch that crosses this wall-clock budget."),
    ] = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Bootstrap a model offline from a file, then save it as the checkpoint `ebrflow run` starts from.

    The checkpoint holds no Kafka offsets, so the live run then consumes the topic from its committed
    offsets (or the beginning); on start it re-publishes every backfilled embedding to Milvus. Existing
    checkpoints (a live run's state) are never replaced without ``--force``.
    """
    from ebrflow.app import own_data_dir
    from ebrflow.preflight import check_settings

    settings = _settings(config, log_format)
    check_settings(settings)
    with own_data_dir(settings.run.data_dir):  # never beside a live trainer of the same data dir
        _backfill(settings, path, fmt.value, epochs, force, max_minutes)


def _backfill(settings: Settings, path: Path, fmt: str, epochs: int, force: bool, max_minutes: float | None) -> None:
    """``backfill`` once its data dir is held: train, then save the checkpoint."""
    from ebrflow.app import backfill_file, model_fingerprint
    from ebrflow.indexer.seen import SeenItems
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.stream.checkpointer import Checkpointer

    store = CheckpointStore(Path(settings.run.data_dir) / "checkpoints", settings.run.checkpoint_keep)
    if store.paths() and not force:
        _error(
            f"{store.directory} already holds checkpoints (the state `ebrflow run` restores); "
            "a backfill would replace it. Pass --force to do so, or use another run.data_dir."
        )
        raise typer.Exit(78)
    budget = None if max_minutes is None else max_minutes * 60
    model, events, summary = backfill_file(
        settings, path, fmt, epochs, progress=console.is_terminal and not logs.json_mode(), max_seconds=budget
    )
    seen = SeenItems(settings.milvus.seen_capacity)
    seen.add(events.user_ids, events.item_ids)
    Checkpointer(store, model, seen, fingerprint=model_fingerprint(settings.model)).batch_done(
        {}, force=True, source="backfill"
    )
    losses = ", ".join(f"{x:.3f}" for x in summary.epoch_losses)
    _say(
        f"backfilled {len(events):,} events × {summary.epochs} epochs in {summary.seconds:.1f} s "
        f"(loss per epoch: {losses}; {summary.spectral_refits} spectral refits, {summary.spectral_seconds:.1f} s); "
        f"checkpoint at model version {model.version} in {store.directory}"
    )


@app.command()
def query(
    user: Annotated[int, typer.Option("--user", help="User id.")],
    k: Annotated[int, typer.Option("-k", min=1, max=16384, help="How many items.")] = 20,
    config: ConfigOpt = None,
) -> None:
    """Print the user's top-K items from Milvus (items the user already interacted with are excluded).

    Exits 3 when the user has no published embedding, 69 when nothing is served (or Milvus is unreachable).
    """
    from ebrflow.client import QueryClient, UnknownUser
    from ebrflow.preflight import check_milvus

    settings = _settings(config)
    m = settings.milvus
    check_milvus(m.uri)
    client = QueryClient.from_uri(
        m.uri, m.token.get_secret_value(), m.collection_prefix, settings.model.popularity_half_life > 0
    )
    try:
        recs = client.recommend(user, k)
    except UnknownUser:
        _error(f"user {user} has no published embedding yet")
        raise typer.Exit(EX_UNKNOWN_USER) from None
    finally:
        client.close()
    for rank, rec in enumerate(recs, 1):
        typer.echo(f"{rank}\t{rec.item_id}\t{rec.score:.4f}")


class UnknownVariant(ValueError):
    """``promote`` named a variant that has no collections."""

    exit_code = 78


@app.command()
def promote(
    variant: Annotated[str, typer.Argument(help="A name of model.variants (its collections must exist).")],
    config: ConfigOpt = None,
) -> None:
    """Point the served aliases at a shadow variant's collections (until the trainer's next generation switch)."""
    from ebrflow.app import open_store
    from ebrflow.indexer.generations import Generations
    from ebrflow.stream.shadow import variant_prefix

    settings = _settings(config)
    store = open_store(settings)
    try:
        prefix = settings.milvus.collection_prefix
        pair = Generations(store.client, variant_prefix(prefix, variant)).served_collections()
        if pair is None:
            raise UnknownVariant(f"variant {variant!r} has no collections under {variant_prefix(prefix, variant)!r}")
        Generations(store.client, prefix).promote(*pair)
    finally:
        store.client.close()
    console.print(f"{prefix}_items/_users now serve variant {variant} ({pair[0]}, {pair[1]})")


@app.command()
def report(
    history: Annotated[
        Optional[Path], typer.Argument(help="history.jsonl of a run (default: <data_dir>/history.jsonl).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <data_dir>/report).")] = None,
    window: Annotated[int, typer.Option(help="Rolling window in batches.")] = 10,
    config: ConfigOpt = None,
) -> None:
    """Turn a run's per-batch history into PNG plots (recall, drift, throughput, freshness, loss) and a summary."""
    from ebrflow.ops.report import make_report

    settings = _settings(config)
    data_dir = Path(settings.run.data_dir)
    for path in make_report(history or data_dir / "history.jsonl", out or data_dir / "report", window=window):
        typer.echo(str(path))


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    fmt: Annotated[ShowFormat, typer.Option("--format", help="Output format.")] = ShowFormat.toml,
) -> None:
    """Print the effective settings (file, then environment on top), secrets masked; the TOML is a valid config."""
    from ebrflow.render import render

    typer.echo(render(load_settings(config), fmt.value), nl=False)


@config_app.command("validate")
def config_validate(config: ConfigOpt = None) -> None:
    """Check the settings without side effects (types, keys, environment names, topic and collection names, model
    device and options, the OAUTHBEARER token provider, that the data directories can be directories).

    Exits 0 when valid, 78 with one ``error:`` line otherwise. Reachability of Kafka and Milvus is checked by
    the commands that use them.
    """
    from ebrflow.preflight import check_settings

    check_settings(load_settings(config))
    typer.echo(f"config ok ({config if config else 'defaults'} + environment)")


def _error(message: str) -> None:
    """One ``error:`` line on stderr (an ERROR record once logs are JSON lines)."""
    if logs.json_mode():
        log.error(message)
    else:
        console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    """Exception class ``name`` of the click typer uses: its vendored copy (typer >= 0.2x) and/or click itself."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError):
            cls = getattr(importlib.import_module(module), name, None)
            if cls is not None:
                found.append(cls)
    return tuple(found)


_NO_ARGS, _USAGE, _CLICK, _ABORT = (
    _click_errors(n) for n in ("NoArgsIsHelpError", "UsageError", "ClickException", "Abort")
)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: known operator errors become one ``error:`` line on stderr and a distinct exit code.

    2: usage (click's bad flag or argument); 3: unknown user; 65: bad input file; 69: unavailable service;
    75: another trainer holds part of the topic; 78: configuration. Any other exception is a bug and keeps its
    traceback.
    """
    try:
        code = app(args=argv, prog_name="ebrflow", standalone_mode=False)
    except _NO_ARGS:  # help was printed
        raise SystemExit(EX_USAGE) from None
    except _USAGE as exc:
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error(exc.format_message().replace("\n", " ") + where)
        raise SystemExit(EX_USAGE) from None
    except _CLICK as exc:
        _error(exc.format_message())
        raise SystemExit(exc.exit_code) from None
    except _ABORT:
        _error("aborted")
        raise SystemExit(130) from None
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if not isinstance(code, int):
            raise
        _error(str(exc))
        raise SystemExit(code) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
