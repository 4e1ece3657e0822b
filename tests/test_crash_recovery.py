"""SIGKILL the trainer at random points while it trains 160k events: before its first checkpoint, between
checkpoints, and after a partition that had no events at the last checkpoint starts receiving them. Nothing is
lost, at most one checkpoint interval is re-trained per crash, and Milvus ends equal to the final checkpoint.

The test sets the schedule it asserts: a checkpoint every ``CHECKPOINT_BATCHES`` batches, the time trigger out of
reach (with the default 60 s, a life shorter than a minute never checkpoints, and what "one interval" re-trains
depends on the machine's speed). The bound is derived from the configuration the trainer runs."""

from __future__ import annotations

import inspect
import random
import signal
import time
from pathlib import Path

import numpy as np

from ebrflow.app import build_model, open_store
from ebrflow.config import load_settings
from ebrflow.model.checkpoint import CheckpointStore
from ebrflow.stream.broker import EmbeddedBroker
from ebrflow.stream.publishing import Publishing
from tests.crash_harness import coverage, produce_fast, start_trainer, write_config

FIRST, LATER = 120_000, 40_000  # the first lot goes to partitions 0-2 only; the later one to all four
KILLS = 10
CHECKPOINT_BATCHES = 20  # a few checkpoints per life: kills land before, between and after them


def _wait_for_progress(audit: Path, proc, timeout_s: float = 90.0) -> bool:  # noqa: ANN001
    """Wait until the trainer appends to the audit log (it is training) or exits."""
    size = audit.stat().st_size if audit.exists() else 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if audit.exists() and audit.stat().st_size > size:
            return True
        time.sleep(0.05)
    return False


def test_sigkilled_trainer_loses_nothing(broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic, data = "crash.events", tmp_path / "data"
    data.mkdir()
    schedule = {"checkpoint_every_batches": CHECKPOINT_BATCHES, "checkpoint_every_s": 86_400.0}
    cfg = write_config(tmp_path / "trainer.toml", broker.bootstrap_servers, topic, "crash-group", data, run=schedule)
    settings = load_settings(cfg)
    # a checkpoint is due once this many batches were acknowledged; it first waits for the (at most publish_depth)
    # batches in flight, which are acknowledged, audit-logged and so re-trained too when the kill lands meanwhile
    depth = inspect.signature(Publishing).parameters["depth"].default  # what the app runs with
    per_crash = (settings.run.checkpoint_every_batches + depth) * settings.batch.max_events
    produced = produce_fast(broker.bootstrap_servers, topic, FIRST, partitions=[0, 1, 2])
    assert sum(produced.values()) == FIRST
    audit, log = data / "processed.log", tmp_path / "trainer.log"
    rng = random.Random(5)

    kills = 0
    while kills < KILLS:
        proc = start_trainer(cfg, idle_exit=30, log=log)
        if not _wait_for_progress(audit, proc):
            proc.kill()
            proc.wait()
            break  # it finished (or stalled) before we could kill it: checked below
        # the first kill lands before any checkpoint; later ones anywhere up to a few checkpoints in
        time.sleep(rng.uniform(0.0, 0.4) if kills == 0 else rng.uniform(0.0, 10.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills == 4:
            later = produce_fast(broker.bootstrap_servers, topic, LATER, seed=12, partitions=[0, 1, 2, 3])
            produced = {p: produced.get(p, 0) + later.get(p, 0) for p in range(4)}
    # idle long enough to outlive the killed members' 6 s sessions, so the last rebalance hands it every partition
    final = start_trainer(cfg, idle_exit=30, log=log)
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]

    assert kills >= KILLS, f"only {kills} kills before the stream was exhausted"
    counts = coverage(audit, topic)
    for partition, n in produced.items():
        trained = counts.get(partition, np.zeros(0, np.int64))[:n]
        assert len(trained) == n and (trained >= 1).all(), f"partition {partition}: offsets never trained"
    duplicates = int(sum(np.clip(c - 1, 0, None).sum() for c in counts.values()))
    sent = sum(produced.values())
    print(f"{kills} kills, {sent} sent, all trained, {duplicates} re-trained ({duplicates / kills:.0f} per crash)")
    assert duplicates <= kills * per_crash, f"{duplicates} re-trained events for {kills} crashes (≤ {per_crash} each)"

    state = CheckpointStore(data / "checkpoints").load_latest()
    model = build_model(settings.model)
    model.load_state_dict(state["model"])
    store = open_store(settings)
    try:
        items = model.known_items()
        rows = store.get(store.items, items.tolist())
        assert set(rows) == set(items.tolist())
        served = np.array([rows[i]["embedding"] for i in items.tolist()], np.float32)
        np.testing.assert_allclose(served, model.item_embeddings(items), atol=1e-5)
        assert max(r["version"] for r in rows.values()) == model.version
    finally:
        store.client.close()
