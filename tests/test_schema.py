import math

import msgspec
import pytest

from ebrflow.stream.schema import REASONS, Event, EventCodec, InvalidEvent

codec = EventCodec(max_bytes=512)
NOW = 1_700_000_000_000


def test_round_trip_keeps_every_field() -> None:
    ev = Event(user_id=3, item_id=2**62, ts=NOW, event_type="click", weight=2.5)
    assert codec.decode(codec.encode(ev), now_ms=NOW) == ev


def test_defaults_fill_optional_fields() -> None:
    ev = codec.decode(b'{"user_id":1,"item_id":2,"ts":3}', now_ms=NOW)
    assert (ev.v, ev.event_type, ev.weight) == (1, "interaction", 1.0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"", "malformed_json"),
        (None, "malformed_json"),
        (b"[1,2]", "invalid_field"),
        (b'{"user_id":"1","item_id":2,"ts":3}', "invalid_field"),
        (b'{"item_id":2,"ts":3}', "missing_field"),
        (b'{"user_id":-1,"item_id":2,"ts":3}', "invalid_field"),
        (b'{"user_id":1180591620717411303424,"item_id":2,"ts":3}', "invalid_field"),
        (b'{"user_id":1,"item_id":2,"ts":3,"weight":NaN}', "malformed_json"),
        (b'{"user_id":1,"item_id":2,"ts":3,"weight":1e999}', "invalid_field"),
        (b'{"user_id":1,"item_id":2,"ts":3,"weight":0}', "invalid_field"),
        (b'{"user_id":1,"item_id":2,"ts":3,"event_type":"DROP TABLE"}', "invalid_field"),
        (b'{"user_id":1,"item_id":2,"ts":3,"v":2}', "bad_version"),
        (b'{"user_id":1,"item_id":2,"ts":99999999999999}', "future_ts"),
        (b'{"user_id":1,"item_id":2,"ts":3,"x":"\xff\xfe"}', "bad_encoding"),
        (b'{"user_id":1,"item_id":2,"ts":3,"pad":"' + b"a" * 600 + b'"}', "too_large"),
    ],
)
def test_invalid_payloads_name_their_reason(payload: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        codec.decode(payload, now_ms=NOW)
    assert info.value.reason == reason
    assert info.value.reason in REASONS
    assert info.value.detail


def test_weights_are_finite() -> None:
    for bad in (math.inf, -1.0):
        with pytest.raises(InvalidEvent):
            codec.decode(msgspec.json.encode({"user_id": 1, "item_id": 2, "ts": 3, "weight": bad}), now_ms=NOW)


@pytest.mark.parametrize("weight", [1e-320, 1e-45, 1e-7])
def test_weights_are_checked_after_the_float32_cast(weight: float) -> None:
    payload = msgspec.json.encode({"user_id": 1, "item_id": 2, "ts": 3, "weight": weight})
    with pytest.raises(InvalidEvent, match="float32") as info:
        codec.decode(payload, now_ms=NOW)
    assert info.value.reason == "invalid_field"


@pytest.mark.parametrize("levels", [1_000, 20_000])
def test_a_depth_bomb_is_rejected_not_raised(levels: int) -> None:
    deep = EventCodec(max_bytes=1 << 20)
    payload = b'{"user_id":1,"item_id":2,"ts":3,"x":' + b"[" * levels + b"]" * levels + b"}"
    with pytest.raises(InvalidEvent) as info:
        deep.decode(payload, now_ms=NOW)
    assert info.value.reason == "too_deep"
