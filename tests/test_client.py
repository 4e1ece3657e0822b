"""The slim query client (``ebrflow.client``) on real Milvus Lite rows written by the real publisher path:
batch = per-user = brute force, scalar filters, unknown users, read-only opening, and a fresh venv with only
``ebrflow[client]`` (no torch) querying a ``milvus-lite server``."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ebrflow.client import NothingServed, QueryClient, UnknownUser
from ebrflow.indexer.generations import Generations
from ebrflow.indexer.milvus_store import MilvusStore, connect
from ebrflow.indexer.publisher import Publisher
from ebrflow.model.base import Batch
from ebrflow.model.prior import PopularityPrior
from ebrflow.model.two_tower import TwoTowerModel
from tests.faults import milvus_lite_server

ROOT = Path(__file__).resolve().parents[1]
PREFIX, K = "cl", 5
USERS, ITEMS, EVENTS = 40, 300, 3000


@dataclass
class Served:
    """What the publisher wrote: served vectors by id, version by item, seen items by user."""

    items: dict[int, np.ndarray]
    users: dict[int, np.ndarray]
    version: dict[int, int]
    seen: dict[int, set[int]]


def publish(uri: str) -> Served:
    """Train a two-tower model with the popularity prior on Zipf-popular events and publish it as generation 1;
    the even items are re-published at version 2 (a later batch touched them)."""
    rng = np.random.default_rng(7)
    users = rng.integers(0, USERS, EVENTS)
    items = np.minimum(rng.zipf(1.3, EVENTS) - 1, ITEMS - 1)
    model = PopularityPrior(TwoTowerModel(dim=7, device="cpu"), half_life=500, scale=0.1)
    for start in range(0, EVENTS, 500):
        model.fit_batch(Batch.of(users[start : start + 500], items[start : start + 500]))
    client = connect(uri)
    store = MilvusStore(client, model.dim, prefix=PREFIX)
    store.use_generation(1)
    publisher = Publisher(store)
    item_ids, user_ids = model.known_items(), model.known_users()
    item_vecs, user_vecs = model.item_embeddings(item_ids), model.user_embeddings(user_ids)
    publisher.publish(publisher.prepare(1, item_ids, item_vecs, user_ids, user_vecs, (users, items)))
    even = item_ids % 2 == 0
    empty = np.zeros(0, np.int64)
    publisher.publish(publisher.prepare(2, item_ids[even], item_vecs[even], empty, user_vecs[:0], (empty, empty)))
    store.flush_if_due(force=True)
    Generations(client, PREFIX).switch(1)
    client.close()
    return Served(
        dict(zip(item_ids.tolist(), item_vecs)),
        dict(zip(user_ids.tolist(), user_vecs)),
        {i: 2 if i % 2 == 0 else 1 for i in item_ids.tolist()},
        {u: set(publisher.seen.get(u).tolist()) for u in user_ids.tolist()},
    )


def brute_force(served: Served, query: np.ndarray, exclude: set[int], allowed: set[int] | None = None) -> list[int]:
    """Top-K item ids by inner product over the published vectors, as an exact index must return them."""
    ids = [i for i in served.items if i not in exclude and (allowed is None or i in allowed)]
    scores = np.array([served.items[i] for i in ids], np.float64) @ query.astype(np.float64)
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:K]]


def ids(recs: list) -> list[int]:  # noqa: ANN001
    return [r.item_id for r in recs]


def same(a: list, b: list) -> bool:  # noqa: ANN001
    """The same items in the same order with the same scores up to float32 rounding (a batched search sums in
    another order than a single one)."""
    return ids(a) == ids(b) and np.allclose([r.score for r in a], [r.score for r in b], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Served, Path]:
    db = tmp_path_factory.mktemp("client") / "milvus.db"
    return publish(str(db)), db


@pytest.fixture(scope="module")
def client(served: tuple[Served, Path]) -> QueryClient:
    c = QueryClient.from_uri(str(served[1]), prefix=PREFIX, prior_coordinate=True)
    yield c
    c.close()


def test_recommend_many_equals_recommend_and_the_exact_top_k_without_seen_items(served, client) -> None:  # noqa: ANN001
    data, _ = served
    asked = [*sorted(data.users), 3, 999_999]  # a repeat and an unknown user in the batch
    batch = client.recommend_many(asked, K)
    assert len(batch) == len(asked) and batch[-1] == []
    for user, recs in zip(asked[:-1], batch):
        assert same(recs, client.recommend(user, K))
        assert ids(recs) == brute_force(data, data.users[user], data.seen[user])
    # seen items do fill users' own tops (the retry path ran): without the exclusion the answers differ
    unexcluded = client.recommend_many(sorted(data.users), K, exclude_seen=False)
    assert sum(bool(set(ids(r)) & data.seen[u]) for u, r in zip(sorted(data.users), unexcluded)) > len(data.users) / 2


def test_scalar_filters_bind_their_parameters_and_keep_the_seen_exclusion(served, client) -> None:  # noqa: ANN001
    data, _ = served
    users = sorted(data.users)[:10]
    newer = client.recommend_many(users, K, filter="version >= {v}", filter_params={"v": 2})
    v2 = {i for i, v in data.version.items() if v >= 2}
    for user, recs in zip(users, newer):
        assert ids(recs) == brute_force(data, data.users[user], data.seen[user], v2)
        assert {data.version[i] for i in ids(recs)} == {2}
    wanted = sorted(data.items)[::3]
    picked = client.recommend(users[0], K, filter="id in {ids}", filter_params={"ids": wanted})
    assert ids(picked) == brute_force(data, data.users[users[0]], data.seen[users[0]], set(wanted))
    similar = client.similar_items(wanted[0], K, filter="version == {v}", filter_params={"v": 1})
    assert wanted[0] not in ids(similar) and {data.version[i] for i in ids(similar)} == {1}


def test_unknown_users_raise_get_nothing_or_get_the_served_popularity_ranking(served, client) -> None:  # noqa: ANN001
    data, _ = served
    with pytest.raises(UnknownUser):
        client.recommend(999_999, K)
    assert client.recommend(999_999, K, on_unknown="empty") == []
    prior_only = np.eye(1, len(data.users[0]), len(data.users[0]) - 1)[0]  # the last coordinate is log popularity
    popular = client.recommend(999_999, K, on_unknown="popular")
    assert ids(popular) == brute_force(data, prior_only, set())
    known = sorted(data.users)[0]
    mixed = client.recommend_many([999_998, known, 999_999], K, on_unknown="popular")
    assert all(same(a, b) for a, b in zip(mixed, [popular, client.recommend(known, K), popular]))
    odd = client.recommend(999_999, K, on_unknown="popular", filter="version == {v}", filter_params={"v": 1})
    assert ids(odd) == brute_force(data, prior_only, set(), {i for i, v in data.version.items() if v == 1})
    with pytest.raises(ValueError, match="recommend_many answers every user"):
        client.recommend_many([known], K, on_unknown="raise")
    with pytest.raises(ValueError, match="prior_coordinate"):
        QueryClient(client.client, PREFIX).recommend(999_999, K, on_unknown="popular")


def test_from_uri_creates_nothing(served, client, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(NothingServed):  # a Lite path that does not exist stays absent
        QueryClient.from_uri(str(tmp_path / "none" / "milvus.db"))
    assert list(tmp_path.iterdir()) == []
    before = (sorted(client.client.list_collections()), client.client.list_aliases())
    with pytest.raises(NothingServed):  # an existing database with nothing served under the prefix
        QueryClient(client.client, "other").recommend(0)
    assert (sorted(client.client.list_collections()), client.client.list_aliases()) == before
    items, users = client.collections()
    for name in (items, users):  # as after a Milvus restart: the client loads what it reads
        client.client.release_collection(name)
    assert client.recommend(sorted(served[0].users)[0], K)


def test_importing_the_client_imports_nothing_of_the_trainer() -> None:
    trainer = ["torch", "kafka", "prometheus_client", "river", "typer", "pydantic_settings", "scipy", "matplotlib"]
    code = (
        "import sys, ebrflow.client\n"
        "print([m for m in sys.modules if m.split('.')[0] in "
        f"{trainer!r} or m.startswith(('ebrflow.model', 'ebrflow.stream', 'ebrflow.ops', 'ebrflow.app'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def answers(client: QueryClient, users: list[int]) -> dict[str, list[list[list[float]]]]:
    """What the fresh venv and this process both answer, as JSON-able lists of [item_id, score]."""
    out = {
        "many": client.recommend_many(users, 5, on_unknown="popular"),
        "filtered": client.recommend_many(users, 5, filter="version >= {v}", filter_params={"v": 2}),
    }
    return {key: [[[r.item_id, r.score] for r in recs] for recs in value] for key, value in out.items()}


QUERY = f"""
import json, sys
from ebrflow.client import QueryClient
{inspect.getsource(answers)}
client = QueryClient.from_uri(sys.argv[1], prefix=sys.argv[2], prior_coordinate=True)
print(json.dumps(answers(client, json.loads(sys.argv[3]))))
"""


def test_a_fresh_venv_with_only_the_client_extra_queries_a_milvus_lite_server(tmp_path: Path) -> None:
    """``pip install '<checkout>[client]'`` (non-editable, from a copy: the repo gets no build/ or egg-info) into a
    venv without torch answers as the in-process client does, through ``milvus-lite server``."""
    started = time.monotonic()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("ebrflow", "stream", "model", "indexer", "ops"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    run = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path, "timeout": 600}  # not the checkout
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source}[client]"], **run)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert "BuildBackendWarning" not in installed.stderr, installed.stderr[-2000:]  # SPDX license, data declared
    assert subprocess.run([str(python), "-c", "import torch"], **run).returncode != 0
    command = subprocess.run([str(venv / "bin" / "ebrflow"), "--help"], **run)
    assert command.returncode == 69 and command.stdout == ""
    assert command.stderr.strip().splitlines() == [command.stderr.strip()] and "ebrflow[train]" in command.stderr

    with milvus_lite_server(tmp_path / "milvus") as uri:
        data = publish(uri)
        users = [*sorted(data.users)[:8], 999_999]
        args = [uri, PREFIX, json.dumps(users)]
        fresh = subprocess.run([str(python), "-c", QUERY, *args], **run)
        assert fresh.returncode == 0, fresh.stderr[-2000:]
        here = QueryClient.from_uri(uri, prefix=PREFIX, prior_coordinate=True)
        expected = answers(here, users)
        here.close()
    assert json.loads(fresh.stdout) == expected
    many = expected["many"]
    assert all(len(recs) == 5 for recs in many) and many[-1] != []  # the unknown user got the popular items
    print(f"fresh-venv client test: {time.monotonic() - started:.0f} s")
