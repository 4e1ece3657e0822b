import logging

import pytest

from ebrflow.config import load_settings


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
    s = load_settings(kafka={"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "hunter2"},
                      milvus={"token": "root:s3cret"})
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s %r", s, s.model_dump())
    text = repr(s) + str(s) + caplog.text
    assert "hunter2" not in text and "s3cret" not in text
    assert s.kafka.client_kwargs()["sasl_plain_password"] == "hunter2"


def test_metrics_bind_to_loopback_by_default() -> None:
    assert load_settings().metrics.host == "127.0.0.1"
