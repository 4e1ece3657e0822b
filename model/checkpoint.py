"""Atomic, checksummed, retained checkpoints of training state, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
MAGIC = b"EBRFLOW-CKPT-1\n"  # then the SHA-256 of the payload (32 bytes), then torch.save's bytes


class CorruptCheckpoint(ValueError):
    """A checkpoint file whose checksum or format does not verify."""


def encode(state: dict) -> bytes:
    """The bytes of a checkpoint file: magic, SHA-256 of the payload, payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(blob: bytes) -> dict:
    """Verify and load a checkpoint file's bytes (``weights_only``: plain tensors and containers only)."""
    if not blob.startswith(MAGIC):
        raise CorruptCheckpoint("not an ebrflow checkpoint (bad magic: truncated, damaged or an older format)")
    digest, payload = blob[len(MAGIC) : len(MAGIC) + 32], blob[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint(f"checksum mismatch over {len(payload)} payload bytes")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


class CheckpointStore:
    """Writes ``ckpt-<seq>.pt`` files atomically (temp file, fsync, rename, fsync dir) and keeps the newest ``keep``.

    Each file carries a SHA-256 of its payload. ``verified`` yields checkpoints newest first, skipping
    (with a log line naming the file and why) any whose checksum fails or that does not load with
    ``torch.load(weights_only=True)``; ``load_latest`` is the first of them.

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
            f.write(encode(state))
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

    def verified(self) -> Iterator[tuple[Path, dict]]:
        """(path, state) of every checkpoint that verifies, newest first."""
        for path in reversed(self.paths()):
            try:
                state = decode(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                log.error("skipping checkpoint %s: %s", path, exc)
                continue
            yield path, state

    def load_latest(self) -> dict | None:
        """The newest checkpoint that verifies, or None when there is none."""
        return next((state for _, state in self.verified()), None)
