"""Kafka in production: replication factor, pre-created topics, the DLQ name, client settings pass-through, and
``--idle-exit`` not counting the group join as idle time — against the real Tansu broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaConsumer

from ebrflow.app import build_trainer
from ebrflow.config import ConfigError, Settings, load_settings
from ebrflow.render import MASK, masked
from ebrflow.stream.broker import EmbeddedBroker
from ebrflow.stream.kafka_auth import StaticToken
from ebrflow.stream.kafka_io import ensure_topics, make_admin, make_consumer, make_producer
from ebrflow.stream.schema import Event, EventCodec
from tests.test_cli_errors import ebrflow, one_error


def produce_events(settings: Settings, n: int, bad: tuple[bytes, ...] = ()) -> None:
    """``n`` valid events, then ``bad`` raw records, all flushed to the events topic."""
    producer, codec = make_producer(settings.kafka.bootstrap_servers), EventCodec()
    for i in range(n):
        ev = Event(user_id=i % 41, item_id=(i * 7) % 29, ts=1_700_000_000_000 + i)
        producer.send(settings.kafka.topic, key=str(ev.user_id).encode(), value=codec.encode(ev))
    for payload in bad:
        producer.send(settings.kafka.topic, key=b"bad", value=payload)
    producer.flush()
    producer.close()


def with_kafka(settings: Settings, **kafka: object) -> Settings:
    """``settings`` with ``kafka`` keys replaced (validated)."""
    return settings.model_copy(update={"kafka": type(settings.kafka)(**{**settings.kafka.model_dump(), **kafka})})


def topics(broker: EmbeddedBroker) -> set[str]:
    admin = make_admin(broker.bootstrap_servers)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


# --- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kafka", "fragments"),
    [
        ({"client_config": {"linger_m": 10}}, ["linger_m", "did you mean 'linger_ms'"]),
        ({"client_config": {"group_id": "x"}}, ["group_id", "kafka.group_id"]),
        ({"client_config": {"sasl_plain_password": "hunter2"}}, ["sasl_plain_password", "kafka.sasl_password"]),
        ({"client_config": {"enable_auto_commit": True}}, ["enable_auto_commit", "owned by ebrflow"]),
        ({"client_config": {"allow_auto_create_topics": False}}, ["kafka.create_topics"]),
        ({"replication_factor": 0}, ["kafka.replication_factor"]),
        ({"sasl_mechanism": "OAUTHBEARER"}, ["sasl_oauth_token"]),
        ({"dlq_topic": "ebrflow.events"}, ["dlq_topic must differ"]),
    ],
)
def test_invalid_kafka_settings_are_one_line_errors(kafka: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka=kafka)
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_client_config_key_through_the_cli_is_78(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kafka.client_config]\nrequest_timeout = 5000\n")
    one_error(ebrflow("config", "validate", "-c", str(cfg)), 78, "request_timeout", "did you mean 'request_timeout_ms'")


def test_secrets_are_masked_in_config_show() -> None:
    s = load_settings(
        kafka={"sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token": "tok3n", "ssl_password": "k3y",
               "client_config": {"proxy_url": "http://u:pr0xy@p:3128", "metadata_max_age_ms": 1000}},
    )  # fmt: skip
    shown = masked(s)["kafka"]
    assert shown["sasl_oauth_token"] == MASK and shown["ssl_password"] == MASK
    assert shown["client_config"] == {"proxy_url": MASK, "metadata_max_age_ms": 1000}
    assert "tok3n" not in repr(s) and "k3y" not in repr(s)


def test_client_config_from_the_environment_takes_kafka_pythons_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBRFLOW_KAFKA__CLIENT_CONFIG__LINGER_MS", "20")
    monkeypatch.setenv("EBRFLOW_KAFKA__CLIENT_CONFIG__CHECK_CRCS", "false")
    assert load_settings().kafka.client_config == {"linger_ms": 20, "check_crcs": False}
    monkeypatch.setenv("EBRFLOW_KAFKA__CLIENT_CONFIG__LINGER_MS", "soon")
    with pytest.raises(ConfigError, match="linger_ms: expected int"):
        load_settings()


def test_config_validate_checks_the_oauth_provider(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\nsasl_mechanism = "OAUTHBEARER"\nsasl_oauth_token_provider = "json:dumps"\n')
    one_error(ebrflow("config", "validate", "-c", str(cfg)), 78, "kafka.sasl_oauth_token_provider", "json:dumps")


def test_oauthbearer_providers() -> None:
    static = load_settings(kafka={"sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token": "t0k"}).kafka.client_kwargs()
    assert isinstance(static["sasl_oauth_token_provider"], StaticToken)
    assert static["sasl_oauth_token_provider"].token() == "t0k"
    bad = load_settings(kafka={"sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_provider": "no.such:thing"})
    with pytest.raises(ConfigError, match="cannot import 'no.such:thing'"):
        bad.kafka.client_kwargs()


def test_gssapi_and_mtls_keys_map_to_kafka_python() -> None:
    kw = load_settings(
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_kerberos_service_name": "kfk",
               "ssl_certfile": "c.pem", "ssl_keyfile": "k.pem", "ssl_password": "pw", "ssl_check_hostname": False},
    ).kafka.client_kwargs()  # fmt: skip
    assert kw["sasl_kerberos_service_name"] == "kfk" and kw["ssl_password"] == "pw"
    assert (kw["ssl_certfile"], kw["ssl_keyfile"], kw["ssl_check_hostname"]) == ("c.pem", "k.pem", False)
    assert "sasl_plain_username" not in kw


# --- the settings reach real clients --------------------------------------------------------------------------


def test_client_settings_reach_each_client_that_knows_them(settings: Settings) -> None:
    k = with_kafka(
        settings,
        client_id="ebrflow-test",
        create_topics=False,
        client_config={"linger_ms": 50, "fetch_min_bytes": 2, "metadata_max_age_ms": 60_000},
    ).kafka
    kw = k.client_kwargs()
    consumer = make_consumer(k.bootstrap_servers, k.group_id, client_kwargs=kw)
    producer = make_producer(k.bootstrap_servers, kw)
    admin = make_admin(k.bootstrap_servers, kw)
    try:
        for client in (consumer, producer, admin):
            assert client.config["client_id"] == "ebrflow-test"
            assert client.config["metadata_max_age_ms"] == 60_000
        assert consumer.config["fetch_min_bytes"] == 2 and consumer.config["allow_auto_create_topics"] is False
        assert consumer.config["enable_auto_commit"] is False and consumer.config["group_id"] == k.group_id
        assert producer.config["linger_ms"] == 50 and producer.config["acks"] in ("all", -1)
        assert producer.config["allow_auto_create_topics"] is False
        assert "linger_ms" not in admin.config and "fetch_min_bytes" not in admin.config
        assert admin.list_topics() is not None  # the admin client works with the filtered settings
    finally:
        consumer.close()
        producer.close()
        admin.close()


# --- topics on the real broker --------------------------------------------------------------------------------


def test_replication_factor_default_is_the_brokers(broker: EmbeddedBroker, settings: Settings) -> None:
    """None sends -1 (KIP-464): Tansu applies its default, 1, and reports it; a set factor is sent as is (Tansu
    echoes 3 on its single broker; a real cluster refuses a factor above its broker count)."""
    name = settings.kafka.topic
    assert ensure_topics(broker.bootstrap_servers, {name + ".a": 2}) == {name + ".a": 1}
    assert ensure_topics(broker.bootstrap_servers, {name + ".b": 2}, replication_factor=3) == {name + ".b": 3}
    assert ensure_topics(broker.bootstrap_servers, {name + ".a": 2}) == {}  # exists: nothing created


def test_trainer_creates_the_configured_dlq_and_writes_letters_there(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    s = with_kafka(settings, dlq_topic=f"dead.{settings.kafka.group_id}")
    bad = (b"{oops", b'{"user_id":"x","item_id":1,"ts":1}')
    produce_events(s, 40, bad)
    trainer = build_trainer(s, s.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=40 + len(bad), idle_exit_s=30)
    finally:
        trainer.close()
    assert (summary.trained, summary.invalid) == (40, len(bad))
    existing = topics(broker)
    assert s.kafka.dlq_topic in existing and s.kafka.topic + ".dlq" not in existing
    consumer = KafkaConsumer(
        s.kafka.dlq_topic, bootstrap_servers=s.kafka.bootstrap_servers, auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )  # fmt: skip
    letters = list(consumer)
    consumer.close()
    assert sorted(r.value for r in letters) == sorted(bad)


def test_pre_created_topics_without_create_topics(broker: EmbeddedBroker, settings: Settings) -> None:
    s = with_kafka(settings, create_topics=False, dlq_topic=f"pre.{settings.kafka.group_id}.dead")
    ensure_topics(broker.bootstrap_servers, {s.kafka.topic: 2, s.kafka.dlq_topic: 1})
    produce_events(s, 30, (b"{oops",))
    trainer = build_trainer(s, s.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=31, idle_exit_s=30)
    finally:
        trainer.close()
    assert (summary.trained, summary.invalid) == (30, 1)


def test_missing_topic_without_create_topics_is_69_and_creates_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic = f"absent.{tmp_path.name}"
    env = {
        "EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "EBRFLOW_KAFKA__TOPIC": topic,
        "EBRFLOW_KAFKA__CREATE_TOPICS": "false",
        "EBRFLOW_METRICS__PORT": "0",
        "EBRFLOW_RUN__DATA_DIR": str(tmp_path / "data"),
        "EBRFLOW_MILVUS__URI": str(tmp_path / "data" / "m.db"),
        "EBRFLOW_MODEL__DEVICE": "cpu",
    }
    one_error(ebrflow("run", "--idle-exit", "1", env=env), 69, topic, f"{topic}.dlq", "kafka.create_topics")
    assert not (tmp_path / "data").exists()
    assert topic not in topics(broker)


# --- run --idle-exit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [60.0, 0.0])
def test_idle_exit_does_not_count_the_group_join(settings: Settings, grace: float) -> None:
    """Events already wait; the group join (~5 s on Tansu at a 10 s session timeout) is longer than the idle bound,
    yet every waiting event is trained before the run exits."""
    s = with_kafka(settings, session_timeout_ms=10_000)
    s = s.model_copy(update={"run": s.run.model_copy(update={"exclusive_grace_s": grace})})
    produce_events(s, 300)
    trainer = build_trainer(s, s.kafka.bootstrap_servers)
    try:
        summary = trainer.run(idle_exit_s=1.0)
    finally:
        trainer.close()
    assert summary.trained == 300


def test_run_idle_exit_trains_waiting_events_through_the_cli(broker: EmbeddedBroker, settings: Settings) -> None:
    """``ebrflow run --idle-exit 2`` with events waiting and a ~5 s group join (no exclusivity wait either)."""
    produce_events(settings, 200)
    data = Path(settings.run.data_dir)
    env = {
        "EBRFLOW_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "EBRFLOW_KAFKA__TOPIC": settings.kafka.topic,
        "EBRFLOW_KAFKA__GROUP_ID": settings.kafka.group_id,
        "EBRFLOW_KAFKA__SESSION_TIMEOUT_MS": "10000",
        "EBRFLOW_RUN__EXCLUSIVE_GRACE_S": "0",
        "EBRFLOW_METRICS__PORT": "0",
        "EBRFLOW_RUN__DATA_DIR": str(data),
        "EBRFLOW_MILVUS__URI": str(data / "m.db"),
        "EBRFLOW_MODEL__DEVICE": "cpu",
        "EBRFLOW_MODEL__DIM": "16",
    }
    out = ebrflow("run", "--idle-exit", "2", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "consumed 200 (0 invalid)" in out.stderr, out.stderr[-2000:]
