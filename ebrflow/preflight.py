"""Checks the CLI runs before any side effect (no topic created, no Milvus opened, no port bound for long).

Each failure is an exception with an ``exit_code`` that ``ebrflow.cli.main`` turns into one ``error:`` line:
``ConfigError`` (78) for settings that cannot work, ``Unavailable`` (69) for a service or resource that is not
there. The exit codes of the whole CLI are listed here and in docs/configuration.md.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from ebrflow.config import ConfigError, MetricsConfig, ModelConfig, Settings, describe_errors

EX_OK = 0
EX_USAGE = 2  # a bad flag or argument (click's code)
EX_UNKNOWN_USER = 3  # `ebrflow query`: the user has no published embedding
EX_DATAERR = 65  # an input file with a bad line or a missing column
EX_UNAVAILABLE = 69  # Kafka or Milvus unreachable, the metrics port taken, nothing served yet
EX_TEMPFAIL = 75  # another trainer holds part of the topic
EX_CONFIG = 78  # invalid settings, or a checkpoint of another model configuration

CONNECT_TIMEOUT_S = 10.0  # bound on reaching Kafka or Milvus before anything is done

# keyword arguments build_model sets from model.* keys itself; options must not repeat them
_SET_BY_KEYS = {"dim": "dim", "temperature": "temperature", "steps_per_batch": "steps_per_batch",
                "device": "device", "seed": "seed", "lr": "lr"}  # fmt: skip


class Unavailable(RuntimeError):
    """A service or resource the command needs is not there (unreachable broker or Milvus, a port in use)."""

    exit_code = EX_UNAVAILABLE


def model_class(kind: str) -> type:
    """The model class ``build_model`` instantiates for ``model.kind`` (imports torch)."""
    if kind == "ssmtl":
        from ebrflow.model.ssmtl import SSMTLModel

        return SSMTLModel
    from ebrflow.model.two_tower import TwoTowerModel

    return TwoTowerModel


def check_model_options(cfg: ModelConfig, where: str = "model") -> None:
    """Every key of ``model.options`` must be a keyword of the model class's constructor, and not one that a
    dedicated ``model.*`` key sets (``dim``, ``lr``, ...); ``where`` names the section in errors."""
    cls = model_class(cfg.kind)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(
        n
        for n, p in params.items()
        if n != "self" and n not in _SET_BY_KEYS and p.kind is not inspect.Parameter.VAR_POSITIONAL
    )
    for key in cfg.options:
        if key in _SET_BY_KEYS:
            raise ConfigError(f"{where}.options.{key}: set {where}.{_SET_BY_KEYS[key]} instead")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"accepted: {', '.join(accepted)}"
            raise ConfigError(f"{where}.options.{key}: not a parameter of {cls.__name__} ({hint})")
    if "tasks" in cfg.options:
        check_task_settings(cfg.options["tasks"], where)


def check_task_settings(tasks: Any, where: str = "model") -> None:
    """``model.options.tasks`` (ssmtl) must parse in the task registry; the retrieval temperature is
    ``model.temperature``."""
    from ebrflow.model.tasks import parse_tasks

    try:
        parse_tasks(tasks)
    except ValueError as exc:
        raise ConfigError(f"{where}.options.{exc}") from None
    if "temperature" in tasks.get("retrieval", {}):
        raise ConfigError(f"{where}.options.tasks.retrieval.temperature: set {where}.temperature instead")


def check_device(cfg: ModelConfig) -> None:
    """``model.device`` must name a torch device that exists here (``auto`` always does)."""
    if cfg.device == "auto":
        return
    import torch

    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device: {cfg.device!r} is not a torch device (auto, cpu, cuda:N, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"model.device: {cfg.device!r} but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"model.device: {cfg.device!r} but only {count} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {cfg.device!r} but MPS is not available here; use auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"model.device: {cfg.device!r} is not supported (auto, cpu, cuda, cuda:N, mps)")


def check_model(cfg: ModelConfig) -> None:
    """The model section beyond what its types say: a usable device and known constructor options, the
    variants' included."""
    check_device(cfg)
    check_model_options(cfg)
    for name in cfg.variants:
        where = f"model.variants.{name}"
        try:
            variant = cfg.variant(name)
        except ValidationError as exc:
            raise ConfigError(f"{where}: " + "; ".join(describe_errors(exc, ModelConfig).splitlines())) from None
        check_model_options(variant, where)


def check_settings(settings: Settings) -> None:
    """What ``config validate`` and every command's preflight check beyond the types, without side effects: the
    model (device, options, variants), the Kafka client settings, and that the data directories can be directories."""
    check_model(settings.model)
    settings.kafka.client_kwargs()
    check_directory(settings.run.data_dir, "run.data_dir")
    if "://" not in settings.milvus.uri:
        check_directory(settings.milvus.uri, "milvus.uri")


def check_directory(path: str, key: str) -> None:
    """``path`` is a directory, or can be created as one: it and its nearest existing ancestor are no files.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     check_directory(f.name + "/sub", "run.data_dir")
    Traceback (most recent call last):
    ...
    ebrflow.config.ConfigError: run.data_dir: ... cannot be a directory: ... is a file, not a directory
    """
    target = Path(path)
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == target else f"{target} cannot be a directory: "
        raise ConfigError(f"{key}: {where}{existing} is a file, not a directory")


def check_metrics_port(cfg: MetricsConfig) -> None:
    """The metrics port must be free on its host (bound and released at once, as the server would bind it)."""
    if not cfg.enabled or cfg.port == 0:
        return
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"metrics.host: cannot resolve {cfg.host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Unavailable(
                    f"metrics port {cfg.port} on {cfg.host} is already in use (metrics.port; 0 picks a free one)"
                ) from None
            raise ConfigError(f"metrics.host/port: cannot bind {cfg.host}:{cfg.port} ({exc.strerror})") from None


def check_kafka(
    bootstrap_servers: str,
    client_kwargs: dict[str, Any],
    timeout_s: float = CONNECT_TIMEOUT_S,
    topics: tuple[str, ...] = (),
) -> None:
    """A broker of ``bootstrap_servers`` answers a metadata request within ``timeout_s`` and has every one of
    ``topics`` (nothing is created)."""
    from kafka.errors import KafkaError

    from ebrflow.stream.kafka_io import make_admin

    ms = int(timeout_s * 1000)
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # the failure becomes our one line, not kafka-python's log lines
    try:
        try:
            admin = make_admin(bootstrap_servers, client_kwargs, bootstrap_timeout_ms=ms, request_timeout_ms=ms)
        except KafkaError as exc:
            raise Unavailable(
                f"Kafka at {bootstrap_servers} (kafka.bootstrap_servers) did not answer within {timeout_s:g} s: "
                f"{type(exc).__name__}"
            ) from None
        try:
            existing = set(admin.list_topics())
        except KafkaError as exc:
            raise Unavailable(
                f"Kafka at {bootstrap_servers} refused a metadata request: {type(exc).__name__}"
            ) from None
        finally:
            admin.close()
    finally:
        kafka_log.setLevel(level)
    missing = [t for t in topics if t not in existing]
    if missing:
        raise Unavailable(
            f"Kafka at {bootstrap_servers} has no topic {', '.join(missing)} and kafka.create_topics is false: "
            "create it, or set kafka.create_topics = true"
        )


def check_milvus(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A Milvus server URI (``http(s)://host:port``) accepts a TCP connection within ``timeout_s``.

    A Milvus Lite path is a local file, checked when it is opened.
    """
    if "://" not in uri:
        return
    parts = urlsplit(uri)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 19530)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise Unavailable(f"Milvus at {host}:{port} (milvus.uri) is unreachable: {reason}") from None
