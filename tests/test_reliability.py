"""Hostile-operator faults on the real broker and Milvus Lite: kill -9 before the first checkpoint, rebalances and
SIGTERM during a Milvus outage, poison records, a second trainer in the group, a checkpoint of another model."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer

from ebrflow.app import build_trainer
from ebrflow.config import Settings, load_settings
from ebrflow.indexer.generations import Generations
from ebrflow.stream.broker import EmbeddedBroker
from ebrflow.stream.schema import Event
from tests.crash_harness import coverage, produce_fast, start_trainer, write_config
from tests.faults import FlakyMilvus, milvus_lite_server, produce_interleaved, send_events, trained_count, wait_for


def _intruder(settings: Settings, seconds: float) -> int:
    """A second group member that joins, reads for ``seconds`` (committing nothing) and leaves."""
    consumer = KafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    got, joined_by = 0, time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < joined_by:  # leave only after the join completed
        got += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
    consumer.close()
    return got


def _probe(trainer, path: str) -> tuple[int, dict]:  # noqa: ANN001
    """GET a health path on the trainer's metrics port: (status, JSON body or {})."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{trainer.metrics_port}{path}", timeout=5) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    return status, json.loads(raw) if raw.startswith(b"{") else {}


def test_kill_before_first_checkpoint_retrains_everything_and_clears_milvus(
    broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue repro: kill -9 before any checkpoint; the restart used to consume nothing. The schedule is set so the
    kill after 8 batches lands before the first checkpoint however slow the machine (no time trigger in reach)."""
    topic, data = "kill-early.events", tmp_path / "data"
    data.mkdir()
    schedule = {"checkpoint_every_batches": 1000, "checkpoint_every_s": 86_400.0}
    cfg = write_config(tmp_path / "t.toml", broker.bootstrap_servers, topic, "kill-early", data, run=schedule)
    produced = produce_fast(broker.bootstrap_servers, topic, 20_000)
    audit, log = data / "processed.log", tmp_path / "trainer.log"
    proc = start_trainer(cfg, idle_exit=60, log=log)
    assert wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 8, 120), log.read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((data / "checkpoints").glob("ckpt-*.pt")), "a checkpoint was due: the test needs a faster kill"

    settings = load_settings(cfg)
    trainer = build_trainer(settings, broker.bootstrap_servers)
    gens = Generations(trainer.store.client, settings.milvus.collection_prefix)
    try:
        assert gens.served() == 1  # the dead run's model: clients keep reading it until the restart caught up
        gens.load(1)
        dead_rows = trainer.store.count(gens.alias("items")) + trainer.store.count(gens.alias("users"))
        assert dead_rows > 0
        with caplog.at_level(logging.INFO, logger="ebrflow.stream"):
            summary = trainer.run(idle_exit_s=10)
        items = trainer.model.known_items()
        rows = trainer.store.get(trainer.store.items, items.tolist())
        np.testing.assert_allclose(
            np.array([rows[i]["embedding"] for i in items.tolist()], np.float32),
            trainer.model.item_embeddings(items),
            atol=1e-5,
        )
        assert trainer.store.count(trainer.store.items) == len(items)
        # the restart wrote generation 2 and switched the aliases to it once it had caught up
        assert trainer.store.generation == 2 and gens.served() == 2
        assert trainer.store.count(gens.alias("items")) == len(items)
    finally:
        trainer.close()
    # no checkpoint → the restored model is empty: it fills a new generation behind the dead run's
    assert "writing generation 2; generation 1 is served until this trainer catches up" in caplog.text
    print(f"kill before first checkpoint: {sum(produced.values())} sent, restart trained {summary.trained}")
    assert summary.trained == sum(produced.values()), "the restart must re-train every event from the beginning"
    counts = coverage(audit, topic)
    assert all((counts[p][:n] >= 1).all() and len(counts[p]) >= n for p, n in produced.items())


def test_rebalance_during_milvus_outage_loses_nothing(settings: Settings) -> None:
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"audit_log": True})})
    audit = Path(settings.run.data_dir) / "processed.log"

    def distinct_trained() -> int:
        return sum(int((c >= 1).sum()) for c in coverage(audit, settings.kafka.topic).values()) if audit.exists() else 0

    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    flaky = trainer.store.client = FlakyMilvus(trainer.store.client)
    runner = threading.Thread(target=trainer.run, daemon=True)
    runner.start()
    try:
        send_events(settings, 0, 3000)
        assert wait_for(lambda: trained_count(trainer) == 3000, 90), trained_count(trainer)
        assert _probe(trainer, "/healthz")[0] == 200
        assert wait_for(lambda: _probe(trainer, "/readyz")[0] == 200, 10)
        flaky.failing.set()
        send_events(settings, 3000, 4000)
        assert wait_for(lambda: _probe(trainer, "/readyz")[0] == 503, 120), "/readyz never reported the outage"
        status, body = _probe(trainer, "/readyz")
        assert status == 503 and body["checks"] == {"running": True, "partitions": True, "milvus": False}
        read_by_intruder = _intruder(settings, 10)  # joins and leaves while the trainer is paused
        assert flaky.failures >= 2 and runner.is_alive()
        flaky.failing.clear()
        assert wait_for(lambda: distinct_trained() == 7000, 120), distinct_trained()
    finally:
        trainer.pipeline.stop()
        runner.join(timeout=60)
        trainer.close()
    print(
        f"rebalance during Milvus outage: 7000 sent, {trained_count(trainer)} trained, intruder read {read_by_intruder}"
    )
    counts = coverage(audit, settings.kafka.topic)
    assert all((c == 1).all() for c in counts.values()), "an offset was trained twice, or one was skipped"
    assert trained_count(trainer) == 7000


def test_sigterm_during_milvus_outage_exits_fast_and_restart_loses_nothing(settings: Settings) -> None:
    every = 5
    settings = settings.model_copy(
        update={
            "run": settings.run.model_copy(update={"audit_log": True, "checkpoint_every_batches": every}),
            "kafka": settings.kafka.model_copy(update={"partitions": 2}),
        }
    )
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    flaky = trainer.store.client = FlakyMilvus(trainer.store.client)
    signalled: list[float] = []

    def outage_then_sigterm() -> None:
        send_events(settings, 0, 3000)
        wait_for(lambda: trained_count(trainer) == 3000, 90)
        flaky.failing.set()
        send_events(settings, 3000, 2000)
        wait_for(lambda: flaky.failures >= 3, 60)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # the handler Trainer.run installs in the main thread

    helper = threading.Thread(target=outage_then_sigterm, daemon=True)
    helper.start()
    try:
        trainer.run()  # main thread: SIGTERM reaches its handler
        stopped_at = time.monotonic()
    finally:
        trainer.close()
    helper.join(timeout=5)
    assert signalled, "the outage never started"
    exit_s = stopped_at - signalled[0]
    # fast = the stop interrupts the retries instead of sitting out a backoff (up to the pipeline's max_backoff_s)
    backoff = trainer.pipeline.publishing.max_backoff_s
    assert exit_s < backoff, f"took {exit_s:.1f} s to stop during the outage (a backoff is up to {backoff} s)"
    first_trained = trained_count(trainer)

    restarted = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = restarted.run(idle_exit_s=10)
    finally:
        restarted.close()
    counts = coverage(Path(settings.run.data_dir) / "processed.log", settings.kafka.topic)
    trained = sum(int((c >= 1).sum()) for c in counts.values())
    duplicates = int(sum(np.clip(c - 1, 0, None).sum() for c in counts.values()))
    print(
        f"SIGTERM during outage: stopped in {exit_s:.1f} s; 5000 sent, {first_trained} trained before, "
        f"{summary.trained} after restart, {duplicates} re-trained"
    )
    assert trained == 5000, f"{trained} distinct offsets trained"
    assert duplicates <= every * settings.batch.max_events


def test_second_trainer_in_the_group_is_refused(settings: Settings, tmp_path: Path) -> None:
    """Same group, same Milvus (one served by ``milvus-lite server``): the newcomer trains, commits and writes
    nothing, and exits with code 75; the running trainer keeps every partition and its rows."""
    with milvus_lite_server(tmp_path / "shared-milvus") as uri:
        settings = settings.model_copy(update={"milvus": settings.milvus.model_copy(update={"uri": uri})})
        incumbent = build_trainer(settings, settings.kafka.bootstrap_servers)
        runner = threading.Thread(target=incumbent.run, daemon=True)
        runner.start()
        other = tmp_path / "other"
        cfg = write_config(
            tmp_path / "second.toml",
            settings.kafka.bootstrap_servers,
            settings.kafka.topic,
            settings.kafka.group_id,
            other,
            kafka={"partitions": settings.kafka.partitions},
            milvus={"uri": uri},
            run={"exclusive_grace_s": 8.0, "data_dir": str(other)},
        )
        try:
            send_events(settings, 0, 2000)
            assert wait_for(lambda: trained_count(incumbent) == 2000, 90)
            rows_before = incumbent.store.count(incumbent.store.items)
            second = subprocess.run(
                [sys.executable, "-m", "ebrflow.cli", "run", "-c", str(cfg)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            rows_after = incumbent.store.count(incumbent.store.items)
            send_events(settings, 2000, 1000)
            assert wait_for(lambda: trained_count(incumbent) == 3000, 120), trained_count(incumbent)
        finally:
            incumbent.pipeline.stop()
            runner.join(timeout=60)
            incumbent.close()
    print(f"second trainer: exit {second.returncode}: {second.stderr.strip()[-300:]}")
    assert second.returncode == 75, second.stderr[-2000:]
    assert "another trainer" in second.stderr and "Traceback" not in second.stderr
    assert rows_before == rows_after == 97, "the refused trainer must not delete or write rows"
    assert trained_count(incumbent) == 3000


def test_checkpoint_of_another_model_topic_or_group_is_one_clear_error(settings: Settings, tmp_path: Path) -> None:
    """A checkpoint resumes only the trainer that wrote it: same model configuration, same topic, same group."""
    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        send_events(settings, 0, 500)
        trainer.run(max_events=500, idle_exit_s=30)
    finally:
        trainer.close()
    k = settings.kafka
    others = {
        "dim: 16 → 32": (k.topic, k.group_id, {"dim": 32, "device": "cpu"}),
        f"topic {k.topic!r}, group {k.group_id!r}, not to this one (topic 'elsewhere'": ("elsewhere", k.group_id, {}),
        f"not to this one (topic {k.topic!r}, group 'other-group')": (k.topic, "other-group", {}),
    }
    for n, (fragment, (topic, group, model)) in enumerate(others.items()):
        cfg = write_config(
            tmp_path / f"other{n}.toml",
            k.bootstrap_servers,
            topic,
            group,
            Path(settings.run.data_dir),
            model={"device": "cpu", **model},
            milvus={"uri": str(tmp_path / f"fresh-milvus{n}.db")},
        )
        out = subprocess.run(
            [sys.executable, "-m", "ebrflow.cli", "run", "-c", str(cfg), "--idle-exit", "5"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 78, out.stderr[-2000:]
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_one_trainer_per_data_dir_whatever_its_topic_or_group(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A second trainer (or backfill) of a data dir another process owns is refused, exit 75, before it creates a
    topic: two trainers of one directory would restore and prune each other's checkpoints."""
    from kafka.admin import KafkaAdminClient

    data, bootstrap = tmp_path / "data", broker.bootstrap_servers
    owner = start_trainer(
        write_config(tmp_path / "owner.toml", bootstrap, "owner.events", "owner", data), 300, log=tmp_path / "owner.log"
    )
    try:
        lock = data / "ebrflow.lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(owner.pid), 120), owner.poll()
        attempts = {
            "other topic": [
                "run",
                "-c",
                str(write_config(tmp_path / "t.toml", bootstrap, "intruder.t", "owner", data)),
            ],
            "other group": [
                "run",
                "-c",
                str(write_config(tmp_path / "g.toml", bootstrap, "intruder.g", "intruder", data)),
            ],
            "backfill": ["backfill", str(_movielens_file(tmp_path)), "-c", str(tmp_path / "t.toml")],
        }
        for what, argv in attempts.items():
            out = subprocess.run(
                [sys.executable, "-m", "ebrflow.cli", *argv], capture_output=True, text=True, timeout=120
            )
            lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
            assert out.returncode == 75, f"{what}: {out.stderr[-2000:]}"
            assert len(lines) == 1 and f"owned by another ebrflow process (pid {owner.pid})" in lines[0], lines
        assert owner.poll() is None  # the owner is unaffected
    finally:
        owner.kill()
        owner.wait()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert not {"intruder.t", "intruder.g"} & set(admin.list_topics())
    finally:
        admin.close()


def _movielens_file(tmp_path: Path) -> Path:
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{u % 7}\t5\t{881250949 + u}\n" for u in range(50)))
    return path


def _depth_bomb(levels: int) -> bytes:
    return b'{"user_id":1,"item_id":2,"ts":3,"x":' + b"[" * levels + b"]" * levels + b"}"


def test_poison_records_are_dead_lettered_and_valid_ones_trained(settings: Settings) -> None:
    import hypothesis.strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=30,
    )
    nested = [
        json.dumps({"user_id": st_value, "item_id": 2, "ts": 3}).encode()
        for st_value in (json_values.filter(lambda v: isinstance(v, list | dict)).example() for _ in range(40))
    ]
    near_limit = b'{"user_id":' + b"9" * ((1 << 20) - 200) + b"}"  # invalid, just under 1 MiB
    poison = [_depth_bomb(n) for n in (1_000, 5_000, 20_000)] + [near_limit] + nested
    valid = produce_interleaved(
        settings.kafka.bootstrap_servers,
        settings.kafka.topic,
        poison,
        3,
        lambda i, j: Event(user_id=i % 50, item_id=(i + j) % 31, ts=1_700_000_000_000 + i),
    )

    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        summary = trainer.run(max_events=valid + len(poison), idle_exit_s=60)
    finally:
        trainer.close()
    assert summary.trained == valid and summary.invalid == len(poison)

    consumer = KafkaConsumer(
        settings.kafka.topic + ".dlq",
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        fetch_max_bytes=8 << 20,
        max_partition_fetch_bytes=4 << 20,
    )
    letters = list(consumer)
    consumer.close()
    assert len(letters) == len(poison)
    reasons = [dict(r.headers)["ebrflow.reason"].decode() for r in letters]
    assert reasons.count("too_deep") >= 2 and "too_large" in reasons
    truncated = [r for r in letters if dict(r.headers).get("ebrflow.truncated") == b"1"]
    assert len(truncated) == 1
    headers = dict(truncated[0].headers)
    assert int(headers["ebrflow.original.size"]) == len(near_limit) > len(truncated[0].value)
    print(f"poison: {valid} valid trained, {len(poison)} dead-lettered ({', '.join(sorted(set(reasons)))})")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_checkpoint_falls_back(
    settings: Settings, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    from ebrflow.app import build_model, model_fingerprint
    from ebrflow.indexer.seen import SeenItems
    from ebrflow.model.base import Batch
    from ebrflow.model.checkpoint import CheckpointStore
    from ebrflow.stream.checkpointer import Checkpointer, CheckpointMismatch

    model = build_model(settings.model)
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    fingerprint = model_fingerprint(settings.model)
    saver = Checkpointer(store, model, SeenItems(), fingerprint=fingerprint)
    rng = np.random.default_rng(0)
    versions = []
    for _ in range(3):
        model.fit_batch(Batch.of(rng.integers(0, 50, 256), rng.integers(0, 30, 256)))
        saver.batch_done({("t", 0): model.version}, force=True)
        versions.append(model.version)
    newest = store.paths()[-1]
    blob = bytearray(newest.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2 : len(blob) // 2 + 256] = b"\xff" * 256
    else:
        blob = blob[: len(blob) // 3]
    newest.write_bytes(bytes(blob))

    fresh = build_model(settings.model)
    restored = Checkpointer(store, fresh, SeenItems(), fingerprint=fingerprint).restore()
    assert restored is not None and restored.version == versions[1] == fresh.version
    assert restored.offsets == {("t", 0): versions[1]}
    assert f"skipping checkpoint {newest}" in caplog.text

    kind = fingerprint["kind"]
    other = dict(fingerprint, kind="two_tower" if kind == "ssmtl" else "ssmtl")
    with pytest.raises(CheckpointMismatch, match=f"kind: '{kind}' → '{other['kind']}'"):
        Checkpointer(store, build_model(settings.model), SeenItems(), fingerprint=other).restore()
