"""Prequential Recall@20 / NDCG@20 of ebrflow vs river and a popularity baseline on MovieLens-100K and CollegeMsg.

Usage: ``python -m bench.quality`` (both datasets) or ``--smoke`` (first 3,000 events, one configuration per
method). Every method sees the same events in the same order in micro-batches of ``--batch-size`` and is scored by
``bench.common.evaluate_stream`` (test-then-train); one extra row runs the shipped default in batches of the
trainer's ``batch.max_events`` (``DEFAULT_MAX_EVENTS``).

Tuning: baselines (and ebrflow's TwoTower) get a small grid; each grid point runs on the first
``--tune-fraction`` of the stream only, the best Recall@20 there is then run on the whole stream. Metrics
are also reported on the part of the stream after the tuning window (never used for selection).
"""

from __future__ import annotations

import os

# one BLAS thread per process: with --jobs workers (and torch) on 2 cores, OpenBLAS's own threads oversubscribe the
# machine (a 30k × 71 QR took 7 s instead of 0.5 s). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import DATASETS, SYNTHETIC, StreamResult, evaluate_stream, load_dataset
from bench.output import Run, add_common_args, table
from bench.plots import lines_over_time
from bench.scorers import (
    CommonNeighboursScorer,
    ImplicitScorer,
    ItemKNNScorer,
    ModelScorer,
    PopularityScorer,
    RiverScorer,
    implicit_available,
    river_factory,
)
from ebrflow.config import BatchConfig
from ebrflow.stream.generator import EventArrays

Params = dict[str, Any]
SSMTL_DEFAULT_TASKS = ("retrieval",)  # keep equal to the task names of ``model.ssmtl.DEFAULT_TASKS``
SSMTL_DEFAULT_STEPS = 1  # keep equal to ModelConfig.steps_per_batch
IMPLICIT_REFIT_EVENTS = 5000
DEFAULT_MAX_EVENTS = BatchConfig().max_events  # the trainer's micro-batch under a backlog


@dataclass
class Family:
    """A method: how to build it from params, its default params, and the grid tuned on the stream's head."""

    name: str
    build: Callable[[Params], Any]
    default: Params
    grid: list[Params]
    role: str = "peer"  # "default" (the shipped ebrflow config), "variant" (other ebrflow configs) or "peer"
    settings: Params = field(default_factory=dict)  # ebrflow rows: the [model] settings that differ from the defaults
    batch_size: int | None = None  # None: the run's --batch-size


def _label(params: Params) -> str:
    return ", ".join(f"{k}={'default' if v is None else v}" for k, v in params.items()) or "defaults"


def _grid(**axes: Sequence[Any]) -> list[Params]:
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def app_model(kind: str, params: Params) -> Any:
    """The model exactly as ``ebrflow.app.build_model`` builds it (app defaults + ``params``), on CPU."""
    from ebrflow.app import build_model
    from ebrflow.config import ModelConfig

    return build_model(ModelConfig(kind=kind, device="cpu", seed=0, **params))


ABLATION: dict[str, tuple[str, ...]] = {
    "retrieval only": ("retrieval",),
    "retrieval + cca_ssg": ("retrieval", "cca_ssg"),
    "retrieval + graphmae": ("retrieval", "graphmae"),
    "retrieval + infonce": ("retrieval", "infonce"),
}


def _ebrflow(name: str, kind: str, params: Params, role: str, batch_size: int | None = None) -> Family:
    settings = {"kind": kind, **params} if kind != "ssmtl" else params
    build = lambda p: ModelScorer(name, app_model(kind, {**params, **p}))  # noqa: E731
    return Family(name, build, {}, [], role, settings, batch_size)


SHIPPED = "ebrflow SSMTL — shipped default"
ALL_TASKS = {"retrieval": {}, "cca_ssg": {}, "graphmae": {}, "infonce": {}}


def ebrflow_families(dataset: str, smoke: bool) -> list[Family]:
    """The shipped default (role "default"), also in the trainer's batch size, its per-task ablation and other
    configs (role "variant"). Each name states every setting that differs from the shipped defaults.

    On a user–user stream (CollegeMsg) the rows after the default set the documented switch ``graph="user_user"``
    (and say so); the shipped default there is the bipartite graph.
    """
    out = [_ebrflow(SHIPPED, "ssmtl", {}, "default")]
    if smoke:
        return out
    out.append(
        _ebrflow(
            f"{SHIPPED}, in batches of {DEFAULT_MAX_EVENTS:,} (the trainer's batch.max_events)",
            "ssmtl",
            {},
            "default",
            DEFAULT_MAX_EVENTS,
        )
    )
    graph = {"graph": "user_user"} if dataset == "collegemsg" else {}
    base = "ebrflow SSMTL, graph = user_user" if graph else "ebrflow SSMTL"
    if graph:  # the shipped default's own training-free start, then the switch
        out.append(_ebrflow("ebrflow SSMTL, no gradient steps", "ssmtl", {"steps_per_batch": 0}, "variant"))
        out.append(_ebrflow(base, "ssmtl", graph, "variant"))
    shipped = tuple(SSMTL_DEFAULT_TASKS)
    for label, tasks in ABLATION.items():
        if tasks != shipped:
            settings = {**graph, "options": {"tasks": {t: {} for t in tasks}}}
            out.append(_ebrflow(f"{base}, {label}", "ssmtl", settings, "variant"))
    mgda = {**graph, "options": {"tasks": ALL_TASKS, "balancing": "mgda"}}
    label = "retrieval + cca_ssg + graphmae + infonce, balancing = mgda"
    out.append(_ebrflow(f"{base}, {label}", "ssmtl", mgda, "variant"))
    if SSMTL_DEFAULT_STEPS != 0:
        out.append(_ebrflow(f"{base}, no gradient steps", "ssmtl", {**graph, "steps_per_batch": 0}, "variant"))
    for blend, label in (("learned", "learned block only"), ("free", "training-free blocks only")):
        settings = {**graph, "options": {"blend": blend}}
        out.append(_ebrflow(f"{base}, blend = {blend} ({label})", "ssmtl", settings, "variant"))
    out.append(_ebrflow(f"{base}, dim = 128 (64 learned, 63 spectral)", "ssmtl", {**graph, "dim": 128}, "variant"))
    out.append(_ebrflow(f"{base}, no popularity prior", "ssmtl", {**graph, "popularity_half_life": 0}, "variant"))
    out.append(_ebrflow("ebrflow TwoTower + popularity prior (old default)", "two_tower", {}, "variant"))
    return out


def families(dataset: str, smoke: bool, with_ssmtl: bool) -> tuple[list[Family], list[str]]:
    """Every compared method for ``dataset`` (small grids under ``smoke``) plus notes on what was skipped."""
    notes: list[str] = []
    river_grid = (
        _grid(n_factors=[10], lr=[0.05], negatives=[1])
        if smoke
        else _grid(n_factors=[10, 32], lr=[0.01, 0.05, 0.1], negatives=[0, 1, 4])
    )
    out = ebrflow_families(dataset, smoke) if with_ssmtl else []
    if not with_ssmtl:
        notes.append("ebrflow SSMTL rows skipped (--no-ssmtl).")
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
    out.append(Family("item-kNN cosine", lambda p: ItemKNNScorer(), {}, []))
    if dataset == "collegemsg":
        out.append(Family("common neighbours + reciprocity", lambda p: CommonNeighboursScorer(), {}, []))
        out.append(
            Family(
                "Adamic–Adar + reciprocity",
                lambda p: CommonNeighboursScorer("Adamic–Adar + reciprocity", adamic_adar=True),
                {},
                [],
            )
        )
    if not smoke and implicit_available():
        for kind in ("ALS", "BPR"):
            out.append(
                Family(
                    f"implicit {kind}, refit every {IMPLICIT_REFIT_EVENTS:,} events",
                    lambda p, kind=kind: ImplicitScorer(kind, refit_every=IMPLICIT_REFIT_EVENTS),
                    {},
                    [],
                )
            )
    elif not smoke:
        notes.append("implicit ALS/BPR not run: `implicit` is not installed (pip install '.[train,bench]').")
    return out, notes


def _head(events: EventArrays, n: int) -> EventArrays:
    return EventArrays(events.user_ids[:n], events.item_ids[:n], events.ts_ms[:n])


_CTX: dict[str, Any] = {}  # what forked workers read: the families and the streams (set before the pool starts)


def _run_job(job: tuple[str, int, str]) -> tuple[dict[str, Any], StreamResult]:
    """One evaluation in a worker: ``(stream "head"/"full", family index, params as repr)``."""
    which, f, params_repr = job
    fam: Family = _CTX["families"][f]
    params = eval(params_repr)  # noqa: S307 - our own repr of a dict of literals
    torch.set_num_threads(_CTX["threads"])
    t0 = time.monotonic()
    res = evaluate_stream(_CTX[which], fam.build(params), fam.batch_size or _CTX["batch_size"], _CTX["k"])
    return {"params": params, "wall_s": time.monotonic() - t0}, res


def _map(jobs: list[tuple[str, int, str]], n_jobs: int) -> list[tuple[dict[str, Any], StreamResult]]:
    if n_jobs <= 1 or len(jobs) <= 1:
        return [_run_job(j) for j in jobs]
    with multiprocessing.get_context("fork").Pool(n_jobs) as pool:
        return pool.map(_run_job, jobs, chunksize=1)


def _full_row(fam: Family, info: dict[str, Any], res: StreamResult, tune_batches: int) -> dict[str, Any]:
    return {
        "config": _label({**fam.settings, **info["params"]}),
        "params": info["params"],
        "role": fam.role,
        "batch_size": fam.batch_size,
        "all": res.total(),
        "cold": res.total(cold=True),
        "after_tuning_window": res.total(start=tune_batches),
        "learn_s": res.learn_s,
        "score_s": res.score_s,
        "wall_s": info["wall_s"],
        "_result": res,
    }


def run_dataset(name: str, args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """Tune every family with a grid on the stream's head, then run defaults (and tuned points) on all of it.

    Evaluations run in ``args.jobs`` forked worker processes; each is independent and seeded, so the numbers do
    not depend on the number of workers (only the wall times do).
    """
    events = load_dataset(name, limit=args.limit)
    n_head = int(len(events) * args.tune_fraction)
    tune_batches = n_head // args.batch_size
    head = _head(events, tune_batches * args.batch_size)
    fams, notes = families(name, args.smoke, not args.no_ssmtl)
    run.payload["notes"] += [f"{name}: {n}" for n in notes]
    _CTX.update(families=fams, head=head, full=events, batch_size=args.batch_size, k=args.k, threads=args.threads)
    tune_jobs = [("head", f, repr(p)) for f, fam in enumerate(fams) if len(fam.grid) > 1 for p in fam.grid]
    print(f"[quality] {name}: {len(tune_jobs)} tuning runs", flush=True)
    tuned = _map(tune_jobs, args.jobs)
    tuning: dict[str, list] = {}
    for (_, f, _), (info, res) in zip(tune_jobs, tuned):
        total = res.total()
        row = {**info, "recall": total["recall"], "ndcg": total["ndcg"], "config": _label(info["params"])}
        tuning.setdefault(fams[f].name, []).append(row)
    full_jobs, labels = [], []
    for f, fam in enumerate(fams):
        chosen = [("defaults", fam.default)]
        if fam.name in tuning:
            best = max(tuning[fam.name], key=lambda r: ((r["recall"] or 0.0), (r["ndcg"] or 0.0)))["params"]
            if best != fam.default:
                chosen.append((f"tuned on first {args.tune_fraction:.0%}", best))
        for tag, params in chosen:
            full_jobs.append(("full", f, repr(params)))
            labels.append((f"{fam.name} ({tag})" if fam.role == "peer" or tag != "defaults" else fam.name, fam))
    print(f"[quality] {name}: {len(full_jobs)} full runs", flush=True)
    methods: dict[str, dict] = {}
    for (label, fam), (info, res) in zip(labels, _map(full_jobs, args.jobs)):
        methods[label] = _full_row(fam, info, res, n_head // (fam.batch_size or args.batch_size))
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


def _versus_peers(methods: dict[str, dict], k: int) -> str:
    """`` Shipped default / best peer: …`` for Recall@k and cold Recall@k (the default in the protocol's batches)."""
    default = next((m for m in methods.values() if m.get("role") == "default" and not m.get("batch_size")), None)
    peers = [m for m in methods.values() if m.get("role") == "peer"]
    if default is None or not peers:
        return ""
    ratios = []
    for segment, what in (("all", f"Recall@{k}"), ("cold", f"cold Recall@{k}")):
        best = max(m[segment]["recall"] or 0.0 for m in peers)
        if best > 0:
            ratios.append(f"{(default[segment]['recall'] or 0.0) / best:.3g}× on {what}")
    return f" Shipped default / best peer: {', '.join(ratios)}." if ratios else ""


def _training_counts(methods: dict[str, dict], k: int) -> str:
    """The model issue's stream targets, computed: the shipped default over its own no-gradient-steps variant
    (≥ 1.00× all, ≥ 1.03× cold), and each task set over retrieval only (≥ 1.00×) on the same graph."""

    def ratio(a: dict, b: dict, segment: str) -> str:
        num, den = a[segment]["recall"] or 0.0, b[segment]["recall"] or 0.0
        return f"{num / den:.3f}×" if den else "n/a"

    out = []
    default = methods.get(SHIPPED)
    steps0 = methods.get("ebrflow SSMTL, no gradient steps")
    if default and steps0:
        out.append(
            f" Shipped default / its no-gradient-steps variant: {ratio(default, steps0, 'all')} on Recall@{k}, "
            f"{ratio(default, steps0, 'cold')} on cold Recall@{k}."
        )
    for base in ("ebrflow SSMTL, graph = user_user", "ebrflow SSMTL"):
        retrieval = default if base == "ebrflow SSMTL" else methods.get(base)
        tasks = {n.removeprefix(base + ", "): m for n, m in methods.items() if n.startswith(base + ", retrieval +")}
        switched0 = methods.get(base + ", no gradient steps")
        if base != "ebrflow SSMTL" and retrieval and switched0:
            out.append(
                f" {base.removeprefix('ebrflow SSMTL, ')} / the same without gradient steps: "
                f"{ratio(retrieval, switched0, 'all')} on Recall@{k}, {ratio(retrieval, switched0, 'cold')} cold."
            )
        if retrieval and tasks:
            parts = ", ".join(f"{n} {ratio(m, retrieval, 'all')}" for n, m in tasks.items())
            out.append(
                f" Task sets / retrieval only ({base.removeprefix('ebrflow SSMTL').strip(', ') or 'default'}"
                f", Recall@{k}): {parts}."
            )
            break
    return "".join(out)


def tables_for(name: str, res: dict[str, Any], k: int, tune_fraction: float) -> list[dict]:
    rows = []
    for method, m in sorted(res["methods"].items(), key=lambda kv: -(kv[1]["all"]["recall"] or 0.0)):
        a, c, after = m["all"], m["cold"], m["after_tuning_window"]
        metrics = [a["recall"], a["ndcg"], c["recall"], c["ndcg"], after["recall"]]
        rows.append([method, m.get("role", "peer"), m["config"], *metrics, m["learn_s"], m["score_s"], m["wall_s"]])
    cols = [
        "method",
        "role",
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
        + _versus_peers(res["methods"], k)
        + _training_counts(res["methods"], k)
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
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=[*DATASETS, SYNTHETIC])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=20, help="top-K cut-off")
    parser.add_argument("--tune-fraction", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=20, help="batches in the rolling Recall plot")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N events of each dataset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (river is single-threaded)")
    parser.add_argument("--no-ssmtl", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="evaluations run in this many processes at once")
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
        "then run on the whole stream. ebrflow rows are built by ebrflow.app.build_model from ModelConfig "
        "defaults (the shipped config: SSMTL, bipartite graph) plus the settings "
        "the row names (its config column lists them). The SSMTL defaults were chosen on the first 20% of "
        "MovieLens and CollegeMsg only.",
        f"Batches of {args.batch_size} for every method, not the trainer's batch.max_events of "
        f"{DEFAULT_MAX_EVENTS:,}: the protocol scores each batch against a model trained on every earlier batch, "
        "and a live trainer at moderate rates closes its batches after batch.max_wait_ms, long before "
        f"{DEFAULT_MAX_EVENTS:,} events; full batches are the backlog case (catch-up, replays). The row 'shipped "
        f"default, in batches of {DEFAULT_MAX_EVENTS:,}' scores and trains the same model in those.",
        "The SSMTL default serves [learned | spectral | popularity] blocks and weighs the learned block against "
        "the training-free ones per cold/warm segment by how they rank held-out events (each batch before it "
        "trains): 'no gradient steps' keeps the training-free start, 'blend = learned' / 'blend = free' serve one "
        "kind of block only.",
        "Peers: item-kNN = cosine over the binary user×item matrix, score = sum of similarities to the user's "
        "items (+1e-6 × degree tie-break), updated per batch; common neighbours / Adamic–Adar on the undirected "
        "graph + 100 if the candidate contacted the user before; implicit 0.7 ALS/BPR (64 factors, 1 thread) refit "
        "on all history every 5,000 events, new ids score 0 until the next refit (their learn s is the refit cost).",
        f"torch threads = {args.threads}, one BLAS thread per process, {args.jobs} evaluations at once; learn/score "
        "seconds are wall time and depend on concurrent load.",
    ]
    print(run.write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
