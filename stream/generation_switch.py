"""Generations and their switch: which Milvus generation a run writes, when clients are switched to it, and when
superseded generations are dropped (the collections themselves: ``indexer.generations``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ebrflow.indexer.generations import Generations
from ebrflow.stream.checkpointer import Offsets
from ebrflow.stream.policy import Coordinator, Policy, Solo

if TYPE_CHECKING:
    from ebrflow.stream.pipeline import Pipeline

log = logging.getLogger(__name__)


class GenerationSwitch(Policy):
    """Writes the restored run's generation, or a new one when the served model is not this one.

    A new generation (no usable run checkpoint while one is served, a backfill, ``new_generation``) is filled
    while clients keep reading the served one; it is switched in once the trained offsets reached the end
    offsets seen at sync, and generations it superseded are dropped ``grace_s`` later. The very first
    generation is served at once. Ranks: the leader decides and switches (after every rank's rows are written).
    """

    def __init__(
        self,
        generations: Generations,
        new_generation: bool = False,
        grace_s: float = 600.0,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.generations, self.new_generation, self.grace_s = generations, new_generation, grace_s
        self.coordinator = coordinator or Solo()
        self._targets: Offsets | None = None  # end offsets the new generation must reach before it is served
        self._drop_at: float | None = None  # when superseded generations are dropped (leader)

    def on_sync(self, loop: Pipeline) -> None:
        """Pick the generation to write (the leader), and write it (every rank)."""
        decision = self.coordinator.share(
            loop.retrying("publish", lambda: self._decide(loop)) if self.coordinator.leader else None
        )
        served, writing, self._targets = decision
        loop.retrying("publish", lambda: loop.publisher.store.use_generation(writing))
        if loop.checkpoints is not None:
            loop.checkpoints.generation = writing
        loop.observer.on_generation(served, writing)

    def _decide(self, loop: Pipeline) -> tuple[int | None, int, Offsets | None]:
        """(served generation, generation to write, end offsets to reach before switching or None)."""
        gens, restored = self.generations, loop.restored
        served, existing, legacy = gens.served(), gens.existing(), gens.legacy()
        continuing = restored is not None and restored.source == "run" and restored.generation is not None
        if continuing and not self.new_generation:
            writing = restored.generation
        elif loop.checkpoints is None and served is not None and not self.new_generation:
            writing = served  # no state of its own to protect clients from: keep writing what is served
        elif served is None and not existing and not legacy:
            writing = 1
        else:
            writing = max([*existing, served or 0]) + 1
        loop.publisher.store.use_generation(writing)
        if served is None and not legacy:
            gens.switch(writing)
            served = writing
        targets = None
        if served != writing:
            if served is not None:
                gens.load(served)  # clients keep reading it meanwhile
            targets = loop.source.end_offsets()
            log.info("writing generation %d; generation %s is served until this trainer catches up", writing, served)
        if any(g < writing and g != served for g in existing):
            self._drop_at = time.monotonic() + self.grace_s
        return served, writing, targets

    def on_tick(self, loop: Pipeline, now: float) -> None:
        """Serve the generation being written once it caught up; drop superseded generations after the grace."""
        self._maybe_switch(loop, now)

    def on_finish(self, loop: Pipeline) -> None:
        """A run that caught up switches before it exits."""
        self._maybe_switch(loop, time.monotonic())

    def _maybe_switch(self, loop: Pipeline, now: float) -> None:
        gens, store = self.generations, loop.publisher.store
        if self._targets is not None and all(loop.offsets.get(k, 0) >= end for k, end in self._targets.items()):
            loop.drain()
            self.coordinator.barrier()  # every rank's rows are written
            if self.coordinator.leader:
                loop.retrying("publish", lambda: store.flush_if_due(force=True))
                loop.retrying("publish", lambda: gens.switch(store.generation))
                self._drop_at = now + self.grace_s
            self._targets = None
            loop.observer.on_generation(store.generation, store.generation)
        if self._drop_at is not None and now >= self._drop_at and self.coordinator.leader:
            loop.retrying("publish", lambda: gens.drop_older(store.generation))
            self._drop_at = None
