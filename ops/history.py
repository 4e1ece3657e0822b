"""A per-batch record of the run, appended as JSON lines, from which `ebrflow report` draws its plots."""

from __future__ import annotations

from pathlib import Path

import msgspec


class BatchRecord(msgspec.Struct, omit_defaults=True):
    """One processed micro-batch: stream time, throughput, quality, drift and freshness figures.

    ``nan`` is never written: a figure that could not be computed is left out (None).
    """

    batch: int
    wall_time: float  # unix seconds when the batch finished
    stream_time_ms: int  # max event time in the batch
    events: int
    invalid: int = 0
    seconds: float = 0.0  # processing wall time of the batch
    loss: float | None = None
    recall: float | None = None
    recall_cold: float | None = None
    recall_warm: float | None = None
    ndcg: float | None = None
    evaluated: int = 0
    evaluated_cold: int = 0
    model_version: int = 0
    items_indexed: int = 0
    freshness_p50_s: float | None = None
    item_shift_mean: float | None = None
    neighbour_jaccard: float | None = None
    centroid_shift: float | None = None
    drift_signals: list[str] = []
    task_losses: dict[str, float] = {}
    task_weights: dict[str, float] = {}


class HistoryWriter:
    """Appends ``BatchRecord`` lines to a file, flushing each line so a killed run keeps its history."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._encoder = msgspec.json.Encoder()

    def write(self, record: BatchRecord) -> None:
        """Append one record."""
        self._file.write(self._encoder.encode(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_history(path: Path | str) -> list[BatchRecord]:
    """All records of a history file, skipping a torn last line."""
    decoder = msgspec.json.Decoder(BatchRecord)
    records = []
    for line in Path(path).read_bytes().splitlines():
        try:
            records.append(decoder.decode(line))
        except msgspec.DecodeError:
            continue
    return records
