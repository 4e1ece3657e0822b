"""What a checkpoint holds and how a trainer resumes from one: model, seen items, Kafka offsets, version."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ebrflow.indexer.seen import SeenItems
from ebrflow.model.base import RetrievalModel
from ebrflow.model.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]
Source = Literal["run", "backfill"]


class CheckpointMismatch(RuntimeError):
    """The newest verified checkpoint was written by a model of another configuration."""

    exit_code = 78  # EX_CONFIG: the configuration does not fit the saved state


def _pack_offsets(offsets: Offsets) -> dict[str, int]:
    return {f"{topic}:{partition}": offset for (topic, partition), offset in offsets.items()}


def _unpack_offsets(packed: dict[str, int]) -> Offsets:
    out: Offsets = {}
    for key, offset in packed.items():
        topic, _, partition = key.rpartition(":")
        out[(topic, int(partition))] = int(offset)
    return out


def describe_mismatch(saved: dict, current: dict) -> str:
    """``key: saved → configured`` for every fingerprint entry that differs.

    >>> describe_mismatch({"kind": "two_tower", "dim": 16}, {"kind": "ssmtl", "dim": 16})
    "kind: 'two_tower' → 'ssmtl'"
    """
    keys = sorted(set(saved) | set(current))
    return ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))


@dataclass
class Restored:
    """A checkpoint the model and seen store were loaded from.

    ``source == "run"``: ``offsets`` name every partition the run had trained; any other partition had no
    trained record and resumes at its beginning. ``source == "backfill"``: no offsets; partitions resume at
    the group's committed offsets. ``generation``: the Milvus generation the run published (None: unknown,
    a backfill or an older checkpoint).
    """

    path: Path
    offsets: Offsets
    source: Source
    version: int
    generation: int | None = None


class Checkpointer:
    """Saves the trainer's state every ``every_batches`` batches or ``every_s`` seconds; restores it on start.

    A checkpoint is the source of truth: on restore the model and seen items are loaded and the returned
    offsets are where each partition resumes (the pipeline then re-publishes every embedding).
    Steps of a save, in order: the batch was published → state written → offsets committed.
    ``fingerprint`` (model kind, dim, prior, options) is saved and must match at restore; so must ``stream``
    (``{"topic": ..., "group": ...}``, the trainer's input) when both the checkpoint and this trainer name one: a
    checkpoint holds one topic's offsets and what one stream trained, and is no other trainer's to resume from.
    """

    def __init__(
        self,
        store: CheckpointStore,
        model: RetrievalModel,
        seen: SeenItems,
        every_batches: int = 50,
        every_s: float = 60.0,
        fingerprint: dict | None = None,
        variants: dict[str, tuple[RetrievalModel, SeenItems, dict]] | None = None,
        stream: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.seen = seen
        self.every_batches = every_batches
        self.every_s = every_s
        self.fingerprint = fingerprint or {}
        self.stream = stream  # None: a backfill, whose checkpoint any trainer of the same model may start from
        # shadow models (model, seen store, fingerprint) saved and restored alongside; missing or changed: fresh
        self.variants = variants or {}
        self.generation: int | None = None  # the Milvus generation this run writes (saved with every checkpoint)
        self._batches = 0
        self._last = time.monotonic()

    def due(self) -> bool:
        """True when enough batches or seconds passed since the last save."""
        return self._batches >= self.every_batches or time.monotonic() - self._last >= self.every_s

    def note_batches(self, n: int) -> None:
        """Count ``n`` finished batches towards the schedule."""
        self._batches += n

    def batch_done(self, offsets: Offsets, force: bool = False, source: Source = "run") -> bool:
        """Count a finished batch and save if due (``offsets``: next offset per partition); True if saved."""
        self.note_batches(1)
        if not (force or self.due()):
            return False
        self.save(offsets, source)
        return True

    def save(self, offsets: Offsets, source: Source = "run") -> None:
        """Write the model, seen items and ``offsets`` (next offset per partition) as the newest checkpoint."""
        self.store.save(
            {
                "model": self.model.state_dict(),
                "seen": self.seen.state_dict(),
                "offsets": _pack_offsets(offsets),
                "version": self.model.version,
                "saved_at": time.time(),
                "fingerprint": self.fingerprint,
                "stream": self.stream,
                "source": source,
                "generation": self.generation,
                "variants": {
                    name: {"model": m.state_dict(), "seen": seen.state_dict(), "fingerprint": fingerprint}
                    for name, (m, seen, fingerprint) in self.variants.items()
                },
            }
        )
        self._batches, self._last = 0, time.monotonic()

    def restore(self) -> Restored | None:
        """Load the newest checkpoint that verifies and restores a finite model; None when there is none.

        Raises ``CheckpointMismatch`` when that checkpoint was written under another model configuration, or by the
        trainer of another topic or consumer group.
        A checkpoint that verifies but cannot be loaded (or yields non-finite embeddings) is skipped for the
        next older one; when none is usable the model and seen store are left as they were (empty).
        """
        initial = copy.deepcopy((self.model.state_dict(), self.seen.state_dict()))
        for path, state in self.store.verified():
            owner = state.get("stream")
            if owner is not None and self.stream is not None and owner != self.stream:
                raise CheckpointMismatch(
                    f"checkpoint {path} belongs to the trainer of topic {owner.get('topic')!r}, group "
                    f"{owner.get('group')!r}, not to this one (topic {self.stream['topic']!r}, group "
                    f"{self.stream['group']!r}); run.data_dir holds one trainer's state: give each trainer its own"
                )
            saved = state.get("fingerprint")
            if saved is None:
                log.error("skipping checkpoint %s: it has no model fingerprint (written by an older ebrflow)", path)
                continue
            if saved != self.fingerprint:
                raise CheckpointMismatch(
                    f"checkpoint {path} was written by another model configuration "
                    f"({describe_mismatch(saved, self.fingerprint)}); restore that configuration, or start a new "
                    f"model with an empty run.data_dir (its checkpoints) and new Milvus collections"
                )
            try:
                self.model.load_state_dict(state["model"])
                self.seen.load_state_dict(state["seen"])
                _check_finite(self.model)
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint falls back to an older one
                log.error("skipping checkpoint %s: it verifies but does not restore (%s)", path, exc)
                self.model.load_state_dict(initial[0])
                self.seen.load_state_dict(initial[1])
                continue
            self.restore_variants(state.get("variants", {}))
            restored = Restored(
                path,
                _unpack_offsets(state["offsets"]),
                state.get("source", "run"),
                self.model.version,
                state.get("generation"),
            )
            log.info(
                "restored checkpoint %s (%s) at model version %d; resuming at offsets %s",
                path.name,
                restored.source,
                restored.version,
                restored.offsets,
            )
            return restored
        if self.store.paths():
            log.error("no usable checkpoint in %s: starting from an empty model", self.store.directory)
        return None

    def restore_variants(self, saved: dict) -> None:
        """Load each configured variant saved in the checkpoint; one that does not load (its configuration
        changed) starts fresh, logged, without costing the served model its checkpoint."""
        for name, (model, seen, fingerprint) in self.variants.items():
            if name not in saved:
                log.info("variant %s is not in the checkpoint: it starts fresh", name)
                continue
            if saved[name].get("fingerprint") != fingerprint:
                log.warning(
                    "variant %s was saved under another configuration (%s): it starts fresh",
                    name,
                    describe_mismatch(saved[name].get("fingerprint") or {}, fingerprint),
                )
                continue
            initial = copy.deepcopy((model.state_dict(), seen.state_dict()))
            try:
                model.load_state_dict(saved[name]["model"])
                seen.load_state_dict(saved[name]["seen"])
            except Exception as exc:  # noqa: BLE001 - a changed variant restarts, the served model does not
                log.error("variant %s does not restore from the checkpoint (%s): it starts fresh", name, exc)
                model.load_state_dict(initial[0])
                seen.load_state_dict(initial[1])


def _check_finite(model: RetrievalModel) -> None:
    """Raise when the restored model's embeddings of known ids are not all finite."""
    for name, ids, embed in (
        ("item", model.known_items(), model.item_embeddings),
        ("user", model.known_users(), model.user_embeddings),
    ):
        for start in range(0, len(ids), 65536):
            if not np.isfinite(embed(ids[start : start + 65536])).all():
                raise ValueError(f"non-finite {name} embeddings")
