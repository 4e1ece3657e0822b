"""Gowalla under the LightGCN protocol: full ranking over all items, train items masked, Recall@20 / NDCG@20.

Usage: ``python -m bench.gowalla --minutes 30`` (per ebrflow row). The data stay in place (never copied):
``../shared/data/lightgcn-gowalla`` beside the repository, or ``--data DIR``.

The ``default`` row is the shipped default trained exactly as ``ebrflow backfill`` trains it: the training
split is written to a temporary SNAP edge list (``user item ts`` with ``ts`` = the event's position in a seeded
random permutation: the LightGCN split has no timestamps, so the events are replayed in one random order, the same
every epoch, as the CLI replays a file), and ``ebrflow.app.backfill_file`` (the function the ``backfill`` command
calls) builds ``build_model(Settings().model)`` and trains it until the wall-clock budget. Variants are the same
call with ``model`` overrides. Evaluation uses the served embeddings (``user_embeddings``/``item_embeddings``,
popularity coordinate included). Peers: ``implicit`` ALS and BPR, tuned on a validation split carved from the
training file (``--val-fraction`` of each user's training items), then refitted on the whole training file and
scored once on the test file; EASE and the published results are reference rows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from bench.output import code_version

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lightgcn-gowalla"
RESULTS = Path(__file__).parent / "results"
# published results on this split (ANCHORS.md: BARS leaderboard, LightGCN paper); never run here
PUBLISHED = {
    "LightGCN (paper, 3 layers)": (0.1830, 0.1554),
    "MF-BPR, tuned (BARS)": (0.1627, 0.1378),
    "YoutubeDNN (BARS)": (0.1754, 0.1473),
    "GF-CF (BARS)": (0.1849, 0.1518),
    "SimpleX (BARS)": (0.1872, 0.1557),
}
EASE_PUBLISHED = (0.1765, 0.1467)  # BARS
# ebrflow rows: name → (role, overrides of the [model] settings, epoch cap, minutes or None: --minutes, which caps);
# "default" is Settings().model untouched
ALL_TASKS = {"retrieval": {}, "cca_ssg": {}, "graphmae": {}, "infonce": {}}
MODELS = {
    "default": ("default", {}, 1000, None),
    # the training-free start: one pass builds the graph, the spectral fit and the popularity counts
    "default-no-steps": ("variant", {"steps_per_batch": 0}, 1, None),
    # a wider served vector: 64 learned + 63 spectral + 1 popularity columns
    "dim-128": ("variant", {"dim": 128}, 1000, None),
    # the self-supervised tasks beside retrieval, each against retrieval alone at the same (shorter) budget
    "retrieval-only-10min": ("variant", {}, 1000, 10),
    **{
        f"retrieval+{task}-10min": ("variant", {"options": {"tasks": {"retrieval": {}, task: {}}}}, 1000, 10)
        for task in ("infonce", "cca_ssg", "graphmae")
    },
    "all-tasks-mgda-10min": ("variant", {"options": {"tasks": ALL_TASKS, "balancing": "mgda"}}, 1000, 10),
}
# served blends evaluated on the trained default too: (row suffix, index into model.blend.CANDIDATES)
SERVED = {"served: learned block only": 5, "served: training-free blocks only": 0}
PEERS = ("als", "bpr")
# the small grids tuned on the validation split (implicit 0.7's own defaults are the first entry of each)
GRIDS = {
    "als": [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 15}
        for f, r, a in ((100, 0.01, 1.0), (64, 0.01, 1.0), (128, 0.01, 1.0), (128, 0.01, 10.0), (128, 1.0, 10.0))
    ],
    "bpr": [
        {"factors": f, "learning_rate": lr, "regularization": r, "iterations": 100}
        for f, lr, r in ((100, 0.01, 0.01), (64, 0.05, 0.01), (128, 0.05, 0.01), (128, 0.01, 0.001))
    ],
}


def read_split(path: Path, max_users: int | None = None) -> dict[int, np.ndarray]:
    """``user item item ...`` lines → {user: items}."""
    out = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            user = int(parts[0])
            if max_users is not None and user >= max_users:
                continue
            out[user] = np.asarray(parts[1:], dtype=np.int64)
    return out


def pairs(split: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten {user: items} into parallel (users, items) arrays."""
    users = np.concatenate([np.full(len(v), u, dtype=np.int64) for u, v in split.items()])
    return users, np.concatenate(list(split.values()))


def carve_validation(train: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out ``fraction`` of each user's training items (at least one, if the user has two or more)."""
    rng = np.random.default_rng(seed)
    fit, val = {}, {}
    for u, items in train.items():
        n = int(round(fraction * len(items))) or (1 if len(items) >= 2 else 0)
        perm = rng.permutation(len(items))
        if n:
            val[u] = items[perm[:n]]
        fit[u] = items[perm[n:]]
    return fit, val


def rank_metrics(
    user_vecs, item_vecs, users, train: dict, test: dict, k: int = 20, unknown: np.ndarray | None = None
) -> dict[str, float]:
    """Recall@k and NDCG@k of ``users`` (rows of ``user_vecs``), ranking all items with train items masked;
    items flagged in ``unknown`` (never trained, so without a vector) rank last."""
    items_t = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32))
    unknown_t = None if unknown is None or not unknown.any() else torch.from_numpy(np.flatnonzero(unknown))
    user_t = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for start in range(0, len(users), 2048):
        chunk = users[start : start + 2048]
        scores = user_t[start : start + len(chunk)] @ items_t.T
        if unknown_t is not None:  # e.g. a zero vector would outrank items with a negative popularity coordinate
            scores[:, unknown_t] = -float("inf")
        for row, u in enumerate(chunk):
            if u in train:
                scores[row, torch.from_numpy(train[u])] = -float("inf")
        top = torch.topk(scores, k, dim=1).indices.numpy()
        for row, u in enumerate(chunk):
            truth = test[u]
            hit = np.isin(top[row], truth)
            recalls.append(hit.sum() / len(truth))
            idcg = discounts[: min(len(truth), k)].sum()
            ndcgs.append((hit * discounts).sum() / idcg)
    return {f"recall@{k}": float(np.mean(recalls)), f"ndcg@{k}": float(np.mean(ndcgs)), "users": len(users)}


def evaluate(model, train: dict, test: dict, n_items: int, k: int = 20) -> dict[str, float]:
    """The served embeddings of ``model`` scored by ``rank_metrics``; ids it never saw keep a zero vector."""
    known = model.known_items()
    item_emb = np.zeros((n_items, model.dim), dtype=np.float32)
    item_emb[known] = model.item_embeddings(known)
    users = np.array(sorted(test), dtype=np.int64)
    seen = np.isin(users, model.known_users())
    user_emb = np.zeros((len(users), model.dim), dtype=np.float32)
    user_emb[seen] = model.user_embeddings(users[seen])
    unknown = np.ones(n_items, dtype=bool)
    unknown[known] = False
    return rank_metrics(user_emb, item_emb, users, train, test, k, unknown)


def write_snap(train: dict, path: Path, seed: int) -> int:
    """The training split as a SNAP edge list ``user item ts``, ts = position in a seeded random order."""
    users, items = pairs(train)
    order = np.random.default_rng(seed).permutation(len(users))
    ts = np.empty(len(users), dtype=np.int64)
    ts[order] = np.arange(len(users))
    np.savetxt(path, np.c_[users, items, ts], fmt="%d")
    return len(users)


def run_model(name: str, minutes: float, train: dict, test: dict, n_items: int, seed: int) -> list[dict]:
    """Train one ebrflow row through ``backfill_file`` (what ``ebrflow backfill`` runs) and evaluate it; the
    default is also evaluated with each ``SERVED`` blend forced (same training, other served weights)."""
    from ebrflow.app import backfill_file
    from ebrflow.config import ModelConfig, Settings

    role, overrides, max_epochs, own_minutes = MODELS[name]
    minutes = min(own_minutes, minutes) if own_minutes else minutes  # --minutes caps every row (smoke runs)
    settings = Settings()
    settings.model = ModelConfig(**{**settings.model.model_dump(exclude={"variants"}), **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gowalla-train.snap"
        write_snap(train, path, seed)
        model, _, summary = backfill_file(settings, path, "snap", max_epochs, max_seconds=minutes * 60)
    t0 = time.perf_counter()
    metrics = evaluate(model, train, test, n_items)
    eval_s = time.perf_counter() - t0
    print(f"{name}: {metrics} train {summary.seconds:.0f}s, {summary.epochs} epochs, eval {eval_s:.0f}s", flush=True)
    row = {
        "variant": name,
        "role": role,
        **metrics,
        "train_wall_s": round(summary.seconds, 1),
        "budget_min": minutes,
        "eval_wall_s": round(eval_s, 1),
        "epochs": summary.epochs,
        "epochs_started": summary.epochs,
        "batches": summary.batches,
        "steps": summary.steps,
        "skipped_steps": summary.skipped_steps,
        "spectral_refits": summary.spectral_refits,
        "spectral_s": round(summary.spectral_seconds, 1),
        "epoch_losses": [round(x, 4) for x in summary.epoch_losses],
        "batches_per_s": round(summary.batches / max(summary.seconds, 1e-9), 2),
        "held_out_events": summary.held_out,
        "served_blend": {k: list(v) for k, v in summary.blend.items()},
        "config": json.loads(settings.model.model_dump_json()),
        "model_overrides": overrides,
    }
    rows = [row]
    if name == "default":
        for suffix, index in SERVED.items():
            model.selector.chosen[:] = index
            forced = evaluate(model, train, test, n_items)
            blend = list(model.selector.candidates[index])
            rows.append({**row, **forced, "variant": f"default, {suffix}", "role": "variant", "served_blend": blend})
    return rows


def _matrix(split: dict, n_users: int, n_items: int) -> sp.csr_matrix:
    users, items = pairs(split)
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def fit_implicit(kind: str, params: dict, split: dict, n_users: int, n_items: int, seed: int):
    """``implicit`` ALS or BPR fitted on ``split`` with one thread; returns (user factors, item factors, seconds)."""
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking
    from threadpoolctl import threadpool_limits

    cls = AlternatingLeastSquares if kind == "als" else BayesianPersonalizedRanking
    t0 = time.perf_counter()
    with threadpool_limits(1):  # implicit's advice: its own loop is the parallelism; BLAS threads oversubscribe
        model = cls(**params, random_state=seed, num_threads=1)
        model.fit(_matrix(split, n_users, n_items), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors), time.perf_counter() - t0


def run_peer(kind: str, train: dict, test: dict, n_users: int, n_items: int, args: argparse.Namespace) -> dict:
    """Tune ``kind`` on the validation split carved from train, refit the best on all of train, score test."""
    fit, val = carve_validation(train, args.val_fraction, args.seed)
    val_users = np.array(sorted(val), dtype=np.int64)
    grid = []
    for params in GRIDS[kind][: args.grid_size]:
        uf, itf, secs = fit_implicit(kind, params, fit, n_users, n_items, args.seed)
        m = rank_metrics(uf[val_users], itf, val_users, fit, val)
        grid.append({"params": params, "val_recall@20": m["recall@20"], "val_ndcg@20": m["ndcg@20"], "fit_s": secs})
        print(f"{kind} {params}: val {m['recall@20']:.4f} / {m['ndcg@20']:.4f} ({secs:.0f}s)", flush=True)
    best = max(grid, key=lambda g: g["val_recall@20"])
    uf, itf, secs = fit_implicit(kind, best["params"], train, n_users, n_items, args.seed)
    users = np.array(sorted(test), dtype=np.int64)
    metrics = rank_metrics(uf[users], itf, users, train, test)
    print(f"{kind} best {best['params']}: test {metrics} ({secs:.0f}s)", flush=True)
    return {
        "variant": f"implicit {kind.upper()} (tuned on validation)",
        "role": "peer",
        **metrics,
        "train_wall_s": round(secs, 1),
        "config": best["params"],
        "validation_grid": grid,
    }


def ease_row(n_items: int, args: argparse.Namespace) -> dict:
    """EASE's cost estimate on this machine (a timed float32 inverse scaled by n³) and its published result."""
    from threadpoolctl import threadpool_limits

    n = 3000
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    gram = a @ a.T + n * np.eye(n, dtype=np.float32)
    with threadpool_limits(args.threads):
        t0 = time.perf_counter()
        np.linalg.inv(gram)
        secs = time.perf_counter() - t0
    estimate = secs * (n_items / n) ** 3
    gb = 2 * 4 * n_items**2 / 1e9
    note = (
        f"published (BARS), not run here: the {n_items:,}×{n_items:,} float32 Gram matrix and its inverse need "
        f"{gb:.1f} GB (fits), but the inverse alone is estimated at {estimate / 60:.0f} min on {args.threads} "
        f"thread(s) of this shared machine (a {n}×{n} inverse took {secs:.2f} s, scaled by n³)"
    )
    print(note, flush=True)
    return {
        "variant": "EASE^R",
        "role": "published",
        "recall@20": EASE_PUBLISHED[0],
        "ndcg@20": EASE_PUBLISHED[1],
        "train_wall_s": None,
        "note": note,
        "inverse_estimate_s": round(estimate),
    }


def published_rows() -> list[dict]:
    """The published results on this split, as reference rows."""
    return [
        {
            "variant": name,
            "role": "published",
            "recall@20": rec,
            "ndcg@20": ndcg,
            "train_wall_s": None,
            "note": "published, not run here",
        }
        for name, (rec, ndcg) in PUBLISHED.items()
    ]


def merge_results(out: Path, rows: list[dict], meta: dict) -> None:
    """Replace (by variant name) or add ``rows`` in ``out``, then render its Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {"meta": {}, "results": []}
    if "train_seconds" in json.dumps(data["results"][:1]):  # the old format (sage-era variants): start over
        data = {"meta": {}, "results": []}
    names = {r["variant"] for r in rows}
    data["results"] = [r for r in data["results"] if r["variant"] not in names] + rows
    order = {"default": 0, "variant": 1, "peer": 2, "published": 3}
    data["results"].sort(key=lambda r: (order[r["role"]], -r["recall@20"]))
    data["meta"] = {**data["meta"], **meta}
    out.write_text(json.dumps(data, indent=2))
    render(out)


def _num(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _blend(blend: dict | list | None) -> str:
    """The served (learned, spectral, popularity) weights: one tuple, or one per segment."""
    if not blend:
        return ""
    if isinstance(blend, list):
        return "(" + ", ".join(f"{w:g}" for w in blend) + ")"
    return ", ".join(f"{k} " + _blend(list(v)) for k, v in blend.items())


def _commands(rows: list[dict], meta: dict) -> list[str]:
    """Each distinct command behind the rows (with its commit where the row records one), then older ones."""
    ran = [f"`{r['command']}` (commit {r.get('commit')})" for r in rows if r.get("command")]
    return list(dict.fromkeys(ran + [f"`{c}`" for c in meta.get("commands", [])]))


def findings(rows: list[dict]) -> list[str]:
    """The targets of the model issue, computed from the rows (never typed): the default against LightGCN's
    published result and against its own no-gradient-steps start, and each task set against retrieval only."""
    by = {r["variant"]: r for r in rows}
    out = []
    if "default" in by:
        d = by["default"]
        met = d["recall@20"] >= 0.183 and d["ndcg@20"] >= 0.155
        out.append(
            f"Target Recall@20 ≥ 0.183 and NDCG@20 ≥ 0.155 (LightGCN's paper result): the default reaches "
            f"{d['recall@20']:.4f} / {d['ndcg@20']:.4f} after {d['epochs']} epochs — {'met' if met else 'missed'}."
        )
        if "default-no-steps" in by:
            ratio = d["recall@20"] / by["default-no-steps"]["recall@20"]
            out.append(
                f"Training counts (target ≥ 1.5×): the default is {ratio:.2f}× its no-gradient-steps start "
                f"({by['default-no-steps']['recall@20']:.4f})."
            )
    base = by.get("retrieval-only-10min")
    if base:
        parts = [
            f"{name.removesuffix('-10min')} {r['recall@20'] / base['recall@20']:.3f}×"
            for name, r in by.items()
            if name.endswith("-10min") and name != "retrieval-only-10min"
        ]
        out.append(
            "Self-supervised tasks at an equal 10-min budget, Recall@20 against retrieval only "
            f"({base['recall@20']:.4f}; target ≥ 1.03×): " + ", ".join(parts) + "."
        )
    return out


def render(out: Path) -> None:
    """Write ``out``.md from ``out``.json."""
    data = json.loads(out.with_suffix(".json").read_text())
    meta, rows = data["meta"], data["results"]
    lines = [
        "| variant | role | Recall@20 | NDCG@20 | train wall (s) | epochs started | steps (skipped) "
        "| spectral refits (s) | served blend (learned, spectral, popularity) | config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        refits = f"{r['spectral_refits']} ({r['spectral_s']:.0f})" if "spectral_refits" in r else ""
        steps = f"{r['steps']} ({r['skipped_steps']})" if "steps" in r else ""
        if r["role"] in ("default", "variant"):
            cfg = json.dumps(r.get("model_overrides") or {})
            if r.get("budget_min") != meta.get("minutes"):
                cfg += f", budget {r.get('budget_min')} min"
        elif r["role"] == "peer":
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        else:
            cfg = "published, not run here" if r.get("note") == "published, not run here" else "see note below"
        lines.append(
            f"| {r['variant']} | {r['role']} | {r['recall@20']:.4f} | {r['ndcg@20']:.4f} "
            f"| {_num(r.get('train_wall_s'), '.0f')} | {r.get('epochs_started', '')} | {steps} | {refits} "
            f"| {_blend(r.get('served_blend'))} | {cfg} |"
        )
    notes = [
        "Commands: " + "; ".join(_commands(rows, meta)) + ".",
        f"Gowalla, LightGCN split: {meta.get('test_users')} test users, full ranking over all "
        f"{meta.get('items')} items, train items masked.",
        "ebrflow rows: the shipped default model trained as `ebrflow backfill` trains it (`ebrflow.app.backfill_file`"
        " on the training split written as a SNAP edge list in one seeded random order, batches of "
        "`batch.max_events`), stopped after the batch that crosses the budget of "
        f"{meta.get('minutes')} min, on {meta.get('machine')}; evaluated on the served embeddings. The latest 1% of "
        "the file's events (in its replay order) stay out of the epochs: they choose the served blend of the "
        "learned and training-free blocks, then train once. 'default, served: …' rows evaluate the trained default "
        "with another blend forced.",
        "Peers: `implicit` ALS/BPR, one thread, tuned on a validation split carved from the training file "
        f"({meta.get('val_fraction')} of each user's train items), the best refitted on all of it and scored once "
        "on test; train wall = that final fit.",
    ]
    notes += findings(rows)
    notes += [meta["caveat"]] if meta.get("caveat") else []
    footnotes = [
        f"- {r['variant']}: {r['note']}" for r in rows if r.get("note") and r["note"] != "published, not run here"
    ]
    text = "# Gowalla benchmark\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + "\n".join(lines) + "\n"
    if footnotes:
        text += "\n" + "\n".join(footnotes) + "\n"
    grids = [r for r in rows if r.get("validation_grid")]
    if grids:
        text += "\n**Tuning grids (validation split carved from train.txt)**\n\n"
        text += "| peer | params | val Recall@20 | val NDCG@20 | fit s |\n|---|---|---|---|---|\n"
        for r in grids:
            for g in r["validation_grid"]:
                params = ", ".join(f"{k}={v}" for k, v in g["params"].items())
                text += (
                    f"| {r['variant']} | {params} | {g['val_recall@20']:.4f} | {g['val_ndcg@20']:.4f} "
                    f"| {g['fit_s']:.0f} |\n"
                )
    out.with_suffix(".md").write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse flags, run the chosen rows (ebrflow rows in parallel with ``--jobs``), merge them into the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget per ebrflow row")
    p.add_argument("--models", default="default,retrieval+infonce", help=f"ebrflow rows among {list(MODELS)}")
    p.add_argument("--peers", default="als,bpr,ease,published", help="among als, bpr, ease, published ('' none)")
    p.add_argument("--jobs", type=int, default=1, help="ebrflow rows trained at once (one process each)")
    p.add_argument("--max-users", type=int, default=None, help="keep users with id below this (smoke runs)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--grid-size", type=int, default=None, help="only the first N configurations of each grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="BLAS/torch threads of the peers (ebrflow: model.threads)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=RESULTS / "gowalla.json")
    p.add_argument("--render-only", action="store_true", help="re-render the Markdown from an existing JSON")
    args = p.parse_args(argv)
    if args.render_only:
        render(args.out)
        return json.loads(args.out.with_suffix(".json").read_text())["results"]
    if not (args.data / "train.txt.gz").is_file():
        p.error(f"no Gowalla split at {args.data} (train.txt.gz, test.txt.gz); pass --data DIR")
    torch.set_num_threads(args.threads)
    train = read_split(args.data / "train.txt.gz", args.max_users)
    test = read_split(args.data / "test.txt.gz", args.max_users)
    n_users = 1 + max(max(train), max(test))
    n_items = 1 + max(int(v.max()) for split in (train, test) for v in split.values())
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
        "torch": torch.__version__,
        "minutes": args.minutes,
        "max_users": args.max_users,
        "test_users": len(test),
        "items": n_items,
        "val_fraction": args.val_fraction,
        "command": "python -m bench.gowalla " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows: list[dict] = []
    models = [m for m in args.models.split(",") if m]
    peers = [x for x in args.peers.split(",") if x]
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_model, m, args.minutes, train, test, n_items, args.seed) for m in models]
        for kind in peers:
            if kind in PEERS:
                row = run_peer(kind, train, test, n_users, n_items, args)
            elif kind == "ease":
                row = ease_row(n_items, args)
            else:
                rows += published_rows()
                merge_results(args.out, published_rows(), meta)
                continue
            rows.append(row)
            merge_results(args.out, [row], meta)
        commit = code_version()["commit"]
        for f in futures:
            trained = [{**row, "command": meta["command"], "commit": commit} for row in f.result()]
            rows += trained
            merge_results(args.out, trained, meta)
    return rows


if __name__ == "__main__":
    main()
