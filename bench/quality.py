"""Prequential Recall@20 / NDCG@20 of ebrflow vs river and a popularity baseline on MovieLens-100K and CollegeMsg.

Usage: ``python -m bench.quality`` (both datasets, ~15 min on 2 cores) or ``--smoke`` (first 3,000 events,
one configuration per method). Every method sees the same events in the same order in micro-batches of
``--batch-size`` and is scored by ``bench.common.evaluate_stream`` (test-then-train).

Tuning: baselines (and ebrflow's TwoTower) get a small grid; each grid point runs on the first
``--tune-fraction`` of the stream only, the best Recall@20 there is then run on the whole stream. Metrics
are also reported on the part of the stream after the tuning window (never used for selection).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import DATASETS, StreamResult, evaluate_stream, load_dataset
from bench.output import Run, add_common_args, table
from bench.plots import lines_over_time
from bench.scorers import ModelScorer, PopularityScorer, RiverScorer, river_factory
from stream.generator import EventArrays

Params = dict[str, Any]


@dataclass
class Family:
    """A method: how to build it from params, its default params, and the grid tuned on the stream's head."""

    name: str
    build: Callable[[Params], Any]
    default: Params
    grid: list[Params]


def _label(params: Params) -> str:
    return ", ".join(f"{k}={'default' if v is None else v}" for k, v in params.items()) or "defaults"


def _grid(**axes: Sequence[Any]) -> list[Params]:
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _ssmtl_error() -> str | None:
    try:
        importlib.import_module("model.ssmtl").SSMTLModel  # noqa: B018 - plugged in by name, may not exist yet
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def app_model(kind: str, params: Params) -> Any:
    """The model exactly as ``ebrflow.app.build_model`` builds it (app defaults + ``params``), on CPU."""
    from ebrflow.app import build_model
    from ebrflow.config import ModelConfig

    return build_model(ModelConfig(kind=kind, device="cpu", seed=0, **params))


def families(dataset: str, smoke: bool, with_ssmtl: bool) -> tuple[list[Family], list[str]]:
    """Every compared method for ``dataset`` (small grids under ``smoke``) plus notes on what was skipped."""
    notes: list[str] = []
    river_grid = (
        _grid(n_factors=[10], lr=[0.05], negatives=[1])
        if smoke
        else _grid(n_factors=[10, 32], lr=[0.01, 0.05, 0.1], negatives=[0, 1, 4])
    )
    out = [
        Family(
            "ebrflow TwoTower",
            lambda p: ModelScorer("ebrflow TwoTower", app_model("two_tower", p)),
            {},
            [{}] if smoke else _grid(lr=[0.05, 0.2], steps_per_batch=[1, 3]),
        ),
        Family(
            "ebrflow TwoTower, no popularity prior",
            lambda p: ModelScorer("two_tower-no-prior", app_model("two_tower", {"popularity_half_life": 0, **p})),
            {},
            [],
        ),
    ]
    error = _ssmtl_error() if with_ssmtl else None
    if error is not None:
        notes.append(f"ebrflow SSMTL not run: model.ssmtl is not importable ({error}).")
    elif with_ssmtl:
        out.append(Family("ebrflow SSMTL", lambda p: ModelScorer("ebrflow SSMTL", app_model("ssmtl", p)), {}, []))
        if dataset == "collegemsg":
            uu = {"options": {"graph_mode": "user_user", "symmetric": True}}
            out.append(
                Family(
                    "ebrflow SSMTL (user_user graph, symmetric)",
                    lambda p: ModelScorer("ssmtl-uu", app_model("ssmtl", {**uu, **p})),
                    {},
                    [],
                )
            )
    for kind, default_lr in (("FunkMF", 0.1), ("BiasedMF", 0.01)):  # river 0.26.1 defaults: SGD(0.1) / SGD()
        out.append(
            Family(
                f"river {kind}",
                lambda p, kind=kind: RiverScorer(
                    kind, river_factory(kind, p.get("n_factors"), p.get("lr")), p.get("negatives", 1)
                ),
                {"n_factors": 10, "lr": default_lr, "negatives": 1},
                river_grid,
            )
        )
    out.append(
        Family(
            "most popular recently",
            lambda p: PopularityScorer("popular", None if p["half_life"] == "all-time" else p["half_life"]),
            {"half_life": 5000},
            [{"half_life": 5000}] if smoke else _grid(half_life=[1000, 5000, 20000, "all-time"]),
        )
    )
    return out, notes


def _head(events: EventArrays, n: int) -> EventArrays:
    return EventArrays(events.user_ids[:n], events.item_ids[:n], events.ts_ms[:n])


def tune(family: Family, head: EventArrays, batch_size: int, k: int) -> tuple[Params, list[dict[str, Any]]]:
    """Run every grid point on ``head``; the best Recall@20 (NDCG@20 breaks ties) wins."""
    rows = []
    for params in family.grid:
        t0 = time.monotonic()
        total = evaluate_stream(head, family.build(params), batch_size, k).total()
        wall = time.monotonic() - t0
        rows.append({"params": params, "recall": total["recall"], "ndcg": total["ndcg"], "wall_s": wall})
    best = max(rows, key=lambda r: ((r["recall"] or 0.0), (r["ndcg"] or 0.0)))
    return best["params"], rows


def run_full(family: Family, params: Params, events: EventArrays, batch_size: int, k: int, tune_batches: int) -> dict:
    """One method on the whole stream: totals overall, cold, after the tuning window; timings; the result."""
    t0 = time.monotonic()
    res = evaluate_stream(events, family.build(params), batch_size, k)
    return {
        "config": _label(params),
        "params": params,
        "all": res.total(),
        "cold": res.total(cold=True),
        "after_tuning_window": res.total(start=tune_batches),
        "learn_s": res.learn_s,
        "score_s": res.score_s,
        "wall_s": time.monotonic() - t0,
        "_result": res,
    }


def run_dataset(name: str, args: argparse.Namespace, run: Run) -> dict[str, Any]:
    events = load_dataset(name, limit=args.limit)
    n_head = int(len(events) * args.tune_fraction)
    tune_batches = n_head // args.batch_size
    head = _head(events, tune_batches * args.batch_size)
    fams, notes = families(name, args.smoke, not args.no_ssmtl)
    run.payload["notes"] += [f"{name}: {n}" for n in notes]
    methods: dict[str, dict] = {}
    tuning: dict[str, list] = {}
    for fam in fams:
        print(f"[quality] {name}: {fam.name}", flush=True)
        chosen = [("defaults", fam.default)]
        if len(fam.grid) > 1:
            best, rows = tune(fam, head, args.batch_size, args.k)
            tuning[fam.name] = [{**r, "config": _label(r["params"])} for r in rows]
            if best != fam.default:
                chosen.append((f"tuned on first {args.tune_fraction:.0%}", best))
        for tag, params in chosen:
            methods[f"{fam.name} ({tag})"] = run_full(fam, params, events, args.batch_size, args.k, tune_batches)
    any_res: StreamResult = next(iter(methods.values()))["_result"]
    scored = sum(b.n for b in any_res.per_batch)
    new_user = sum(b.n_new_user for b in any_res.per_batch)
    series = {m: v.pop("_result").rolling_recall(args.window) for m, v in methods.items()}
    plot = lines_over_time(
        run.path(f"quality_{name}.png"),
        series,
        f"{name}: prequential Recall@{args.k}, rolling over {args.window} batches of {args.batch_size}",
        f"Recall@{args.k}",
    )
    run.payload["plots"].append(plot.name)
    return {
        "events": len(events),
        "batches": -(-len(events) // args.batch_size),
        "tuning_events": len(head),
        "scored_events": scored,
        "scored_from_new_users": new_user,
        "methods": methods,
        "tuning": tuning,
    }


def tables_for(name: str, res: dict[str, Any], k: int, tune_fraction: float) -> list[dict]:
    rows = []
    for method, m in sorted(res["methods"].items(), key=lambda kv: -(kv[1]["all"]["recall"] or 0.0)):
        a, c, after = m["all"], m["cold"], m["after_tuning_window"]
        metrics = [a["recall"], a["ndcg"], c["recall"], c["ndcg"], after["recall"]]
        rows.append([method, m["config"], *metrics, m["learn_s"], m["score_s"], m["wall_s"]])
    cols = [
        "method",
        "config",
        f"Recall@{k}",
        f"NDCG@{k}",
        f"cold Recall@{k}",
        f"cold NDCG@{k}",
        f"Recall@{k} after first {tune_fraction:.0%}",
        "learn s",
        "score s",
        "wall s",
    ]
    first = next(iter(res["methods"].values()))
    note = (
        f"{res['events']:,} events, {res['batches']} batches; {res['scored_events']:,} events scored "
        f"({first['cold']['n']:,} from cold users ≤ 5 prior events); {res['scored_from_new_users']:,} scored events "
        f"come from users never seen before (a miss for every method), so Recall@{k} ≤ "
        f"{1 - res['scored_from_new_users'] / max(res['scored_events'], 1):.3f}. Sorted by Recall@{k}."
    )
    out = [table(f"Quality on {name} (prequential, test-then-train)", cols, rows, note)]
    grid_rows = []
    for fam, rows_ in res["tuning"].items():
        best = max(rows_, key=lambda r: ((r["recall"] or 0.0), (r["ndcg"] or 0.0)))
        for r in rows_:
            grid_rows.append([fam, r["config"], r["recall"], r["ndcg"], "best" if r is best else ""])
    if grid_rows:
        out.append(
            table(
                f"Tuning grid on {name}: first {res['tuning_events']:,} events only",
                ["method", "config", f"Recall@{k}", f"NDCG@{k}", ""],
                grid_rows,
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=20, help="top-K cut-off")
    parser.add_argument("--tune-fraction", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=20, help="batches in the rolling Recall plot")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N events of each dataset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (river is single-threaded)")
    parser.add_argument("--no-ssmtl", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit = args.limit or 3000
        args.window = min(args.window, 3)
    torch.set_num_threads(args.threads)
    run = Run("quality", "Retrieval quality (prequential)", args.out, argv, args.smoke)
    run.payload["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    for name in args.datasets:
        res = run.payload["results"][name] = run_dataset(name, args, run)
        run.payload["tables"] += tables_for(name, res, args.k, args.tune_fraction)
    run.payload["notes"] += [
        "One shared evaluation (bench/common.py): before training on each batch, every event whose item is new to "
        "its user is scored against the user's top-20 over all items seen in earlier batches, the user's seen "
        "items excluded; a user never seen before is a miss for every method.",
        "No sampling: every novel event is scored. Cold = at most 5 prior events.",
        "River defaults (river 0.26.1): n_factors=10, FunkMF SGD(0.1), BiasedMF SGD(0.01), Normal(0, 0.1) init; "
        "seed=0 everywhere. River models get implicit feedback as y=1 per event plus `negatives` uniformly "
        "sampled seen items with y=0 (negatives=0 is in the grid). Their scores are computed vectorised from the "
        "factor dicts (identical to predict_one, see tests/test_bench_suites_smoke.py).",
        f"Grids were evaluated on the first {args.tune_fraction:.0%} of each stream only; the best (Recall@20) is "
        "then run on the whole stream. ebrflow models are built by ebrflow.app.build_model from ModelConfig "
        "defaults (so they include the app's served popularity prior unless stated); SSMTL is untuned.",
        f"torch threads = {args.threads}; learn/score seconds are wall time and depend on concurrent load.",
    ]
    print(run.write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
