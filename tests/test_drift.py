"""Drift figures and detectors on constructed publishes: known shifts, neighbour churn, centroid moves, alarms."""

from __future__ import annotations

import numpy as np
import pytest

from ebrflow.indexer.mirror import EmbeddingMirror
from ebrflow.indexer.publisher import Published
from ebrflow.ops.drift import DriftMonitor, NoDrift, SignalDetector, cosine_shift, jaccard_rows

NO_IDS = np.zeros(0, dtype=np.int64)


def publish(mirror: EmbeddingMirror, ids: np.ndarray, vectors: np.ndarray, version: int = 1) -> Published:
    """What ``Publisher.publish`` returns for an items-only upsert into ``mirror``."""
    vectors = vectors.astype(np.float32)
    previous, existed = mirror.update(ids, vectors)
    empty = np.zeros((0, mirror.dim), dtype=np.float32)
    return Published(ids, previous, existed, vectors, NO_IDS, empty, np.zeros(0, bool), empty, version)


def clustered(rng: np.random.Generator, n: int, dim: int, noise: float = 0.05) -> np.ndarray:
    """``n`` vectors around ``dim`` orthogonal cluster centres (a stationary catalogue)."""
    return np.eye(dim)[np.arange(n) % dim] + rng.normal(scale=noise, size=(n, dim))


def test_cosine_shift_known_values() -> None:
    prev = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    cur = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.0, 9.0]])
    existed = np.array([True, True, True, False])
    np.testing.assert_allclose(cosine_shift(prev, cur, existed), [0.0, 1.0, 2.0], atol=1e-12)
    assert cosine_shift(prev, cur, np.zeros(4, bool)).shape == (0,)


def test_jaccard_rows_ignores_padding() -> None:
    a = np.array([[1, 2, 3, 4], [1, 2, -1, -1]])
    b = np.array([[3, 4, 5, 6], [2, 1, -1, -1]])
    np.testing.assert_allclose(jaccard_rows(a, b), [2 / 6, 1.0])


def test_null_monitor_measures_nothing() -> None:
    mirror = EmbeddingMirror(4)
    assert NoDrift().observe(publish(mirror, np.arange(3), np.ones((3, 4))), 0.3) == ({}, [])


def test_item_shift_is_the_mean_over_refreshed_items_only() -> None:
    mirror = EmbeddingMirror(2)
    monitor = DriftMonitor(mirror, probe_size=10)
    figures, _ = monitor.observe(publish(mirror, np.array([1, 2]), np.array([[1.0, 0.0], [0.0, 1.0]])), None)
    assert "item_shift" not in figures  # nothing existed before
    moved = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # item 1 turns 90°, item 2 stays, item 3 is new
    figures, _ = monitor.observe(publish(mirror, np.array([1, 2, 3]), moved), None)
    assert figures["item_shift"] == pytest.approx(0.5)


def test_neighbour_jaccard_is_one_for_unchanged_embeddings_and_low_after_a_permutation() -> None:
    rng = np.random.default_rng(0)
    mirror = EmbeddingMirror(8)
    ids = np.arange(300)
    vectors = rng.normal(size=(300, 8))
    monitor = DriftMonitor(mirror, k=10, probe_size=50, seed=1)
    first, _ = monitor.observe(publish(mirror, ids, vectors), None)
    assert "neighbour_jaccard" not in first  # the first computation has nothing to compare with
    same, _ = monitor.observe(publish(mirror, ids, vectors), None)
    assert same["neighbour_jaccard"] == 1.0
    shuffled, _ = monitor.observe(publish(mirror, ids, vectors[rng.permutation(300)]), None)
    assert shuffled["neighbour_jaccard"] < 0.2
    back, _ = monitor.observe(publish(mirror, ids, vectors), None)
    assert back["neighbour_jaccard"] < 0.2


def test_neighbour_jaccard_waits_for_enough_items_and_respects_every() -> None:
    rng = np.random.default_rng(0)
    mirror = EmbeddingMirror(4)
    monitor = DriftMonitor(mirror, k=5, probe_size=20, every=2)
    small = rng.normal(size=(20, 4))
    for _ in range(3):
        figures, _ = monitor.observe(publish(mirror, np.arange(20), small), None)
        assert "neighbour_jaccard" not in figures  # 20 < probe_size + k
    big = rng.normal(size=(60, 4))
    seen = [("neighbour_jaccard" in monitor.observe(publish(mirror, np.arange(60), big), None)[0]) for _ in range(6)]
    # batches 4..9: computed on even batches (4, 6, 8); the first computation (4) has no predecessor
    assert seen == [False, False, True, False, True, False]


@pytest.mark.parametrize("reference", ["sliding", "fixed"])
def test_centroid_shift_is_near_zero_when_stationary_and_large_after_moving_everything(reference: str) -> None:
    rng = np.random.default_rng(0)
    mirror = EmbeddingMirror(8)
    ids = np.arange(400)
    monitor = DriftMonitor(mirror, probe_size=50, reference_batches=5, reference=reference)
    stationary = [monitor.observe(publish(mirror, ids, clustered(rng, 400, 8)), None)[0] for _ in range(15)]
    shifts = [f["centroid_shift"] for f in stationary if "centroid_shift" in f]
    assert len(shifts) == 10  # absent while the 5-batch reference window fills
    assert max(shifts) < 0.005
    moved = clustered(rng, 400, 8) + 2.0 * np.eye(8)[0]  # every vector moves towards cluster 0
    figures, _ = monitor.observe(publish(mirror, ids, moved), None)
    assert figures["centroid_shift"] > 0.3


def test_sliding_centroid_reference_catches_up_after_a_move() -> None:
    rng = np.random.default_rng(0)
    mirror = EmbeddingMirror(8)
    ids = np.arange(400)
    monitor = DriftMonitor(mirror, probe_size=50, reference_batches=5)
    for _ in range(6):
        monitor.observe(publish(mirror, ids, clustered(rng, 400, 8)), None)
    shifts = [
        monitor.observe(publish(mirror, ids, clustered(rng, 400, 8) + 2.0 * np.eye(8)[0]), None)[0]["centroid_shift"]
        for _ in range(7)
    ]
    assert shifts[0] > 0.3 and shifts[-1] < 0.005  # a spike that fades once the window holds the new state


@pytest.mark.parametrize("detector", ["page_hinkley", "adwin"])
def test_recall_detector_fires_after_a_drop_and_not_before(detector: str) -> None:
    rng = np.random.default_rng(3)
    mirror = EmbeddingMirror(4)
    monitor = DriftMonitor(mirror, probe_size=10, detector=detector, warmup=20)
    recall = np.r_[rng.normal(0.40, 0.03, 80), rng.normal(0.20, 0.03, 40)]
    alarms = []
    for batch, value in enumerate(recall):
        _, drifted = monitor.observe(publish(mirror, np.arange(5), np.ones((5, 4))), float(value))
        alarms += [(batch, signal) for signal in drifted]
    assert alarms, "no alarm after the drop"
    assert {s for _, s in alarms} == {"recall"}
    assert 80 <= alarms[0][0] <= 95


@pytest.mark.parametrize("detector", ["page_hinkley", "adwin"])
def test_detectors_ignore_improvements_and_stationary_noise(detector: str) -> None:
    rng = np.random.default_rng(5)
    up = SignalDetector("down", detector, warmup=20)  # recall-like: only a decrease is harmful
    improving = np.r_[rng.normal(0.2, 0.02, 60), rng.normal(0.5, 0.02, 60)]
    assert not any(up.update(float(x)) for x in improving)
    flat = SignalDetector("up", detector, warmup=20)
    assert not any(flat.update(float(x)) for x in rng.normal(0.01, 0.001, 300))


def test_no_alarm_during_warm_up_even_for_a_huge_jump() -> None:
    det = SignalDetector("up", warmup=20, min_instances=1, threshold=1.0)
    series = [0.01] * 5 + [1.0] * 15
    assert not any(det.update(x) for x in series)
    assert det.scale is not None  # warm-up done: the scale is fixed from those 20 values


def test_item_shift_detector_fires_when_embeddings_start_moving_faster() -> None:
    rng = np.random.default_rng(0)
    mirror = EmbeddingMirror(8)
    ids = np.arange(100)
    vectors = rng.normal(size=(100, 8))
    monitor = DriftMonitor(mirror, probe_size=50)
    fired = []
    for batch in range(90):
        step = 0.05 if batch < 60 else 0.25  # per-batch random walk of the embeddings speeds up at batch 60
        vectors = vectors + rng.normal(scale=step, size=vectors.shape)
        _, drifted = monitor.observe(publish(mirror, ids, vectors), None)
        if "item_shift" in drifted:
            fired.append(batch)
    assert fired and 60 <= fired[0] <= 65


def test_invalid_choices_are_rejected() -> None:
    with pytest.raises(ValueError, match="detector"):
        SignalDetector(detector="kswin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        SignalDetector(direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference"):
        DriftMonitor(EmbeddingMirror(2), reference="moving")  # type: ignore[arg-type]
