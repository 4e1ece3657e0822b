"""Exclusivity: one trainer per consumer group — train only once this trainer holds the whole topic."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ebrflow.stream.policy import Policy

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline


class SecondTrainer(RuntimeError):
    """Another trainer holds part of the topic: one model per consumer group and collections."""

    exit_code = 75  # EX_TEMPFAIL: retry once the other trainer is gone


class Exclusivity(Policy):
    """Consumption stays paused (no record read, no Milvus row written) until the trainer holds every partition
    of ``topic``; a trainer that does not within ``grace_s`` of joining stops with ``SecondTrainer``."""

    def __init__(self, topic: str, group: str, grace_s: float) -> None:
        self.topic, self.group, self.grace_s = topic, group, grace_s
        self._joined_at = time.monotonic()

    def on_start(self, loop: Pipeline) -> None:
        """Pause before subscribing: nothing is read before the topic is held."""
        loop.source.pause("exclusive")
        self._joined_at = time.monotonic()

    def ready(self, loop: Pipeline, now: float) -> bool:
        """True once every partition is held; refuses after the grace."""
        assigned, total = loop.source.held()
        if total and assigned == total:
            return True
        if now - self._joined_at > self.grace_s:
            loop.observer.on_refused()
            raise SecondTrainer(
                f"this trainer holds {assigned} of {total} partitions of {self.topic} after {self.grace_s:.0f} s: "
                f"another trainer runs in consumer group {self.group!r}; ebrflow trains one model per group (stop "
                "the other, or give this one its own kafka.group_id and Milvus collections)"
            )
        return False

    def on_sync(self, loop: Pipeline) -> None:
        """The topic is held: read it."""
        loop.source.resume("exclusive")
