"""Gowalla under the LightGCN protocol: full ranking over all items, train items masked, Recall@20 / NDCG@20.

Usage: ``python -m bench.gowalla --minutes 20`` (per variant). The data stay in place (never copied):
``../shared/data/lightgcn-gowalla`` beside the repository, or ``--data DIR``. Every variant is the same
``SSMTLModel`` trained by ``backfill`` on shuffled batches of the training interactions; evaluation uses the
model's own (full-neighbourhood) embeddings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ebrflow.model.backfill import backfill
from ebrflow.model.base import Batch
from ebrflow.model.ssmtl import SSMTLModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lightgcn-gowalla"
RESULTS = Path(__file__).parent / "results"
PUBLISHED = {"LightGCN (paper, 3 layers)": (0.1830, 0.1554)}
VARIANTS = {
    "retrieval-only": {"tasks": ("retrieval",), "balancing": "fixed"},
    "ssmtl-fixed": {"tasks": ("retrieval", "cca_ssg", "graphmae"), "balancing": "fixed"},
    "ssmtl-mgda": {"tasks": ("retrieval", "cca_ssg", "graphmae"), "balancing": "mgda"},
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


def batch_factory(users: np.ndarray, items: np.ndarray, batch_size: int, seed: int):
    """A factory yielding one shuffled epoch of batches per call."""
    rng = np.random.default_rng(seed)

    def epoch():
        order = rng.permutation(len(users))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield Batch.of(users[idx], items[idx])

    return epoch


def evaluate(model: SSMTLModel, train: dict, test: dict, n_items: int, k: int = 20) -> dict[str, float]:
    """Recall@k and NDCG@k over every test user, ranking all items with the user's train items masked."""
    known = model.known_items()
    item_emb = np.zeros((n_items, model.dim), dtype=np.float32)
    item_emb[known] = model.item_embeddings(known)
    items_t = torch.from_numpy(item_emb)
    users = np.array(sorted(test), dtype=np.int64)
    seen = np.isin(users, model.graph.users.ids())  # users never trained (tiny budgets) keep a zero vector
    user_emb = torch.zeros(len(users), model.dim)
    user_emb[torch.from_numpy(seen)] = torch.from_numpy(model.user_embeddings(users[seen]))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for start in range(0, len(users), 2048):
        chunk = users[start : start + 2048]
        scores = user_emb[start : start + len(chunk)] @ items_t.T
        for row, u in enumerate(chunk):
            scores[row, torch.from_numpy(train[u])] = -float("inf")
        top = torch.topk(scores, k, dim=1).indices.numpy()
        for row, u in enumerate(chunk):
            truth = test[u]
            hit = np.isin(top[row], truth)
            recalls.append(hit.sum() / len(truth))
            idcg = discounts[: min(len(truth), k)].sum()
            ndcgs.append((hit * discounts).sum() / idcg)
    return {f"recall@{k}": float(np.mean(recalls)), f"ndcg@{k}": float(np.mean(ndcgs)), "users": len(users)}


def run_variant(name: str, args: argparse.Namespace, train: dict, test: dict, n_items: int) -> dict:
    """Train one variant within the time budget and evaluate it."""
    config = {
        "dim": args.dim,
        "lr": args.lr,
        "fanouts": tuple(args.fanouts),
        "neighbour_capacity": args.capacity,
        "replay_ratio": 0.0,
        "reservoir_size": 0,
        "max_step_size": args.batch_size,
        "seed": args.seed,
        **VARIANTS[name],
    }
    config["tasks"] = {t: {"temperature": args.temperature} if t == "retrieval" else {} for t in config["tasks"]}
    model = SSMTLModel(**config)
    users, items = pairs(train)
    factory = batch_factory(users, items, args.batch_size, args.seed)
    n_batches = -(-len(users) // args.batch_size)
    summary = backfill(
        model, factory, args.epochs, progress=args.progress, max_seconds=args.minutes * 60, total_batches=n_batches
    )
    t0 = time.perf_counter()
    metrics = evaluate(model, train, test, n_items)
    eval_s = time.perf_counter() - t0
    print(f"{name}: {metrics} train {summary.seconds:.0f}s, {summary.epochs} epochs, eval {eval_s:.0f}s", flush=True)
    return {
        "variant": name,
        **metrics,
        "train_seconds": round(summary.seconds, 1),
        "eval_seconds": round(eval_s, 1),
        "epochs_started": summary.epochs,
        "batches": summary.batches,
        "steps": summary.steps,
        "skipped_steps": summary.skipped_steps,
        "epoch_losses": [round(x, 4) for x in summary.epoch_losses],
        "batches_per_s": round(summary.batches / max(summary.seconds, 1e-9), 2),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }


def coverage(train: dict[int, np.ndarray], capacity: int) -> dict[str, float]:
    """Share of training edges a ring buffer of ``capacity`` keeps, seen from the user and from the item side."""
    user_deg = np.array([len(v) for v in train.values()])
    item_deg = np.bincount(np.concatenate(list(train.values())))
    total = user_deg.sum()
    return {
        "user_side": round(float(np.minimum(user_deg, capacity).sum() / total), 3),
        "item_side": round(float(np.minimum(item_deg, capacity).sum() / total), 3),
    }


def write_results(rows: list[dict], args: argparse.Namespace, out: Path, train: dict) -> None:
    """JSON with everything, then the Markdown table rendered from it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared with other jobs",
        "torch": torch.__version__,
        "minutes_per_variant": args.minutes,
        "max_users": args.max_users,
        "ring_buffer_edge_coverage": coverage(train, args.capacity),
        "published": PUBLISHED,
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    render(out)


def render(out: Path) -> None:
    """Write ``out``.md from ``out``.json."""
    data = json.loads(out.with_suffix(".json").read_text())
    meta, rows = data["meta"], data["results"]
    lines = [
        "| variant | Recall@20 | NDCG@20 | train wall (s) | epochs started | batches | batches/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['recall@20']:.4f} | {r['ndcg@20']:.4f} | {r['train_seconds']:.0f} "
            f"| {r['epochs_started']} | {r['batches']} | {r['batches_per_s']} |"
        )
    for name, (rec, ndcg) in meta["published"].items():
        lines.append(f"| {name} | {rec:.4f} | {ndcg:.4f} | published, not run here | | | |")
    cov = meta.get("ring_buffer_edge_coverage", {})
    cfg = rows[0]["config"] if rows else {}
    temperature = cfg.get("tasks", {}).get("retrieval", {}).get("temperature")
    notes = [
        f"Gowalla, LightGCN split: {rows[0]['users'] if rows else 0} test users, full ranking over all items, "
        "train items masked.",
        f"Budget {meta['minutes_per_variant']} min of training per variant on {meta['machine']}"
        + (f"; only users with id < {meta['max_users']}." if meta["max_users"] else "."),
        "Every variant is `SSMTLModel` trained by `backfill` on shuffled 1,024-event batches "
        f"(fanouts {cfg.get('fanouts')}, dim {cfg.get('dim')}, lr {cfg.get('lr')}, temperature "
        f"{temperature}, no tuning); evaluation uses its full-neighbourhood embeddings.",
        f"Differences from LightGCN: sampled 2-layer mean aggregation with dense layers (not 3-layer full-graph "
        f"propagation), in-batch sampled softmax with logQ (not BPR), minutes instead of ~1,000 epochs, and "
        f"ring buffers of {cfg.get('neighbour_capacity')} neighbours holding {cov.get('user_side')} (user side) / "
        f"{cov.get('item_side')} (item side) of the training edges.",
    ]
    notes += [meta["caveat"]] if meta.get("caveat") else []
    footnotes = [f"- {r['variant']}: {r['note']}" for r in rows if r.get("note")]
    text = "# Gowalla benchmark\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + "\n".join(lines) + "\n"
    if footnotes:
        text += "\n" + "\n".join(footnotes) + "\n"
    out.with_suffix(".md").write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse flags, run the chosen variants one after another, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget per variant")
    p.add_argument("--epochs", type=int, default=1000, help="epoch cap (the time budget usually stops first)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--max-users", type=int, default=None, help="keep users with id below this (smoke runs)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--fanouts", type=int, nargs="+", default=[10, 5])
    p.add_argument("--capacity", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=RESULTS / "gowalla.json")
    p.add_argument("--progress", action="store_true")
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
    n_items = 1 + max(int(v.max()) for split in (train, test) for v in split.values())
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, args, train, test, n_items))
        write_results(rows, args, args.out, train)
    return rows


if __name__ == "__main__":
    main()
