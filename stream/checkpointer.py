"""What a checkpoint holds and how a trainer resumes from one: model, seen items, Kafka offsets, version."""

from __future__ import annotations

import logging
import time

from indexer.seen import SeenItems
from model.base import RetrievalModel
from model.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]


def _pack_offsets(offsets: Offsets) -> dict[str, int]:
    return {f"{topic}:{partition}": offset for (topic, partition), offset in offsets.items()}


def _unpack_offsets(packed: dict[str, int]) -> Offsets:
    out: Offsets = {}
    for key, offset in packed.items():
        topic, _, partition = key.rpartition(":")
        out[(topic, int(partition))] = int(offset)
    return out


class Checkpointer:
    """Saves the trainer's state every ``every_batches`` batches or ``every_s`` seconds; restores it on start.

    A checkpoint is the source of truth: on restore the model and seen items are loaded and the returned
    offsets are where each partition resumes (the pipeline then re-publishes every embedding).
    Steps of a save, in order: the batch was published → state written → offsets committed.
    """

    def __init__(
        self,
        store: CheckpointStore,
        model: RetrievalModel,
        seen: SeenItems,
        every_batches: int = 50,
        every_s: float = 60.0,
    ) -> None:
        self.store = store
        self.model = model
        self.seen = seen
        self.every_batches = every_batches
        self.every_s = every_s
        self._batches = 0
        self._last = time.monotonic()

    def due(self) -> bool:
        """True when enough batches or seconds passed since the last save."""
        return self._batches >= self.every_batches or time.monotonic() - self._last >= self.every_s

    def batch_done(self, offsets: Offsets, force: bool = False) -> bool:
        """Count a finished batch and save if due (``offsets``: next offset per partition); True if saved."""
        self._batches += 1
        if not (force or self.due()):
            return False
        self.store.save(
            {
                "model": self.model.state_dict(),
                "seen": self.seen.state_dict(),
                "offsets": _pack_offsets(offsets),
                "version": self.model.version,
                "saved_at": time.time(),
            }
        )
        self._batches, self._last = 0, time.monotonic()
        return True

    def restore(self) -> Offsets | None:
        """Load the newest valid checkpoint into the model and seen store; None when starting fresh."""
        state = self.store.load_latest()
        if state is None:
            return None
        self.model.load_state_dict(state["model"])
        self.seen.load_state_dict(state["seen"])
        offsets = _unpack_offsets(state["offsets"])
        log.info("restored checkpoint at model version %d; resuming at offsets %s", self.model.version, offsets)
        return offsets
