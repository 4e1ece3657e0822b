import logging

import pytest

from ebrflow.config import ConfigError, load_settings


def test_environment_overrides_the_file(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ntopic = "from-file"\npartitions = 2\n[model]\ndim = 32\n')
    monkeypatch.setenv("EBRFLOW_KAFKA__TOPIC", "from-env")
    s = load_settings(cfg)
    assert (s.kafka.topic, s.kafka.partitions, s.model.dim) == ("from-env", 2, 32)


def test_unknown_keys_are_rejected(tmp_path) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kafka]\ntopik = 1\n")
    with pytest.raises(ValueError, match="topik"):
        load_settings(cfg)


def test_secrets_never_appear_in_reprs_or_logs(caplog) -> None:  # noqa: ANN001
    s = load_settings(
        kafka={"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "hunter2"},
        milvus={"token": "root:s3cret"},
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s %r", s, s.model_dump())
    text = repr(s) + str(s) + caplog.text
    assert "hunter2" not in text and "s3cret" not in text
    assert s.kafka.client_kwargs()["sasl_plain_password"] == "hunter2"


def test_metrics_bind_to_loopback_by_default() -> None:
    assert load_settings().metrics.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ('[kafka]\nsasl_pasword = "hunter2"\n', {}),  # misspelt key
        ("[kafka]\nsasl_password = 1234567\n", {}),  # not a string
        ('[milvus]\ntoken = ["hunter2"]\n', {}),  # list-valued token
        ("", {"EBRFLOW_KAFKA__SASL_PASWORD": "hunter2"}),  # misspelt in the environment
    ],
)
def test_validation_errors_never_echo_values(tmp_path, monkeypatch, toml: str, env: dict) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    text = str(info.value) + repr(info.value)
    assert "hunter2" not in text and "1234567" not in text
    assert "kafka." in text or "milvus." in text


@pytest.mark.parametrize(
    ("section", "values", "fragment"),
    [
        ("kafka", {"topic": "."}, "kafka.topic: not a legal Kafka topic name"),
        ("kafka", {"topic": "t" * 250}, "kafka.topic: not a legal Kafka topic name"),
        ("kafka", {"topic": "t" * 246}, "<topic>.dlq must fit in 249"),
        ("kafka", {"dlq_topic": "dead/letters"}, "kafka.dlq_topic: not a legal Kafka topic name"),
        ("model", {"lr": float("nan")}, "model.lr: Input should be a finite number"),
        ("model", {"lr": -1.0}, "model.lr: Input should be greater than 0"),
        ("model", {"dim": 32769}, "model.dim: at most 32768, Milvus' largest vector dimension"),
        ("model", {"variants": {"two-tower": {}}}, "model.variants: variant names are 1-32 letters"),
        ("milvus", {"collection_prefix": "1st"}, "milvus.collection_prefix: Milvus collection names"),
        ("milvus", {"collection_prefix": "p" * 201}, "milvus.collection_prefix: Milvus collection names"),
        ("run", {"max_staleness_s": float("inf")}, "run.max_staleness_s: Input should be a finite number"),
        ("guard", {"margin": float("nan")}, "guard.margin: Input should be a finite number"),
    ],
)
def test_names_and_numbers_milvus_or_kafka_would_refuse_are_config_errors(
    section: str, values: dict, fragment: str
) -> None:
    with pytest.raises(ConfigError, match="invalid settings") as info:
        load_settings(**{section: values})
    assert fragment in str(info.value)


def test_legal_names_at_the_limits_load() -> None:
    s = load_settings(
        kafka={"topic": "a-Z_0." + "t" * 239, "dlq_topic": ".." + "d" * 247},
        milvus={"collection_prefix": "_" + "p" * 199},
        model={"dim": 32768, "variants": {"v" * 32: {}}},
    )
    assert len(s.kafka.topic) == 245 and len(s.kafka.dead_letter_topic()) == 249


def test_misspelt_sections_and_keys_get_a_suggestion(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    cfg = tmp_path / "c.toml"
    cfg.write_text("[modle]\ndim = 3\n[kafka]\ntopik = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "modle: unknown section (did you mean 'model'?)" in str(info.value)
    assert "kafka.topik: unknown key (did you mean 'topic'?)" in str(info.value)
    monkeypatch.setenv("EBRFLOW_GAURD__ENABLED", "true")
    with pytest.raises(ConfigError, match=r"unknown section 'gaurd' \(did you mean 'guard'\?\)"):
        load_settings()
