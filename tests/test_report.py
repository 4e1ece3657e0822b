"""The run report: PNGs and summary.md from a history file, including records with missing figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from ebrflow.ops.history import BatchRecord, HistoryWriter
from ebrflow.ops.report import make_report, rolling_mean

START_MS = 1_700_000_000_000


def record(i: int, rng: np.random.Generator) -> BatchRecord:
    """A plausible batch: recall dips after batch 40, a detector fires at 43, some figures missing early."""
    recall = float(np.clip(rng.normal(0.3 if i < 40 or i > 55 else 0.05, 0.03), 0, 1))
    return BatchRecord(
        batch=i,
        wall_time=1_750_000_000.0 + i,
        stream_time_ms=START_MS + i * 30_000,
        events=500,
        invalid=int(i % 7 == 0),
        seconds=0.2 + 0.05 * float(rng.random()),
        loss=None if i == 3 else 8.0 - 0.02 * i,
        recall=None if i == 0 else recall,
        recall_cold=None if i < 5 else recall * 0.6,
        recall_warm=None if i == 0 else recall * 1.1,
        ndcg=None if i == 0 else recall / 2,
        evaluated=0 if i == 0 else 200,
        evaluated_cold=0 if i < 5 else 40,
        model_version=i,
        items_indexed=10 * i,
        freshness_p50_s=None if i % 10 == 0 else 1.0 + float(rng.random()),
        item_shift_mean=None if i == 0 else float(0.01 * np.exp(-i / 20) + 0.002),
        neighbour_jaccard=None if i < 3 else 0.9,
        centroid_shift=None if i < 20 else 0.01,
        drift_signals=["recall"] if i == 43 else (["item_shift", "centroid"] if i == 60 else []),
        task_losses={} if i == 3 else {"retrieval": 7.0 - 0.02 * i, "contrastive": 1.0},
        task_weights={"retrieval": 0.7, "contrastive": 0.3},
    )


def write_history(path: Path, records: list[BatchRecord]) -> None:
    writer = HistoryWriter(path)
    for rec in records:
        writer.write(rec)
    writer.close()


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_report_writes_every_plot_and_a_summary(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    history = tmp_path / "history.jsonl"
    write_history(history, [record(i, rng) for i in range(1, 80)])
    with history.open("ab") as f:
        f.write(b'{"batch": 80, "wall_')  # a torn last line from a killed run
    paths = make_report(history, tmp_path / "report", window=5)

    assert [p.name for p in paths] == ["recall.png", "drift.png", "throughput.png", "loss.png", "summary.md"]
    for png in paths[:-1]:
        assert_png(png)
    summary = paths[-1].read_text()
    assert "79 batches, 39,500 events trained" in summary
    assert "| recall | 1 | 43 (" in summary and "| centroid | 1 | 60 (" in summary
    assert "Recall@K first / last 5 batches" in summary
    for png in paths[:-1]:
        assert f"![{png.name}]({png.name})" in summary


def test_report_handles_histories_without_quality_or_drift_figures(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    bare = [BatchRecord(batch=i, wall_time=float(i), stream_time_ms=START_MS + 1000 * i, events=10) for i in (1, 2)]
    write_history(history, bare)
    paths = make_report(history, tmp_path / "out")
    for png in paths[:-1]:
        assert png.stat().st_size > 5_000
    summary = paths[-1].read_text()
    assert "No detector fired." in summary and "n/a" in summary


def test_report_refuses_an_empty_history(tmp_path: Path) -> None:
    (tmp_path / "history.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="no batch records"):
        make_report(tmp_path / "history.jsonl", tmp_path / "out")


def test_rolling_mean_weights_and_gaps() -> None:
    values = np.array([0.0, np.nan, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(rolling_mean(values, 3), [0.0, 0.0, 0.5, 1.0, 2 / 3])
    weighted = rolling_mean(np.array([1.0, 0.0, 0.0]), 2, weights=np.array([1.0, 3.0, 0.0]))
    np.testing.assert_allclose(weighted, [1.0, 0.25, 0.0])
    assert np.isnan(rolling_mean(np.array([np.nan, np.nan]), 2)).all()
