"""The interaction event on the wire (JSON, schema version 1), its decoder and its validation rules."""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
import numpy as np

SCHEMA_VERSION = 1
MAX_ID = 2**63 - 1
MAX_WEIGHT = 1e6
MIN_WEIGHT = 1e-6  # checked after the float32 cast the model trains with (1e-320 would become 0)
MAX_FUTURE_MS = 24 * 3600 * 1000  # events stamped more than a day ahead are rejected

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One user–item interaction. ``ts`` is event time in Unix milliseconds; ``weight`` is finite and > 0.

    For friend recommendation (user–user graphs) ``item_id`` is the other user's id.
    """

    v: int = SCHEMA_VERSION
    user_id: Id
    item_id: Id
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
    event_type: EventType = "interaction"
    weight: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_WEIGHT)] = 1.0


# Bounded set of rejection reasons: used as a metric label and in the DLQ headers.
REASONS = (
    "too_large",
    "bad_encoding",
    "malformed_json",
    "too_deep",
    "missing_field",
    "invalid_field",
    "bad_version",
    "future_ts",
    "undecodable",
)


class InvalidEvent(ValueError):
    """A record that cannot be trained on: ``reason`` is one of ``REASONS``, ``detail`` says exactly why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EventCodec:
    """Encodes events to JSON bytes and decodes + validates bytes back, raising ``InvalidEvent``.

    >>> codec = EventCodec()
    >>> codec.decode(codec.encode(Event(user_id=1, item_id=2, ts=3))).item_id
    2
    >>> codec.decode(b'{"user_id": 1, "item_id": -2, "ts": 3}')
    Traceback (most recent call last):
    ...
    ebrflow.stream.schema.InvalidEvent: invalid_field: Expected `int` >= 0 - at `$.item_id`
    """

    def __init__(self, max_bytes: int = 64 * 1024, max_future_ms: int = MAX_FUTURE_MS) -> None:
        self.max_bytes = max_bytes
        self.max_future_ms = max_future_ms
        self._decoder = msgspec.json.Decoder(Event)
        self._encoder = msgspec.json.Encoder()

    def encode(self, event: Event) -> bytes:
        """JSON bytes of ``event``."""
        return self._encoder.encode(event)

    def decode(self, payload: bytes | None, now_ms: int | None = None) -> Event:
        """Decode and validate one record value."""
        if payload is None:
            raise InvalidEvent("malformed_json", "record has no value (tombstone)")
        if len(payload) > self.max_bytes:
            raise InvalidEvent("too_large", f"{len(payload)} bytes > limit {self.max_bytes}")
        if not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidEvent("bad_encoding", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
        try:
            event = self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            reason = "missing_field" if "missing required field" in str(exc) else "invalid_field"
            raise InvalidEvent(reason, str(exc)) from None
        except msgspec.DecodeError as exc:
            raise InvalidEvent("malformed_json", str(exc)) from None
        except RecursionError:
            raise InvalidEvent("too_deep", "JSON nested too deeply to decode") from None
        except MemoryError:
            raise InvalidEvent("too_large", f"{len(payload)} bytes exhausted memory while decoding") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the record, never fatal
            raise InvalidEvent("undecodable", f"{type(exc).__name__}: {exc}") from None
        if event.v != SCHEMA_VERSION:
            raise InvalidEvent("bad_version", f"schema version {event.v}, this consumer reads {SCHEMA_VERSION}")
        if not np.float32(event.weight) >= MIN_WEIGHT:
            raise InvalidEvent("invalid_field", f"weight {event.weight!r} < {MIN_WEIGHT} after the float32 cast")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if event.ts > now + self.max_future_ms:
            raise InvalidEvent("future_ts", f"ts {event.ts} is more than {self.max_future_ms} ms ahead of now {now}")
        return event
