"""Every benchmark suite's --smoke mode runs end to end into a tmp dir and writes finite numbers; the shared
evaluation and the vectorised river scoring are checked against hand-computed answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.common import DATASETS, evaluate_stream
from bench.scorers import PopularityScorer, river_factory, river_scores
from ebrflow.stream.generator import EventArrays

COMMON_KEYS = {"suite", "title", "command", "machine", "settings", "results", "tables", "notes", "plots", "wall_s"}


def numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def load(out: Path, suite: str) -> dict:
    payload = json.loads((out / f"{suite}.json").read_text())
    assert COMMON_KEYS <= set(payload), set(COMMON_KEYS) - set(payload)
    assert payload["smoke"] is True and payload["tables"]
    assert (out / f"{suite}.md").read_text().startswith("## ")
    for plot in payload["plots"]:
        assert (out / plot).stat().st_size > 0
    return payload


def finite(*values: Any) -> None:
    for v in values:
        assert v is not None and math.isfinite(v), v


def test_shared_evaluation_by_hand() -> None:
    # batch 1: u1→10, u1→11, u2→10 ; batch 2: u1→10 (repeat: not scored), u2→11 (scored), u3→10 (new user: miss)
    events = EventArrays(np.array([1, 1, 2, 1, 2, 3]), np.array([10, 11, 10, 10, 11, 10]), np.arange(6, dtype=np.int64))
    res = evaluate_stream(events, PopularityScorer("pop", half_life=None), batch_size=3, k=1)
    first, second = res.per_batch
    assert (first.n, first.hits) == (3, 0)  # nothing seen before: every user is new
    # u2 has seen 10, so its top-1 is 11 → hit at rank 0; u3 is unknown → miss; u1's repeat is not scored
    assert (second.n, second.hits, second.n_new_user) == (2, 1, 1)
    assert second.ndcg == pytest.approx(1.0)
    assert res.total()["recall"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("kind", ["FunkMF", "BiasedMF"])
def test_river_vectorised_scores_equal_predict_one(kind: str) -> None:
    model = river_factory(kind, n_factors=4, lr=0.05)
    rng = np.random.default_rng(0)
    for u, i in zip(rng.integers(0, 20, 300).tolist(), rng.integers(0, 30, 300).tolist()):
        model.learn_one(u, i, float(rng.random() < 0.5))
    users, items = np.array([0, 3, 7]), np.array([1, 2, 5, 29])
    fast = river_scores(model, users, items)
    slow = np.array([[model.predict_one(u, i) for i in items.tolist()] for u in users.tolist()])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_quality_smoke(tmp_path: Path) -> None:
    if not all(path.exists() for path, _ in DATASETS.values()):
        pytest.skip("shared datasets not available beside the checkout")
    from bench import quality

    assert quality.main(["--smoke", "--out", str(tmp_path)]) == 0
    p = load(tmp_path, "quality")
    for name in DATASETS:
        res = p["results"][name]
        assert res["scored_events"] > 0
        assert {"ebrflow SSMTL — shipped default", "river FunkMF (defaults)", "river BiasedMF (defaults)"} <= set(
            res["methods"]
        )
        assert {"most popular recently (defaults)", "item-kNN cosine (defaults)"} <= set(res["methods"])
        roles = [m["role"] for m in res["methods"].values()]
        assert roles.count("default") == 1 and set(roles) <= {"default", "variant", "peer"}
        for m in res["methods"].values():
            finite(m["all"]["recall"], m["all"]["ndcg"], m["learn_s"], m["score_s"])
            assert 0.0 <= m["all"]["recall"] <= 1.0


def test_throughput_smoke(tmp_path: Path) -> None:
    from bench import throughput

    assert throughput.main(["--smoke", "--out", str(tmp_path)]) == 0
    p = load(tmp_path, "throughput")
    m = p["results"]["measurements"]
    for prefix in (
        "ingest: kafka-python consume (raw)",
        "compute: TwoTowerModel.fit_batch",
        "river BiasedMF.learn_one",
        "end to end: ebrflow two_tower",
    ):
        (key,) = [k for k in m if k.startswith(prefix)]
        s = m[key]["events_per_s"]
        finite(s["median"], s["min"], s["max"])
        assert s["median"] > 0
        if prefix.startswith("end to end"):
            assert m[key]["extra"][0]["events"] == p["settings"]["events"]
    for row in p["results"]["e2e"]:
        assert {"model", "threads", "end_to_end_eps", "ingest_eps", "compute_eps"} <= set(row)
        finite(row["end_to_end_eps"], row["ingest_eps"], row["compute_eps"])
    finite(*p["results"]["ssmtl_over_two_tower_compute"].values())


def test_freshness_smoke(tmp_path: Path) -> None:
    from bench import freshness

    assert freshness.main(["--smoke", "--out", str(tmp_path)]) == 0
    p = load(tmp_path, "freshness")
    (r,) = p["results"].values()
    assert r["sampled"] > 0 and r["found"] == r["sampled"]
    finite(*r["latency_s"].values(), r["rate_achieved"])
    assert 0 < r["latency_s"]["p50"] < 30


def test_variants_smoke(tmp_path: Path) -> None:
    from bench import variants

    assert variants.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = load(tmp_path, "variants")["results"]
    assert [r["variants"] for r in results.values()] == [0, 1, 2]
    finite(*(r["events_per_s"] for r in results.values()))


def test_ranks_smoke(tmp_path: Path) -> None:
    from bench import ranks

    assert ranks.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = load(tmp_path, "ranks")["results"]
    assert [len(results["ranks"][w]) for w in ("1", "2")] == [1, 2]
    two = results["ranks"]["2"]
    assert sum(r["events"] for r in two) == results["ranks"]["1"][0]["events"]  # the same stream, split by user
    finite(*(r["comm_s"] for r in two), results["sharded_bytes_per_event"])


def test_scale_smoke(tmp_path: Path) -> None:
    from bench import scale

    assert scale.main(["--smoke", "--out", str(tmp_path)]) == 0
    p = load(tmp_path, "scale")
    (row,) = p["results"]["train"]
    finite(row["train_us_per_event"], row["publish_us_per_event"], row["peak_rss_mib"])
    assert row["events"] == p["settings"]["events"] and row["peak_rss_mib"] > 0
    for size in p["results"]["upsert"].values():
        finite(size["upsert_1000_existing_s"]["median"], size["search_top20_s"]["median"])
    assert all(math.isfinite(x) for x in numbers(p["results"]))
    # one row per model variant (default and warm refit), same graph; the warm one's timed refit follows a first fit
    default, warm = p["results"]["graph"]
    assert (default["variant"], default["spectral_iters"]) == ("default", 0)
    assert warm["model_options"] == {"spectral_iters": 1} and warm["spectral_iters"] == 1
    assert warm["prime_edges"] == default["prime_edges"] < warm["edges"] == default["edges"]
    for graph in (default, warm):
        finite(graph["total_us_per_event"], graph["steady_us_per_event"], graph["refit_s"], graph["peak_rss_mib"])
        assert graph["live_nodes"] > 0 and graph["window_events"] == p["settings"]["graph_events"]
    # a partial run re-measures only its sweep and keeps the others from the existing scale.json
    assert scale.main(["--smoke", "--sweeps", "graph", "--out", str(tmp_path)]) == 0
    q = load(tmp_path, "scale")
    assert q["results"]["train"] == p["results"]["train"] and q["results"]["upsert"] == p["results"]["upsert"]
    assert q["results"]["provenance"]["train"]["started_utc"] == p["started_utc"] != q["started_utc"]
    assert set(q["results"]["provenance"]) == {"graph", "train", "upsert"}
    assert len(q["tables"]) == 3


def test_the_docs_and_suite_pages_show_what_bench_report_renders_from_the_committed_results() -> None:
    """No number in the docs' results blocks or a suite's page is typed by hand: each is what ``python -m
    bench.report`` renders from the committed JSON (run it after changing either)."""
    from bench import report
    from bench.output import RESULTS_DIR, render_markdown

    docs = [
        doc for doc in [*sorted(report.DOCS_DIR.glob("*.md")), report.README] if report.BLOCK.search(doc.read_text())
    ]
    assert {doc.name for doc in docs} >= {"benchmarks.md", "scaling.md", "README.md"}
    for doc in docs:
        text, prefix = doc.read_text(), "bench/results/" if doc == report.README else "../bench/results/"
        assert report.spliced(text, RESULTS_DIR, prefix) == text, f"{doc.name}: run python -m bench.report"
    for path in [*RESULTS_DIR.glob("*.json"), *RESULTS_DIR.glob("*/*.json")]:
        payload = json.loads(path.read_text())
        if "tables" in payload and "command" in payload:
            assert path.with_suffix(".md").read_text() == render_markdown(payload) + "\n", path.name


def test_report_splices_results_into_a_doc(tmp_path: Path) -> None:
    from bench import report

    table = {"title": "T", "columns": ["a"], "rows": [["1"]], "note": ""}
    fake = {"suite": "demo", "title": "Demo", "command": "python -m bench.demo", "machine": {}, "wall_s": 1.0}
    fake.update(tables=[table], notes=["n"], plots=[])
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    (results / "demo.json").write_text(json.dumps(fake))
    (docs / "page.md").write_text("# Page\n\n<!-- results:start demo -->\nstale 0.5\n<!-- results:end -->\nafter\n")
    assert report.main(["--out", str(results), "--docs", str(docs)]) == 0
    page = (docs / "page.md").read_text()
    assert "stale" not in page and "## Demo" in page and "| 1 |" in page and page.endswith("after\n")
    assert "../results/demo.json" in page and (results / "demo.md").exists()


def test_report_collects_results(tmp_path: Path) -> None:
    from bench import report

    fake = {
        "suite": "demo",
        "title": "Demo",
        "command": "python -m bench.demo",
        "machine": {"nproc": 2},
        "tables": [{"title": "T", "columns": ["a"], "rows": [["1"]], "note": ""}],
        "notes": [],
        "plots": [],
        "wall_s": 1.0,
    }
    (tmp_path / "demo.json").write_text(json.dumps(fake))
    (tmp_path / "other.json").write_text(json.dumps({"recall": 0.1, "nested": {"ndcg": 0.2}}))
    assert report.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "# Results" in text and "`python -m bench.demo`" in text and "| 1 |" in text
    assert "nested.ndcg" in text and "2 logical CPUs" in text


def test_a_ratio_under_its_target_never_prints_as_the_target() -> None:
    from bench.throughput import compute_ratio_note

    assert compute_ratio_note({1: 0.3456, 2: 0.36}) == (
        "SSMTL compute / two-tower compute (target ≥ 0.35): 0.346 at 1 thread(s) (missed), 0.36 at 2 thread(s) (met)."
    )


def test_quality_rows_name_every_setting_that_differs_from_the_shipped_defaults() -> None:
    from bench.quality import DEFAULT_MAX_EVENTS, SHIPPED, ebrflow_families

    for dataset in ("movielens", "collegemsg"):
        families = ebrflow_families(dataset, smoke=False)
        shipped = [f for f in families if f.name == SHIPPED]
        assert len(shipped) == 1 and shipped[0].settings == {} and shipped[0].batch_size is None
        in_trainer_batches = [f for f in families if f.batch_size is not None]
        assert [(f.settings, f.batch_size, f.role) for f in in_trainer_batches] == [({}, DEFAULT_MAX_EVENTS, "default")]
        assert f"{DEFAULT_MAX_EVENTS:,}" in in_trainer_batches[0].name
        for f in families:
            assert ("graph = user_user" in f.name) == (f.settings.get("graph") == "user_user"), f.name
            assert f.name == SHIPPED or f.settings or f.batch_size, f"{f.name}: a variant that changes nothing"


def test_targets_are_computed_from_the_results_and_say_missed_below_a_target(tmp_path: Path) -> None:
    """The README's targets table: a default under its no-steps variant on cold users, or a Gowalla recall under
    0.183, is printed as missed with the measured figure; a met one as met."""
    from bench import targets

    def method(role: str, all_: float, cold: float) -> dict:
        return {"role": role, "all": {"recall": all_}, "cold": {"recall": cold}}

    methods = {
        targets.SHIPPED: method("default", 0.20, 0.10),
        targets.NO_STEPS: method("variant", 0.19, 0.099),
        "some peer": method("peer", 0.10, 0.12),
    }
    (tmp_path / "quality.json").write_text(json.dumps({"results": {"stream": {"methods": methods}}}))
    rows = [
        {"variant": "default", "recall@20": 0.17, "ndcg@20": 0.16},
        {"variant": "default-no-steps", "recall@20": 0.1, "ndcg@20": 0.08},
    ]
    (tmp_path / "gowalla.json").write_text(json.dumps({"results": rows}))
    table = targets.render(tmp_path)
    assert "| stream: default ÷ no gradient steps ≥ 1.00 (all), ≥ 1.03 (cold) | 1.053 / 1.010 | **missed** |" in table
    assert "| stream: default ÷ best peer ≥ 1.10 (all), ≥ 1.00 (cold) | 2.000 / 0.833 | **missed** |" in table
    assert "| Gowalla Recall@20 ≥ 0.183, NDCG@20 ≥ 0.155 | 0.1700 / 0.1600 | **missed** |" in table
    assert "| Gowalla: default ÷ no gradient steps ≥ 1.5 | 1.70 | met |" in table
