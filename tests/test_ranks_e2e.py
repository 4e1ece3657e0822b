"""Two trainer ranks (``ebrflow run --ranks 2``: torchrun, gloo over loopback) on a 4-partition topic of the real
embedded broker, writing one ``milvus-lite server``: every event trained at least once, both replicas end equal,
Milvus equals the model, and a SIGKILLed rank makes torchrun restart the group with nothing lost."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from ebrflow.app import build_model
from ebrflow.config import load_settings
from ebrflow.model.checkpoint import CheckpointStore
from ebrflow.model.distributed import owner, replica_digest
from ebrflow.stream.broker import EmbeddedBroker
from tests.crash_harness import coverage, produce_fast, write_config
from tests.distributed_harness import run_rebalance
from tests.faults import milvus_lite_server

N = 12_000


def _ranks_cmd(cfg: Path, idle_exit: float) -> list[str]:
    return [sys.executable, "-m", "ebrflow.cli", "run", "-c", str(cfg), "--ranks", "2", "--idle-exit", str(idle_exit)]


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` started by ``agent`` (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def _wait_for_checkpoint(data: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> bool:
    """Wait until every rank saved a checkpoint and then trained a few more batches (or the job exited): a kill
    then loses trained, unsaved work."""

    def trained_lines() -> int:
        return sum(len(p.read_text().splitlines()) for p in data.glob("rank*/processed.log"))

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if all(any((data / f"rank{r}" / "checkpoints").glob("ckpt-*.pt")) for r in (0, 1)):
            at_checkpoint = trained_lines()
            while time.monotonic() < deadline and proc.poll() is None:
                if trained_lines() >= at_checkpoint + 3:
                    return True
                time.sleep(0.05)
            return False
        time.sleep(0.1)
    return False


def _audit(data: Path, topic: str) -> dict[int, np.ndarray]:
    """Times each offset was trained, per partition, over every rank's audit log."""
    total: dict[int, np.ndarray] = {}
    for log in sorted(data.glob("rank*/processed.log")):
        for p, counts in coverage(log, topic).items():
            arr = total.setdefault(p, np.zeros(0, np.int64))
            if len(counts) > len(arr):
                arr = total[p] = np.concatenate([arr, np.zeros(len(counts) - len(arr), np.int64)])
            arr[: len(counts)] += counts
    return total


def _final_models(cfg: Path, data: Path) -> list:
    """Each rank's newest checkpoint loaded into a fresh model, built as the trainer builds it."""
    settings = load_settings(cfg)
    models = []
    for rank in (0, 1):
        model = build_model(settings.model, settings.run.expire_after_s)  # with expiry: its graph TTL
        model.load_state_dict(CheckpointStore(data / f"rank{rank}" / "checkpoints").load_latest()["model"])
        models.append(model)
    return models


def _client(uri: str) -> MilvusClient:
    """A client of the test's Milvus server; retried: pymilvus shares one channel per address, and the server
    drops an idle one ("too many pings") while the ranks run, which the first reconnect may not survive."""
    for _ in range(5):
        try:
            return MilvusClient(uri=uri)
        except Exception:  # noqa: BLE001 - retried below
            time.sleep(1)
    return MilvusClient(uri=uri)


def _check_milvus_equals(model, uri: str) -> None:  # noqa: ANN001
    client = MilvusClient(uri=uri, timeout=60, dedicated=True)  # a fresh connection, closed by close()
    try:
        for role, ids, embed in (
            ("items", model.known_items(), model.item_embeddings),
            ("users", model.known_users(), model.user_embeddings),
        ):
            rows = client.query(
                f"ebrflow_{role}", filter="id >= 0", output_fields=["id", "embedding", "version"], limit=16384
            )
            assert len(rows) == len(ids), role
            got = {int(r["id"]): np.asarray(r["embedding"], np.float32) for r in rows}
            want = embed(ids)
            assert np.allclose(np.stack([got[int(i)] for i in ids]), want, atol=1e-5), role
            assert {int(r["version"]) for r in rows} == {model.version}, role
    finally:
        client.close()


def test_two_ranks_train_every_event_into_one_model(broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic, data = "ranks.events", tmp_path / "data"
    with milvus_lite_server(tmp_path / "milvus") as uri:
        cfg = write_config(
            tmp_path / "t.toml", broker.bootstrap_servers, topic, "ranks-group", data,
            milvus={"uri": uri, "flush_interval_s": 10}, batch={"max_events": 512, "max_wait_ms": 300},
            run={"checkpoint_every_batches": 5},
        )  # fmt: skip
        produced = produce_fast(broker.bootstrap_servers, topic, N, partitions=[0, 1, 2, 3])
        done = subprocess.run(_ranks_cmd(cfg, 8), capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        audit = _audit(data, topic)
        for p, n in produced.items():
            assert len(audit.get(p, [])) == n and (audit[p] >= 1).all(), p  # every offset trained at least once
        per_rank = [sum(len(c) for c in coverage(data / f"rank{r}" / "processed.log", topic).values()) for r in (0, 1)]
        assert min(per_rank) > 0  # the group split the partitions: both ranks consumed
        models = _final_models(cfg, data)
        assert replica_digest(models[0]) == replica_digest(models[1])
        _check_milvus_equals(models[0], uri)
        _check_one_writer(done.stdout + done.stderr, models[0])
    # the same stream through one trainer (own group, Milvus Lite, data): prequential recall within noise
    single_cfg = write_config(tmp_path / "single.toml", broker.bootstrap_servers, topic, "single-group",
                              tmp_path / "single", batch={"max_events": 512, "max_wait_ms": 300})  # fmt: skip
    single = [sys.executable, "-m", "ebrflow.cli", "run", "-c", str(single_cfg), "--idle-exit", "8"]
    one = subprocess.run(single, capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stderr[-3000:]
    recall_one = _recall(one.stdout + one.stderr, r"consumed [\d,]+ .*?Recall@20 ([\d.]+)")
    recall_ranks = _recall(done.stdout + done.stderr, r"rank 0: consumed.*?Recall@20 ([\d.]+)")
    print(f"prequential Recall@20: 2 ranks {recall_ranks:.3f}, one trainer {recall_one:.3f}")
    assert recall_ranks > 0.05 and abs(recall_ranks - recall_one) < 0.05, (recall_ranks, recall_one)


def _recall(output: str, pattern: str) -> float:
    """The Recall@K a closing line reports."""
    found = re.findall(pattern, " ".join(output.split()))
    assert found, output[-2000:]
    return float(found[-1])


def _check_one_writer(output: str, model) -> None:  # noqa: ANN001
    """Each rank's closing line names the ids it published; they are exactly its ``owner`` share, and together all."""
    flat = " ".join(output.split())  # the console wraps long lines
    found = re.findall(r"rank (\d): consumed.*?owns ([\d,]+) items and ([\d,]+) users", flat)
    owns = {int(r): (int(i.replace(",", "")), int(u.replace(",", ""))) for r, i, u in found}
    assert sorted(owns) == [0, 1], output[-2000:]
    for r, (items, users) in owns.items():
        assert items == int((owner(model.known_items(), 2) == r).sum())
        assert users == int((owner(model.known_users(), 2) == r).sum())
    assert sum(i for i, _ in owns.values()) == len(model.known_items())


def test_a_sigkilled_rank_restarts_the_group_and_nothing_is_lost(broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic, data = "ranks-crash.events", tmp_path / "data"
    with milvus_lite_server(tmp_path / "milvus") as uri:
        cfg = write_config(
            tmp_path / "t.toml", broker.bootstrap_servers, topic, "ranks-crash", data,
            milvus={"uri": uri, "flush_interval_s": 10}, batch={"max_events": 512, "max_wait_ms": 300},
            run={"checkpoint_every_batches": 5},
        )  # fmt: skip
        produced = produce_fast(broker.bootstrap_servers, topic, 3 * N, partitions=[0, 1, 2, 3])
        log = (tmp_path / "ranks.log").open("w")
        proc = subprocess.Popen(_ranks_cmd(cfg, 10), stdout=log, stderr=subprocess.STDOUT)
        try:
            assert _wait_for_checkpoint(data, proc), (tmp_path / "ranks.log").read_text()[-3000:]
            victim = _worker_pid(proc.pid, 1)
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            assert proc.wait(timeout=400) == 0, (tmp_path / "ranks.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = (tmp_path / "ranks.log").read_text()
        assert "exitcode: -9" in text  # torchrun saw the killed rank and restarted the group (rc 0 above)
        audit = _audit(data, topic)
        for p, n in produced.items():
            assert len(audit.get(p, [])) == n and (audit[p] >= 1).all(), p
        models = _final_models(cfg, data)
        assert replica_digest(models[0]) == replica_digest(models[1])
        _check_milvus_equals(models[0], uri)


def test_partitions_move_between_ranks_during_a_run_and_nothing_is_lost(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Rank 1's consumer leaves and rejoins its group mid-run: its partitions move to rank 0 and back while both
    keep stepping. Every offset is trained, the replicas end equal and Milvus equals the model; each rank serves
    /metrics and /readyz on metrics.port + rank, with the recall guard, a shadow variant and expiry on (ids unseen
    for 300 s of the stream's 1,200 s leave every replica and their owners' Milvus rows)."""
    topic, data = "ranks-move.events", tmp_path / "data"
    port = _two_free_ports()
    with milvus_lite_server(tmp_path / "milvus") as uri:
        cfg = write_config(
            tmp_path / "t.toml", broker.bootstrap_servers, topic, "ranks-move", data,
            milvus={"uri": uri, "flush_interval_s": 10}, batch={"max_events": 256, "max_wait_ms": 300},
            run={"checkpoint_every_batches": 5, "expire_after_s": 300.0}, metrics={"port": port, "eval_sample": 32},
            guard={"enabled": True},
        )  # fmt: skip
        with cfg.open("a") as f:
            f.write('[model.variants.tt]\nkind = "two_tower"\ndim = 8\n')
        produced = produce_fast(broker.bootstrap_servers, topic, 2 * N, partitions=[0, 1, 2, 3])
        ranks = run_rebalance(cfg, tmp_path, leave_after=4, away_s=60.0)
        audit = _audit(data, topic)
        for p, n in produced.items():
            assert len(audit.get(p, [])) == n and (audit[p] >= 1).all(), p  # every offset trained at least once
        models = _final_models(cfg, data)
        assert replica_digest(models[0]) == replica_digest(models[1])
        _check_milvus_equals(models[0], uri)
        variant_rows = _client(uri).query("ebrflow_v_tt_items", filter="id >= 0", output_fields=["id"], limit=16384)
        assert len(variant_rows) == len(models[0].known_items())  # both ranks wrote their share of the variant's
    first_of_rank1 = next((set(parts) for parts in ranks[1]["held"] if parts), set())
    moved = first_of_rank1 & set(coverage(data / "rank0" / "processed.log", topic))  # rank 0 trained them too
    print(f"partitions held over time: rank 0 {ranks[0]['held']}, rank 1 {ranks[1]['held']}")
    assert first_of_rank1 and moved, "no partition moved from rank 1 to rank 0"
    assert len(ranks[1]["held"]) >= 3 and ranks[1]["held"][-1], "rank 1 got partitions again after it rejoined"
    assert [r["port"] for r in ranks] == [port, port + 1]
    assert all(r["probes"] == {"metrics": 200, "readyz": 200} for r in ranks), [r["probes"] for r in ranks]
    assert sum(r["trained"] for r in ranks) >= sum(produced.values())
    assert all(r["expired"] > 0 for r in ranks), [r["expired"] for r in ranks]  # each rank deleted rows it owns


def _two_free_ports() -> int:
    """A port P with P + 1 free as well (rank r serves metrics on P + r)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise RuntimeError("no two consecutive free ports")
