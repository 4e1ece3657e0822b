"""SIGKILL the trainer ≥ 20 times while it trains 200k events: nothing lost, ≤ 1 batch re-trained per crash,
and Milvus ends equal to the final checkpoint."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np

from ebrflow.app import build_model, open_store
from ebrflow.config import load_settings
from model.checkpoint import CheckpointStore
from stream.broker import EmbeddedBroker
from tests.crash_harness import coverage, produce_fast, start_trainer, write_config

EVENTS = 200_000
KILLS = 20
BATCH = 1024


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
    cfg = write_config(tmp_path / "trainer.toml", broker.bootstrap_servers, topic, "crash-group", data)
    produced = produce_fast(broker.bootstrap_servers, topic, EVENTS)
    assert sum(produced.values()) == EVENTS
    audit, log = data / "processed.log", tmp_path / "trainer.log"
    rng = random.Random(5)

    kills = 0
    while kills < KILLS:
        proc = start_trainer(cfg, idle_exit=30, log=log)
        if not _wait_for_progress(audit, proc):
            proc.kill()
            proc.wait()
            break  # it finished (or stalled) before we could kill it: checked below
        time.sleep(rng.uniform(0.0, 0.4))  # short: a fast trainer must not finish the stream before 20 kills
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    # idle long enough to outlive the killed members' 6 s sessions, so the last rebalance hands it every partition
    final = start_trainer(cfg, idle_exit=30, log=log)
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]

    assert kills >= KILLS, f"only {kills} kills before the stream was exhausted"
    counts = coverage(audit, topic)
    for partition, n in produced.items():
        trained = counts.get(partition, np.zeros(0, np.int64))[:n]
        assert len(trained) == n and (trained >= 1).all(), f"partition {partition}: offsets never trained"
    duplicates = int(sum(np.clip(c - 1, 0, None).sum() for c in counts.values()))
    print(f"{kills} kills, {EVENTS} events, {duplicates} re-trained ({duplicates / kills:.0f} per crash)")
    assert duplicates <= kills * BATCH, f"{duplicates} re-trained events for {kills} crashes"

    state = CheckpointStore(data / "checkpoints").load_latest()
    settings = load_settings(cfg)
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
