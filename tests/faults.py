"""Fault injection and polling helpers shared by the outage and reliability tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ebrflow.stream.kafka_io import make_producer
from ebrflow.stream.schema import Event, EventCodec

if TYPE_CHECKING:
    from ebrflow.config import Settings


class Intercepted:
    """A proxy whose ``upsert`` calls ``before()`` first; everything else goes to ``target`` unchanged."""

    def __init__(self, target: object, before: Callable[[], None]) -> None:
        self._target = target
        self._before = before

    def upsert(self, *args: object, **kwargs: object) -> object:
        self._before()
        return self._target.upsert(*args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._target, name)


class FlakyMilvus(Intercepted):
    """Forwards to a real MilvusClient, but upserts (row- or column-oriented) raise while ``failing`` is set."""

    def __init__(self, client: object) -> None:
        super().__init__(client, self._check)
        self.failing = threading.Event()
        self.failures = 0

    def _check(self) -> None:
        if self.failing.is_set():
            self.failures += 1
            raise ConnectionError("injected: Milvus unavailable")

    def _get_connection(self) -> Intercepted:
        """The client's connection, with the same injected failures (``MilvusStore`` writes columns through it)."""
        return Intercepted(self._target._get_connection(), self._check)  # type: ignore[attr-defined]


def produce_interleaved(
    bootstrap: str, topic: str, bad: list[bytes], per_bad: int, event: Callable[[int, int], Event]
) -> int:
    """Produce ``per_bad`` valid events (``event(i, j)``) before each bad record; returns how many valid ones."""
    codec = EventCodec()
    producer = make_producer(bootstrap, max_request_size=4 << 20)
    for i, payload in enumerate(bad):
        for j in range(per_bad):
            producer.send(topic, key=b"k", value=codec.encode(event(i, j)))
        producer.send(topic, key=b"k", value=payload)
    producer.flush()
    producer.close()
    return len(bad) * per_bad


def wait_for(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a helper server, killing it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """``milvus-lite server`` on a free loopback port, so several processes share one Milvus; yields its URI."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("milvus-lite")
    proc = subprocess.Popen(
        [str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # dedicated: closed on close(). A shared connection (pymilvus' default) stays open in this process
                # after close(), idle; the server drops it ("too many pings") and a later client of the URI fails to
                # recover it on a loaded machine. A probe returns as soon as the server answers.
                MilvusClient(uri=uri, timeout=30, dedicated=True).close()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield uri
    finally:
        _stop(proc)


@contextlib.contextmanager
def s3_server(bucket: str = "tansu", timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port with ``bucket`` made; yields the environment for a Tansu broker
    with ``s3://<bucket>/`` storage (durable: logs and group offsets survive a broker restart).

    Skips the test when ``moto_server`` (the ``moto[server]`` test extra) is neither beside this interpreter nor
    on PATH.
    """
    exe = Path(sys.executable).with_name("moto_server")
    found = str(exe) if exe.exists() else shutil.which("moto_server")
    if found is None:
        pytest.skip("moto_server not installed (pip install -e '.[test]' brings moto[server])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [found, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:  # moto checks no signature: a plain PUT makes the bucket
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT": endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    finally:
        _stop(proc)


def send_events(settings: Settings, first: int, n: int) -> None:
    """Produce events ``first`` … ``first + n - 1`` (300 users, 97 items), keyed by user."""
    producer = make_producer(settings.kafka.bootstrap_servers)
    codec = EventCodec()
    for k in range(first, first + n):
        producer.send(
            settings.kafka.topic,
            key=str(k % 300).encode(),
            value=codec.encode(Event(user_id=k % 300, item_id=k % 97, ts=k)),
        )
    producer.flush()
    producer.close()


def trained_count(trainer) -> int:  # noqa: ANN001
    """Events the trainer counted as trained (acknowledged by Milvus)."""
    return int(trainer.metrics.events_trained._value.get())
