"""One rank's checkpoints: the single trainer's (``Checkpointer``: model, seen items, variants, generation, every
partition's offset) in ``<data_dir>/rank<r>/checkpoints``, stamped with a global step so the ranks restore the same.

The step is the count of batches the job acknowledged (the same on every rank: the loop runs in lockstep), and a
checkpoint is due every ``every_batches`` of them (never by time: the ranks must save at the same step). On start
the ranks agree on the newest step every rank holding checkpoints saved, and restore it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from ebrflow.model.checkpoint import CheckpointStore, decode
from ebrflow.stream.checkpointer import (
    Checkpointer,
    CheckpointMismatch,
    Offsets,
    Restored,
    _unpack_offsets,
    describe_mismatch,
)

log = logging.getLogger(__name__)


class _Stamped:
    """A ``CheckpointStore`` whose saves carry the rank's step, rank and world size."""

    def __init__(self, store: CheckpointStore, owner: RankCheckpoints) -> None:
        self._store, self._owner = store, owner

    def save(self, state: dict) -> Path:
        """Save ``state`` with the stamp."""
        o = self._owner
        return self._store.save({**state, "step": o.step, "rank": o.rank, "world": o.world})

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


class RankCheckpoints:
    """The loop's ``Checkpoints`` for one rank (see the module doc)."""

    def __init__(self, checkpointer: Checkpointer, rank: int, world: int, group: dist.ProcessGroup | None = None):
        self.checkpointer, self.rank, self.world, self.group = checkpointer, rank, world, group
        self.store: CheckpointStore = checkpointer.store  # type: ignore[assignment]
        checkpointer.store = _Stamped(self.store, self)  # type: ignore[assignment]
        self.step = 0
        self._batches = 0

    @property
    def generation(self) -> int | None:
        """The Milvus generation the job writes (saved with every checkpoint)."""
        return self.checkpointer.generation

    @generation.setter
    def generation(self, value: int | None) -> None:
        self.checkpointer.generation = value

    def note_batches(self, n: int) -> None:
        """Count acknowledged batches: the step advances, and towards the schedule."""
        self.step += n
        self._batches += n

    def due(self) -> bool:
        """Every ``every_batches`` acknowledged batches (the same step on every rank)."""
        return self._batches >= self.checkpointer.every_batches

    def save(self, offsets: Offsets) -> None:
        """Write this rank's checkpoint of the current step."""
        self.checkpointer.save(offsets)
        self._batches = 0

    def steps(self) -> dict[int, Path]:
        """Global step → checkpoint file of every checkpoint of this rank that verifies under this configuration."""
        found: dict[int, Path] = {}
        fingerprint = self.checkpointer.fingerprint
        for path, state in self.store.verified():
            if state.get("fingerprint") != fingerprint:
                raise CheckpointMismatch(
                    f"checkpoint {path} was written by another model configuration "
                    f"({describe_mismatch(state.get('fingerprint') or {}, fingerprint)})"
                )
            found.setdefault(int(state["step"]), path)
        return found

    def restore(self) -> Restored | None:
        """Agree with every rank on a step and load it, or None to start empty.

        The step is the newest one every rank holding checkpoints saved. A rank without checkpoints (the job grew)
        receives that state from the lowest rank holding it: the model is replicated, so any copy serves.
        """
        try:
            mine: dict[int, Path] | None = self.steps()
        except CheckpointMismatch as exc:
            mismatch, mine = str(exc), None
        every: list[list[int] | None] = [None] * self.world
        dist.all_gather_object(every, None if mine is None else sorted(mine), group=self.group)
        if mine is None or any(s is None for s in every):
            raise CheckpointMismatch(
                mismatch if mine is None else "another rank's checkpoint has another configuration"
            )
        holding = [set(s) for s in every if s]
        common = set.intersection(*holding) if holding else set()
        if not common:
            if holding:
                log.warning("rank checkpoints share no step (%s): starting from an empty model", every)
            return None
        step = max(common)
        if all(every):
            state = decode(mine[step].read_bytes())
        else:
            src = min(r for r, s in enumerate(every) if s)
            box = [decode(mine[step].read_bytes()) if self.rank == src else None]
            dist.broadcast_object_list(box, src=src, group=self.group)
            state = box[0]
        c = self.checkpointer
        c.model.load_state_dict(state["model"])
        c.seen.load_state_dict(state["seen"])
        c.restore_variants(state.get("variants", {}))
        self.step = step
        self.generation = state.get("generation")
        log.info("rank %d restored step %d (model version %d)", self.rank, step, c.model.version)
        path = mine.get(step, Path(f"rank{self.rank}-step{step}"))
        return Restored(path, _unpack_offsets(state["offsets"]), "run", c.model.version, self.generation)
