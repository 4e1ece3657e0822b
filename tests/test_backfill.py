"""`ebrflow backfill` bootstraps a model from a file; the live trainer restores it and serves its embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from ebrflow.app import build_trainer
from ebrflow.cli import app
from ebrflow.config import Settings
from ebrflow.stream.generator import SyntheticStream


def test_backfilled_model_is_served_by_the_next_run(settings: Settings, tmp_path: Path) -> None:
    chunk = next(SyntheticStream(users=300, items=120, communities=4, seed=1).chunks(5000, chunk=5000))
    rows = ["user_id,item_id,ts"] + [f"{u},{i},{t}" for u, i, t in zip(chunk.user_ids, chunk.item_ids, chunk.ts_ms)]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    env = {"EBRFLOW_RUN__DATA_DIR": settings.run.data_dir, "EBRFLOW_MODEL__DIM": str(settings.model.dim)}
    result = CliRunner().invoke(
        app, ["backfill", str(tmp_path / "events.csv"), "--format", "csv", "--epochs", "2"], env=env
    )
    assert result.exit_code == 0, result.output
    assert list(Path(settings.run.data_dir, "checkpoints").glob("ckpt-*.pt"))

    trainer = build_trainer(settings, settings.kafka.bootstrap_servers)
    try:
        trainer.run(max_events=0)
        items = np.unique(chunk.item_ids)
        assert trainer.model.version > 0
        assert trainer.store.count(trainer.store.items) == len(items)
        rows = trainer.store.get(trainer.store.items, items.tolist())
        served = np.array([rows[i]["embedding"] for i in items.tolist()], np.float32)
        np.testing.assert_allclose(served, trainer.model.item_embeddings(items), atol=1e-5)
    finally:
        trainer.close()


def test_backfill_rejects_bad_epochs_and_never_replaces_checkpoints_silently(
    settings: Settings, tmp_path: Path
) -> None:
    rows = ["user_id,item_id,ts"] + [f"{u % 40},{u % 17},{u}" for u in range(600)]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    env = {"EBRFLOW_RUN__DATA_DIR": settings.run.data_dir, "EBRFLOW_MODEL__DIM": str(settings.model.dim)}
    args = ["backfill", str(tmp_path / "events.csv"), "--format", "csv"]
    runner = CliRunner()
    for bad in ("0", "-1"):
        result = runner.invoke(app, [*args, "--epochs", bad], env=env)
        assert result.exit_code == 2, result.output
    assert not Path(settings.run.data_dir, "checkpoints").exists() or not list(
        Path(settings.run.data_dir, "checkpoints").glob("ckpt-*.pt")
    )
    assert runner.invoke(app, [*args, "--epochs", "1"], env=env).exit_code == 0
    before = sorted(Path(settings.run.data_dir, "checkpoints").glob("ckpt-*.pt"))
    refused = runner.invoke(app, [*args, "--epochs", "1"], env=env)
    assert refused.exit_code == 78 and "--force" in refused.output
    assert sorted(Path(settings.run.data_dir, "checkpoints").glob("ckpt-*.pt")) == before
    assert runner.invoke(app, [*args, "--epochs", "1", "--force"], env=env).exit_code == 0
    assert len(list(Path(settings.run.data_dir, "checkpoints").glob("ckpt-*.pt"))) == len(before) + 1
