"""≥ 1,000 malformed records (hypothesis-generated plus hand-picked) interleaved with valid ones on a real broker:
the trainer never crashes, every bad record is dead-lettered with a reason, every valid one is trained."""

from __future__ import annotations

import json

import hypothesis.strategies as st
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from kafka import KafkaConsumer

from ebrflow.app import build_trainer
from ebrflow.config import Settings
from ebrflow.stream.schema import REASONS, Event, EventCodec, InvalidEvent
from tests.faults import produce_interleaved

NOW = 1_800_000_000_000
VALID = {"user_id": 1, "item_id": 2, "ts": 1_700_000_000_000, "event_type": "click", "weight": 1.0}
WRONG_TYPES = st.one_of(
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.none(),
    st.booleans(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _dump(obj: object) -> bytes:
    return json.dumps(obj).encode()


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """A record that is invalid by construction (never accidentally valid)."""
    base = dict(VALID)
    kind = draw(
        st.sampled_from(
            [
                "type",
                "missing",
                "id_range",
                "weight",
                "future",
                "utf8",
                "truncated",
                "version",
                "event_type",
                "oversize",
                "not_object",
            ]
        )
    )
    if kind == "type":
        base[draw(st.sampled_from(["user_id", "item_id", "ts"]))] = draw(WRONG_TYPES)
        return _dump(base)
    if kind == "missing":
        for key in draw(st.sets(st.sampled_from(["user_id", "item_id", "ts"]), min_size=1)):
            del base[key]
        return _dump(base)
    if kind == "id_range":
        base[draw(st.sampled_from(["user_id", "item_id"]))] = draw(
            st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63, max_value=2**80))
        )
        return _dump(base)
    if kind == "weight":
        bad = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "0", "-1.5", "1e7", "1e999"]))
        return _dump(base).replace(b'"weight": 1.0', b'"weight": ' + bad.encode())
    if kind == "future":
        base["ts"] = draw(st.integers(min_value=NOW + 86_400_001, max_value=2**62))
        return _dump(base)
    if kind == "utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        return _dump(base).replace(b'"click"', b'"cl' + junk + b'ick"')
    if kind == "truncated":
        raw = _dump(base)
        return raw[: draw(st.integers(min_value=0, max_value=len(raw) - 1))]
    if kind == "version":
        base["v"] = draw(st.integers().filter(lambda v: v != 1))
        return _dump(base)
    if kind == "event_type":
        base["event_type"] = draw(
            st.one_of(st.just(""), st.text(min_size=33, max_size=40), st.from_regex(r"\A[A-Z ]{1,10}\Z"))
        )
        return _dump(base)
    if kind == "oversize":
        base["pad"] = "x" * draw(st.integers(min_value=2000, max_value=5000))
        return _dump(base)
    return _dump(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5))))


HAND_PICKED = [
    b"",
    b"null",
    b"{}",
    b"[]",
    b"\x00\x01\x02",
    b"{" * 500,
    b'{"user_id":1,"item_id":2}',
    b'{"user_id":1.5,"item_id":2,"ts":3}',
    b'{"user_id":1,"item_id":2,"ts":3,"weight":"1"}',
    '{"user_id":1,"item_id":2,"ts":3,"event_type":"\u00e9t\u00e9"}'.encode(),
]


@hyp_settings(max_examples=300, deadline=None)
@given(malformed())
def test_codec_rejects_every_malformed_record_with_a_known_reason(payload: bytes) -> None:
    codec = EventCodec(max_bytes=1024)
    try:
        codec.decode(payload, now_ms=NOW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS and exc.detail
    else:
        raise AssertionError(f"accepted {payload!r}")


@hyp_settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(malformed(), min_size=1000, max_size=1000))
def test_trainer_survives_bad_input_and_loses_no_valid_event(settings: Settings, bad: list[bytes]) -> None:
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"max_event_bytes": 1024})})
    bad = bad + HAND_PICKED
    n_valid = produce_interleaved(
        settings.kafka.bootstrap_servers,
        settings.kafka.topic,
        bad,
        2,  # two valid events around every bad one
        lambda i, j: Event(user_id=i % 97, item_id=(i * 7 + j) % 53, ts=1_700_000_000_000 + i),
    )

    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=n_valid + len(bad), idle_exit_s=60)
    finally:
        trainer.close()
    assert summary.trained == n_valid
    assert summary.invalid == len(bad)
    assert trainer.metrics.dlq_events._value.get() == len(bad)

    consumer = KafkaConsumer(
        settings.kafka.topic + ".dlq",
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    letters = list(consumer)
    consumer.close()
    assert sorted(r.value for r in letters) == sorted(bad)
    assert all(dict(r.headers)["ebrflow.reason"].decode() in REASONS for r in letters)
