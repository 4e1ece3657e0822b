"""Fault injection and polling helpers shared by the outage and reliability tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class FlakyMilvus:
    """Forwards to a real MilvusClient, but ``upsert`` raises while ``failing`` is set."""

    def __init__(self, client: object) -> None:
        self._client = client
        self.failing = threading.Event()
        self.failures = 0

    def upsert(self, *args: object, **kwargs: object) -> object:
        if self.failing.is_set():
            self.failures += 1
            raise ConnectionError("injected: Milvus unavailable")
        return self._client.upsert(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)


def wait_for(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()
