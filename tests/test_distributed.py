"""Data-parallel SSMTL on 2 gloo ranks over loopback: replicas stay bit-identical and learn as well as one process."""

from __future__ import annotations

import numpy as np

from bench.common import evaluate_stream
from bench.scorers import ModelScorer
from ebrflow.model.distributed import owner
from tests.distributed_harness import events, run_diverge, run_grow, run_ranks, small_model

N_EVENTS, BATCH = 12_000, 1024


def test_owner_splits_ids_evenly_and_stably() -> None:
    ids = np.arange(0, 200_000, 2, dtype=np.int64)  # even ids only: a plain ``id % 2`` would give one rank all
    counts = np.bincount(owner(ids, 2), minlength=2)
    assert abs(counts[0] - counts[1]) < 0.02 * len(ids)
    assert (owner(ids, 2) == owner(ids.copy(), 2)).all()
    assert set(owner(ids, 3).tolist()) == {0, 1, 2}


def test_two_ranks_stay_identical_and_match_single_process_recall(tmp_path) -> None:
    ranks = run_ranks(2, tmp_path, N_EVENTS, BATCH, skew_every=4)  # every 4th step rank 1 has no events
    assert ranks[0]["digest"] == ranks[1]["digest"]  # parameters, optimiser moments, graph: bit-identical
    assert ranks[0]["version"] == ranks[1]["version"] > 0
    single = evaluate_stream(events(N_EVENTS), ModelScorer("one", small_model()), batch_size=BATCH, k=20, sample=64)
    one, two = single.total()["recall"], ranks[0]["recall"]
    assert one > 0.05
    assert abs(two - one) < 0.04, (one, two)  # ~3 standard errors of 768 scored events
    sent = sum(r["bytes_events"] for r in ranks) / N_EVENTS  # all ranks' event payload per event
    assert 32 <= sent < 64  # 32 bytes per event, padding to the largest rank's slice (the skewed steps), headers


def test_a_diverged_replica_is_detected_and_resynced_from_rank_0(tmp_path) -> None:
    ranks = run_diverge(tmp_path)
    assert [r["checks"] for r in ranks] == [[True, False, True]] * 2  # agreed, diverged (repaired), agreed again
    assert ranks[0]["digest"] == ranks[1]["digest"]  # and they keep training identically after the reload


def test_restore_takes_the_newest_common_step_and_a_new_rank_receives_it(tmp_path) -> None:
    ranks = run_grow(tmp_path)  # rank 1 saved step 1 only; rank 2 is new (no checkpoints)
    assert [(r["step"], r["offsets"]) for r in ranks] == [(1, 100)] * 3
    assert len({r["digest"] for r in ranks}) == 1  # one replica everywhere (the new rank's came by broadcast)
    assert ranks[2]["restored_version"] == ranks[0]["versions"][0] < ranks[0]["versions"][1]  # that of step 1
