"""Settings: one TOML file plus ``EBRFLOW_<SECTION>__<KEY>`` environment overrides (env wins)."""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pydantic-settings brings tomli on 3.10
    import tomli as tomllib

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_PREFIX = "EBRFLOW_"
CONFIG_ENV = "EBRFLOW_CONFIG"  # the default config file path (the CLI's --config); not a setting


# Kafka's rule for topic names (kafka.common.internals.Topic): 1-249 of these characters, and not "." or ".."
KAFKA_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# Milvus' rule for collection names: letters, digits and underscores, starting with a letter or an underscore, at
# most 255 characters. The prefix is capped lower so the longest derived name, <prefix>_v_<variant>_users_g<N>,
# still fits: 200 + "_v_" + a variant name of at most 32 + "_users_g" + a generation of up to 12 digits = 255.
MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_PREFIX, MAX_VARIANT = 200, 32
MAX_DIM = 32768  # Milvus' largest FLOAT_VECTOR dimension (proxy.maxDimension's default)


class Section(BaseModel):
    """A config section: unknown keys are errors, so a typo never silently falls back to a default; floats must be
    finite (an infinite interval or learning rate is a typo that would only fail later, or never)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_topic_name(name: str) -> str:
    """``name`` if Kafka accepts it as a topic name, else ``ValueError`` saying the rule (never the name: values
    are not echoed).

    >>> check_topic_name("ebrflow.events")
    'ebrflow.events'
    >>> check_topic_name("a b/c")
    Traceback (most recent call last):
    ...
    ValueError: not a legal Kafka topic name: 1-249 characters of a-z, A-Z, 0-9, '.', '_', '-', and not '.' or '..'
    """
    if not KAFKA_TOPIC.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            "not a legal Kafka topic name: 1-249 characters of a-z, A-Z, 0-9, '.', '_', '-', and not '.' or '..'"
        )
    return name


class KafkaConfig(Section):
    """Where events come from. Empty ``bootstrap_servers`` starts the embedded Tansu broker.

    ``client_config`` passes any other kafka-python setting to each client (consumer, producers, admin) that knows
    it; keys ebrflow sets itself are refused with the key to use instead (see ``CLIENT_KEYS_OWNED``).
    """

    bootstrap_servers: str = ""
    topic: str = "ebrflow.events"
    dlq_topic: str = ""  # empty: <topic>.dlq
    group_id: str = "ebrflow-trainer"
    client_id: str = ""  # empty: kafka-python's default (kafka-python-<version>)
    partitions: int = Field(4, ge=1)
    replication_factor: int | None = Field(None, ge=1)  # None: the broker's default.replication.factor (KIP-464)
    create_topics: bool = True  # false: topics must exist (checked before the trainer starts); none is auto-created
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] = ""
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    sasl_oauth_token: SecretStr = SecretStr("")  # OAUTHBEARER: a static token, or ...
    sasl_oauth_token_provider: str = ""  # ... "module:attr", a kafka-python AbstractTokenProvider (or a factory)
    sasl_kerberos_service_name: str = "kafka"  # GSSAPI (needs the gssapi package)
    sasl_kerberos_domain_name: str = ""  # GSSAPI: empty uses the broker's host name
    ssl_cafile: str = ""
    ssl_certfile: str = ""  # mTLS client certificate (PEM)
    ssl_keyfile: str = ""  # mTLS client key (PEM)
    ssl_password: SecretStr = SecretStr("")  # password of ssl_keyfile
    ssl_check_hostname: bool = True
    session_timeout_ms: int = Field(10_000, ge=1000)
    max_event_bytes: int = Field(64 * 1024, ge=64)
    client_config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("topic")
    @classmethod
    def _legal_topic(cls, value: str) -> str:
        """The events topic must be a name Kafka accepts (checked before any topic is created)."""
        return check_topic_name(value)

    @field_validator("dlq_topic")
    @classmethod
    def _legal_dlq_topic(cls, value: str) -> str:
        """An explicit dead-letter topic must be a name Kafka accepts (empty: ``<topic>.dlq``)."""
        return check_topic_name(value) if value else value

    @field_validator("client_config")
    @classmethod
    def _known_client_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Every key is a setting of a kafka-python client, and not one ebrflow sets itself; a string given for a
        number or boolean (an ``EBRFLOW_KAFKA__CLIENT_CONFIG__<KEY>`` variable) becomes one."""
        defaults = kafka_client_defaults()
        for key in value:
            if key in CLIENT_KEYS_OWNED:
                raise ValueError(f"{key}: {CLIENT_KEYS_OWNED[key]}")
            if key not in defaults:
                hint = did_you_mean(key, defaults)
                raise ValueError(f"{key} is not a setting of kafka-python's consumer, producer or admin client{hint}")
        return {key: _like(key, v, defaults[key]) for key, v in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> KafkaConfig:
        """OAUTHBEARER needs exactly one token source; the DLQ is not the events topic."""
        if self.sasl_mechanism == "OAUTHBEARER" and (
            bool(self.sasl_oauth_token.get_secret_value()) == bool(self.sasl_oauth_token_provider)
        ):
            raise ValueError("sasl_mechanism OAUTHBEARER needs one of sasl_oauth_token or sasl_oauth_token_provider")
        if self.dead_letter_topic() == self.topic:
            raise ValueError("dlq_topic must differ from topic")
        if not self.dlq_topic and len(self.dead_letter_topic()) > 249:
            raise ValueError("topic: at most 245 characters without kafka.dlq_topic (<topic>.dlq must fit in 249)")
        return self

    def dead_letter_topic(self) -> str:
        """Where rejected records go: ``dlq_topic``, or ``<topic>.dlq``."""
        return self.dlq_topic or f"{self.topic}.dlq"

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python arguments for every client: security and client id (those that are set), whether topics may
        be auto-created, then ``client_config``; each client takes the keys it knows (``stream.kafka_io``)."""
        kw: dict[str, Any] = {
            "security_protocol": self.security_protocol,
            "allow_auto_create_topics": self.create_topics,
        }
        if self.client_id:
            kw["client_id"] = self.client_id
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            kw.update(sasl_plain_username=self.sasl_username, sasl_plain_password=self.sasl_password.get_secret_value())
        elif self.sasl_mechanism == "OAUTHBEARER":
            from ebrflow.stream.kafka_auth import token_provider

            try:
                kw["sasl_oauth_token_provider"] = token_provider(
                    self.sasl_oauth_token.get_secret_value(), self.sasl_oauth_token_provider
                )
            except ValueError as exc:
                raise ConfigError(f"kafka.sasl_oauth_token_provider: {exc}") from None
        elif self.sasl_mechanism == "GSSAPI":
            kw["sasl_kerberos_service_name"] = self.sasl_kerberos_service_name
            if self.sasl_kerberos_domain_name:
                kw["sasl_kerberos_domain_name"] = self.sasl_kerberos_domain_name
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                kw[key] = getattr(self, key)
        if self.ssl_password.get_secret_value():
            kw["ssl_password"] = self.ssl_password.get_secret_value()
        if not self.ssl_check_hostname:
            kw["ssl_check_hostname"] = False
        return {**kw, **self.client_config}


# kafka-python settings ebrflow sets itself: client_config refuses them, naming what to use instead
CLIENT_KEYS_OWNED = {
    **{key: f"set kafka.{key} instead" for key in (
        "bootstrap_servers", "group_id", "client_id", "session_timeout_ms", "security_protocol", "sasl_mechanism",
        "sasl_oauth_token_provider", "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "ssl_cafile",
        "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname")},
    "sasl_plain_username": "set kafka.sasl_username instead",
    "sasl_plain_password": "set kafka.sasl_password instead",
    "heartbeat_interval_ms": "set by ebrflow to a sixth of kafka.session_timeout_ms",
    "max_partition_fetch_bytes": "set by ebrflow from kafka.max_event_bytes",
    "allow_auto_create_topics": "set kafka.create_topics instead",
    "enable_auto_commit": "owned by ebrflow: it commits offsets itself once Milvus has acknowledged a batch",
    "auto_offset_reset": "owned by ebrflow: partitions start from its checkpoint, else from the earliest offset",
    "acks": "owned by ebrflow: dead letters are acknowledged by all in-sync replicas before offsets are committed",
    "transactional_id": "not supported: ebrflow's producers are not transactional",
    **{key: "owned by ebrflow: it reads and writes raw bytes" for key in (
        "key_deserializer", "value_deserializer", "key_serializer", "value_serializer")},
}  # fmt: skip


@functools.cache
def kafka_client_defaults() -> dict[str, Any]:
    """Every setting kafka-python's consumer, producer or admin client accepts, with a default (``DEFAULT_CONFIG``)."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    return {**KafkaAdminClient.DEFAULT_CONFIG, **KafkaProducer.DEFAULT_CONFIG, **KafkaConsumer.DEFAULT_CONFIG}


def _like(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of a bool, int or float ``default`` when it is a string (environment variables are).

    >>> _like("linger_ms", "20", 5), _like("check_crcs", "false", True), _like("client_rack", "r1", None)
    (20, False, 'r1')
    """
    if not isinstance(value, str) or not isinstance(default, (bool, int, float)):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{key}: expected {type(default).__name__}") from None


class BatchConfig(Section):
    """Micro-batches close at ``max_events`` or after ``max_wait_ms``, whichever comes first; with ``on_demand``
    (the default) instead when the loop asks for one or at ``max_events``: a batch holds what arrived while the
    previous one trained, so its size follows the trainer's pace (``max_wait_ms`` then paces ranks only)."""

    max_events: int = Field(1024, ge=1)
    max_wait_ms: int = Field(100, ge=1)
    on_demand: bool = True


class ModelConfig(Section):
    """Which model and its main knobs (``two_tower``: id embeddings; ``ssmtl``: graph encoder + SSL tasks)."""

    kind: Literal["two_tower", "ssmtl"] = "ssmtl"
    # the graph kind (ssmtl only): "bipartite" user→item, or "user_user" when both ends of an event are users
    # (messaging, friend recommendation); user_user stores each edge in both directions
    graph: Literal["bipartite", "user_user"] = "bipartite"
    dim: int = Field(64, ge=2)  # at most MAX_DIM, Milvus' limit
    lr: float | None = Field(None, gt=0)  # None: the model's own default (two_tower 0.05, ssmtl 0.001)
    temperature: float | None = Field(None, gt=0)  # None: the model's own (two_tower 0.1, ssmtl retrieval 0.12)
    steps_per_batch: int = Field(1, ge=0)  # 0: no gradient steps (training-free parts only)
    device: str = "auto"
    threads: int = Field(1, ge=1)  # torch intra-op threads; >1 oversubscribes small per-batch steps (see bench)
    seed: int = 0
    popularity_half_life: float = Field(1000.0, ge=0)  # events; 0 turns the served recent-popularity prior off
    popularity_scale: float | None = Field(None, ge=0)  # weight of log recent popularity (None: 0.1)
    popularity_lifetime: float = Field(0.0, ge=0, le=1)  # share of lifetime popularity mixed into the recent share
    options: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments for the model class
    # shadow A/B: name → overrides of the keys above (e.g. {kind = "two_tower"}); each variant trains on the same
    # stream in this trainer and is served from its own collections <prefix>_v_<name>_items/_users
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("dim")
    @classmethod
    def _milvus_dim(cls, value: int) -> int:
        """The embedding dimension is the Milvus vector dimension: at most Milvus' limit."""
        if value > MAX_DIM:
            raise ValueError(f"at most {MAX_DIM}, Milvus' largest vector dimension")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Variant names become part of Milvus collection names: letters, digits, underscores, at most 32."""
        for name in value:
            if not re.fullmatch(rf"[A-Za-z0-9_]{{1,{MAX_VARIANT}}}", name):
                raise ValueError(
                    f"variant names are 1-{MAX_VARIANT} letters, digits or underscores (they name Milvus collections)"
                )
        return value

    def variant(self, name: str) -> ModelConfig:
        """The full configuration of variant ``name``: this one with the variant's overrides."""
        return ModelConfig(**{**self.model_dump(exclude={"variants"}), **self.variants[name]})


class MilvusConfig(Section):
    """Where embeddings go: a Milvus Lite path, or ``http(s)://host:19530`` with an optional token."""

    uri: str = "ebrflow_data/milvus.db"
    token: SecretStr = SecretStr("")
    collection_prefix: str = "ebrflow"
    index_type: Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"] = "FLAT"
    seen_capacity: int = Field(1024, ge=1, le=4096)
    flush_interval_s: float = Field(30.0, gt=0)
    generation_grace_s: float = Field(600.0, ge=0)  # superseded generations' collections are dropped after this

    @field_validator("collection_prefix")
    @classmethod
    def _milvus_prefix(cls, value: str) -> str:
        """Collections are ``<prefix>_items_g<N>`` etc.: the prefix must make names Milvus accepts."""
        if not MILVUS_NAME.fullmatch(value) or len(value) > MAX_PREFIX:
            raise ValueError(
                f"Milvus collection names are letters, digits and underscores starting with a letter or underscore; "
                f"the prefix must be 1-{MAX_PREFIX} of them (the longest collection name stays within Milvus' 255)"
            )
        return value


class MetricsConfig(Section):
    """The Prometheus endpoint (loopback by default) and the prequential evaluation."""

    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    enabled: bool = True
    recall_k: int = Field(20, ge=1)
    cold_start_max_events: int = Field(5, ge=0)
    eval_sample: int = Field(256, ge=1)


class RunConfig(Section):
    """Run-level files and schedules."""

    data_dir: str = "ebrflow_data"
    checkpoint_every_batches: int = Field(1000, ge=1)
    checkpoint_every_s: float = Field(60.0, gt=0)
    checkpoint_keep: int = Field(3, ge=1)
    checkpoints: bool = True
    max_staleness_s: float = Field(300.0, gt=0)  # rolling refresh: no served embedding older than this
    exclusive_grace_s: float = Field(60.0, ge=0)  # refuse to train without the whole topic after this; 0: off
    audit_log: bool = False  # append "topic partition first last" per trained batch to <data_dir>/processed.log
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line (ts, level, logger, message, fields)
    status_interval_s: float = Field(30.0, ge=0)  # a status line from the loop this often; 0: none
    expire_after_s: float = Field(0.0, ge=0)  # forget ids unseen this long in event time (docs/loop.md); 0: never

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """A level name ``logging`` knows (any case); stored upper-case."""
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()


class GuardConfig(Section):
    """The recall guard (``stream.guard``): hold Milvus writes, or roll the model back, while prequential
    Recall@K stays below ``1 - margin`` of its recent baseline."""

    enabled: bool = False
    mode: Literal["hold", "rollback"] = "hold"
    margin: float = Field(0.5, gt=0, lt=1)  # relative drop below the baseline that counts as bad
    window: int = Field(10, ge=1)  # batches in the rolling recall
    baseline: int = Field(100, ge=2)  # healthy batches in the baseline
    patience: int = Field(3, ge=1)  # bad (or, while holding, recovered) batches in a row before acting
    min_events: int = Field(50, ge=1)  # evaluated events the rolling window needs before it counts
    snapshot_every: int = Field(20, ge=1)  # rollback mode: batches between snapshots of a healthy model
    loss_factor: float = Field(10.0, gt=1)  # a loss above this × the healthy median (or non-finite) is bad too


class DemoConfig(Section):
    """The built-in synthetic stream used by ``ebrflow demo``."""

    events: int = Field(60_000, ge=1)
    users: int = Field(3000, ge=1)
    items: int = Field(1500, ge=1)
    communities: int = Field(12, ge=1)
    seed: int = 7


class Settings(BaseSettings):
    """All of ebrflow's settings; docs/configuration.md describes every key."""

    model_config = SettingsConfigDict(env_prefix="EBRFLOW_", env_nested_delimiter="__", extra="forbid")
    toml_path: ClassVar[Path | None] = None

    kafka: KafkaConfig = KafkaConfig()
    batch: BatchConfig = BatchConfig()
    model: ModelConfig = ModelConfig()
    milvus: MilvusConfig = MilvusConfig()
    metrics: MetricsConfig = MetricsConfig()
    run: RunConfig = RunConfig()
    guard: GuardConfig = GuardConfig()
    demo: DemoConfig = DemoConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)


class ConfigError(ValueError):
    """Invalid settings; the message names each bad key and why, never the value given (it may be a secret)."""

    exit_code = 78  # EX_CONFIG


def describe_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> str:
    """One line per problem, ``section.key: message``, without input values; an unknown section or key names the
    closest known one (of ``root``, the model that was validated: ``Settings`` unless given).

    >>> try:
    ...     Settings(kafka={"sasl_pasword": "hunter2"})
    ... except ValidationError as e:
    ...     print(describe_errors(e))
    kafka.sasl_pasword: unknown key (did you mean 'sasl_password'?)
    """
    lines = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(part) for part in err["loc"]) or "settings"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = _unknown(err["loc"], root or Settings)
        lines.append(f"{loc}: {message}")
    return "\n".join(lines)


def _unknown(loc: tuple, root: type[BaseModel]) -> str:
    """Says "unknown section" or "unknown key", with the closest name ``root`` knows at that place, if any."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "unknown key"
        model = annotation
    what = "unknown section" if len(loc) == 1 and issubclass(root, BaseSettings) else "unknown key"
    return what + did_you_mean(str(loc[-1]), model.model_fields)


def did_you_mean(name: str, known: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to ``name``, or an empty string.

    >>> did_you_mean("modle", ["model", "kafka"]), did_you_mean("zzz", ["model"])
    (" (did you mean 'model'?)", '')
    """
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from ``path`` (if given) with environment overrides, then explicit ``overrides`` on top.

    Raises ``ConfigError`` (values never echoed) for a missing file or invalid settings.
    """
    toml_path = Path(path) if path else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {toml_path} not found")
    check_environment(os.environ)
    cls = type("FileSettings", (Settings,), {"toml_path": toml_path})
    try:
        return cls(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(_with_source(line, os.environ) for line in describe_errors(exc).splitlines())
        where = f" in {toml_path} or the environment" if toml_path else ""
        raise ConfigError(f"invalid settings{where}: {problems}") from None


def check_environment(environ: Mapping[str, str]) -> None:
    """Every ``EBRFLOW_*`` variable must name a section (``EBRFLOW_<SECTION>__<KEY>`` or ``EBRFLOW_<SECTION>``).

    pydantic-settings ignores variables of unknown sections, so ``EBRFLOW_MODLE__DIM=3`` would silently fall
    back to the default; here it is a ``ConfigError`` naming the variable (never its value).
    """
    sections = set(Settings.model_fields)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in sections:
            raise ConfigError(
                f"environment variable {name}: unknown section {section!r}{did_you_mean(section, sections)} "
                f"(EBRFLOW_<SECTION>__<KEY> with SECTION one of {', '.join(sorted(sections))})"
            )


def _with_source(problem: str, environ: Mapping[str, str]) -> str:
    """``section.key: message``, plus the environment variable that set it, if one did."""
    loc = problem.split(":", 1)[0].split(".")
    names = {n.upper(): n for n in environ}
    for depth in range(len(loc), 0, -1):
        var = ENV_PREFIX + "__".join(loc[:depth]).upper()
        if var in names:
            return f"{problem} (from {names[var]})"
    return problem
