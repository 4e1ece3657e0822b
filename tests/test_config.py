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
