"""Shared fixtures: one real embedded broker per session, fresh topics/groups/Milvus dirs per test."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ebrflow.config import Settings, load_settings
from ebrflow.stream.broker import EmbeddedBroker

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_counter = itertools.count()

logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
logging.getLogger("kafka").setLevel(logging.ERROR)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """As the app does by default: two threads on two shared cores oversubscribe (≈20× slower when loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Tansu broker on a free loopback port, killed at the end of the session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture()
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings pointing at the session broker with a unique topic and group, Milvus Lite under tmp_path."""
    return make_settings(broker, tmp_path)


def make_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """What the ``settings`` fixture gives, for fixtures of a wider scope (``tmp_path`` from ``tmp_path_factory``)."""
    n = next(_counter)
    return load_settings(
        kafka={
            "bootstrap_servers": broker.bootstrap_servers,
            "topic": f"t{n}.events",
            "group_id": f"g{n}",
            "partitions": 3,
            "session_timeout_ms": 6000,
        },
        batch={"max_events": 256, "max_wait_ms": 300},
        milvus={"uri": str(tmp_path / "milvus.db"), "flush_interval_s": 5},
        metrics={"port": 0, "eval_sample": 64},
        run={"data_dir": str(tmp_path / "data")},
        model={"dim": 16, "device": "cpu"},
    )


def dataset(*parts: str) -> Path:
    """Path of a shared dataset file, skipping the test when the data is not beside the checkout."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"dataset {path} not available")
    return path
