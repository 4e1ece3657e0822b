"""Atomic, retained checkpoints of training state, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointStore:
    """Writes ``ckpt-<seq>.pt`` files atomically (temp file, fsync, rename, fsync dir) and keeps the newest ``keep``.

    ``load_latest`` returns the newest checkpoint that loads with ``torch.load(weights_only=True)``;
    corrupt or partial files are skipped with a log line naming them.

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> for step in range(3): _ = store.save({"step": step})
    >>> store.load_latest()["step"], len(store.paths())
    (2, 2)
    """

    def __init__(self, directory: Path | str, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(keep, 1)
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def save(self, state: dict) -> Path:
        """Write ``state`` as the next checkpoint and prune old ones; returns its path."""
        existing = self.paths()
        seq = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
        final = self.directory / f"ckpt-{seq:012d}.pt"
        tmp = final.with_suffix(".pt.tmp")
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self) -> dict | None:
        """The newest loadable checkpoint, or None when there is none."""
        for path in reversed(self.paths()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                log.error("skipping unreadable checkpoint %s: %s", path, exc)
        return None
