"""Producing events: datasets replayed in time order (MovieLens, SNAP edge lists, CSV, JSONL) or synthetic."""

from __future__ import annotations

import csv
import gzip
import io
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec
import numpy as np
from kafka import KafkaProducer

from ebrflow.stream.generator import EventArrays
from ebrflow.stream.schema import Event, EventCodec

FORMATS = ("movielens", "snap", "csv", "jsonl")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


class BadInputFile(ValueError):
    """A dataset file that cannot be replayed; the message names the file and the line (or missing column)."""

    exit_code = 65  # EX_DATAERR: ``ebrflow`` prints the message as one line and exits with it


def _first_bad_line(path: Path, cols: tuple[int, ...]) -> str:
    """``file:line: why`` for the first line ``np.loadtxt`` cannot read as integer columns (slow: errors only)."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split("%", 1)[0].split()
            if not fields:
                continue
            if len(fields) <= max(cols):
                return f"{path}:{n}: expected at least {max(cols) + 1} columns, found {len(fields)}"
            for c in cols:
                try:
                    int(fields[c])
                except ValueError:
                    return f"{path}:{n}: column {c + 1} is {fields[c][:40]!r}, not an integer"
    return ""


def _whitespace_columns(path: Path, cols: tuple[int, int, int]) -> EventArrays:
    """Three integer columns (user, item, unix seconds) from a whitespace-separated file, sorted by time."""
    try:
        with _open_text(path) as f:
            data = np.loadtxt(f, dtype=np.int64, usecols=cols, ndmin=2, comments=("#", "%"))
    except ValueError as exc:
        raise BadInputFile(_first_bad_line(path, cols) or f"{path}: {exc}") from None
    order = np.argsort(data[:, 2], kind="stable")
    data = data[order]
    return EventArrays(data[:, 0].copy(), data[:, 1].copy(), data[:, 2] * 1000)


def read_events(path: Path | str, fmt: str) -> EventArrays | list[Event]:
    """Load a dataset in time order. MovieLens ``u.data`` and SNAP ``src dst ts`` give arrays (weight 1).

    CSV needs a header with ``user_id,item_id,ts`` (ms) and optional ``event_type,weight``; JSONL holds
    one wire-format event per line. Both return ``Event`` lists sorted by ``ts``.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    try:
        if fmt == "movielens":
            return _whitespace_columns(path, (0, 1, 3))
        if fmt == "snap":
            return _whitespace_columns(path, (0, 1, 2))
        events = _read_csv(path) if fmt == "csv" else _read_jsonl(path)
    except (OSError, EOFError) as exc:  # unreadable, or e.g. a truncated or not gzipped .gz
        raise BadInputFile(f"{path}: {exc}") from None
    return sorted(events, key=lambda e: e.ts)


CSV_COLUMNS = ("user_id", "item_id", "ts")


def _read_csv(path: Path) -> list[Event]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise BadInputFile(
                f"{path}: missing CSV column {', '.join(missing)} (the header needs {','.join(CSV_COLUMNS)}; "
                f"it has {','.join(header) or 'nothing'})"
            )
        events = []
        for r in reader:
            try:
                events.append(
                    Event(
                        user_id=int(r["user_id"]),
                        item_id=int(r["item_id"]),
                        ts=int(r["ts"]),
                        event_type=r.get("event_type") or "interaction",
                        weight=float(r.get("weight") or 1.0),
                    )
                )
            except (TypeError, ValueError) as exc:
                why = "too few fields" if None in r.values() else str(exc)
                raise BadInputFile(f"{path}:{reader.line_num}: {why}") from None
    return events


def _read_jsonl(path: Path) -> list[Event]:
    decoder = msgspec.json.Decoder(Event)
    events = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    events.append(decoder.decode(line))
                except msgspec.MsgspecError as exc:
                    raise BadInputFile(f"{path}:{n}: {exc}") from None
    return events


def as_arrays(loaded: EventArrays | list[Event]) -> EventArrays:
    """The result of ``read_events`` as arrays (``Event`` lists are converted, weights dropped)."""
    if isinstance(loaded, EventArrays):
        return loaded
    return EventArrays(
        np.fromiter((e.user_id for e in loaded), np.int64, len(loaded)),
        np.fromiter((e.item_id for e in loaded), np.int64, len(loaded)),
        np.fromiter((e.ts for e in loaded), np.int64, len(loaded)),
    )


def events_from_arrays(
    chunks: Iterable[EventArrays], event_type: str = "interaction", restamp: Callable[[], int] | None = None
) -> Iterator[Event]:
    """Events from generated or loaded arrays; ``restamp`` replaces ``ts`` with e.g. the current time."""
    for chunk in chunks:
        for u, i, t in zip(chunk.user_ids.tolist(), chunk.item_ids.tolist(), chunk.ts_ms.tolist()):
            yield Event(user_id=u, item_id=i, ts=restamp() if restamp else t, event_type=event_type)


class Pacer:
    """Holds a producer to ``rate`` events/s, or to event time sped up ``speed`` times (None: flat out)."""

    def __init__(self, rate: float | None = None, speed: float | None = None) -> None:
        self.rate, self.speed = rate, speed
        self._t0 = time.monotonic()
        self._first_ts: int | None = None
        self._n = 0

    def wait(self, ts_ms: int) -> None:
        """Sleep until the next event is due."""
        self._n += 1
        if self.rate:
            due = self._n / self.rate
        elif self.speed:
            if self._first_ts is None:
                self._first_ts = ts_ms
            due = (ts_ms - self._first_ts) / 1000.0 / self.speed
        else:
            return
        delay = due - (time.monotonic() - self._t0)
        if delay > 0:
            time.sleep(delay)


def produce(
    producer: KafkaProducer,
    topic: str,
    events: Iterable[Event],
    pacer: Pacer | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send events keyed by user id (so a user's events stay in order on one partition); returns the count."""
    codec = EventCodec()
    n = 0
    for event in events:
        if pacer is not None:
            pacer.wait(event.ts)
        producer.send(topic, key=str(event.user_id).encode(), value=codec.encode(event))
        n += 1
        if progress is not None and n % 1000 == 0:
            progress(1000)
    producer.flush()
    if progress is not None and n % 1000:
        progress(n % 1000)
    return n
