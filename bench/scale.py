"""Scale: cost per event and peak RSS as the catalogue and the batch size grow; Milvus upsert cost vs collection size.

Usage: ``python -m bench.scale`` or ``--smoke``. Each configuration runs in its own subprocess
(``--worker JSON``) so that its peak RSS (``VmHWM`` from /proc/self/status) is its own.

- train configs: synthetic events (users = items, ``--events`` per config) through the app's default model
  (``ebrflow.app.build_model``: two_tower + served popularity prior) ``fit_batch`` and
  indexer.Publisher.publish into Milvus Lite, exactly the pipeline's train → publish steps, without Kafka;
- upsert configs: one collection grown to each size (in 10k-row upserts, then flushed), then 1,000-row
  upserts of existing ids and of new ids, a 20-id get and a top-20 search, each repeated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import Run, add_common_args, fmt_range, summary, table


def proc_status_kib(field: str) -> int:
    """A ``VmHWM``/``VmRSS`` value of this process in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def train_worker(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train + publish ``cfg['events']`` synthetic events in batches of ``cfg['batch']``; costs and memory."""
    import torch

    from ebrflow.app import build_model
    from ebrflow.config import ModelConfig
    from indexer.milvus_store import MilvusStore, connect
    from indexer.publisher import Publisher
    from model.base import Batch
    from stream.generator import SyntheticStream

    gen = SyntheticStream(users=cfg["users"], items=cfg["items"], seed=7)
    chunks = list(gen.chunks(cfg["events"], chunk=min(cfg["events"], 20_000)))
    users = np.concatenate([c.user_ids for c in chunks])
    items = np.concatenate([c.item_ids for c in chunks])
    ts = np.concatenate([c.ts_ms for c in chunks])
    model = build_model(ModelConfig(device="cpu", threads=cfg["torch_threads"]))  # the app's default model
    store = MilvusStore(connect(str(workdir / "milvus.db")), model.dim)
    store.ensure_collections()
    publisher = Publisher(store)
    baseline_kib = proc_status_kib("VmRSS")
    t_train = t_publish = t_flush = 0.0
    rows = 0
    for s in range(0, len(users), cfg["batch"]):
        e = slice(s, s + cfg["batch"])
        batch = Batch.of(users[e], items[e], ts_ms=ts[e])
        t0 = time.perf_counter()
        model.fit_batch(batch)
        t1 = time.perf_counter()
        bu, bi = np.unique(batch.user_ids), np.unique(batch.item_ids)
        ue, ie = model.user_embeddings(bu), model.item_embeddings(bi)
        publisher.publish(publisher.prepare(model.version, bi, ie, bu, ue, (batch.user_ids, batch.item_ids)))
        t2 = time.perf_counter()
        store.flush_if_due()
        t_train, t_publish, t_flush = t_train + t1 - t0, t_publish + t2 - t1, t_flush + time.perf_counter() - t2
        rows += len(bu) + len(bi)
    n = len(users)
    return {
        "events": n,
        "distinct_users": len(np.unique(users)),
        "distinct_items": len(np.unique(items)),
        "rows_upserted": rows,
        "train_us_per_event": t_train / n * 1e6,
        "publish_us_per_event": t_publish / n * 1e6,
        "flush_us_per_event": t_flush / n * 1e6,
        "total_us_per_event": (t_train + t_publish + t_flush) / n * 1e6,
        "events_per_s": n / (t_train + t_publish + t_flush),
        "rss_before_training_mib": baseline_kib / 1024,
        "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def _timed(fn: Any, repeats: int) -> dict[str, float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return summary(out)


def upsert_worker(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Grow one collection through ``cfg['sizes']``; at each size time 1,000-row upserts, a get and a search."""
    from indexer.milvus_store import MilvusStore, connect

    rng = np.random.default_rng(0)
    dim, repeats = cfg["dim"], cfg["repeats"]
    store = MilvusStore(connect(str(workdir / "milvus.db")), dim)
    store.ensure_collections()
    coll, size, out = store.items, 0, {}
    fresh = iter(range(10**12, 10**13, 1000))

    def vecs(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def upsert_existing() -> None:
        store.upsert(coll, rng.choice(size, 1000, replace=False), vecs(1000), 2)

    def upsert_new() -> None:
        store.upsert(coll, np.arange(1000) + next(fresh), vecs(1000), 2)

    for target in cfg["sizes"]:
        start, t0 = size, time.perf_counter()
        while size < target:
            n = min(10_000, target - size)
            store.upsert(coll, np.arange(size, size + n), vecs(n), 1)
            size += n
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.client.flush(coll)
        t_flush = time.perf_counter() - t1
        out[str(target)] = {
            "rows": size,
            "load_rows_per_s": (size - start) / t_load if t_load > 0 else None,
            "flush_s": t_flush,
            "upsert_1000_existing_s": _timed(upsert_existing, repeats),
            "upsert_1000_new_s": _timed(upsert_new, repeats),
            "get_20_s": _timed(lambda n=size: store.get(coll, rng.choice(n, 20, replace=False).tolist()), repeats),
            "search_top20_s": _timed(lambda: store.search(coll, vecs(1)[0], 20), repeats),
            "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        }
        med = out[str(target)]["upsert_1000_existing_s"]["median"]
        print(f"[scale] {size:,} rows: 1,000-row upsert {med * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return out


WORKERS = {"train": train_worker, "upsert": upsert_worker}


def in_subprocess(cfg: dict[str, Any], timeout_s: float, same_process: bool = False) -> dict[str, Any]:
    """Run one worker config in a fresh interpreter (its own peak RSS and Milvus Lite dir); parse its JSON line.

    ``same_process`` (smoke runs only) skips the interpreter start; peak RSS is then the caller's.
    """
    if same_process:
        with tempfile.TemporaryDirectory(prefix="ebrflow-scale-") as tmp:
            return WORKERS[cfg["kind"]](cfg, Path(tmp))
    cmd = [sys.executable, "-m", "bench.scale", "--worker", json.dumps(cfg)]
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.monotonic() - t0
    return result


def train_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Catalogue sweep at the default batch, then batch sweep at the middle catalogue (no duplicate run)."""
    mid = args.catalogues[len(args.catalogues) // 2]
    cfgs = [{"items": c, "users": c, "batch": args.default_batch, "sweep": "catalogue"} for c in args.catalogues]
    cfgs += [
        {"items": mid, "users": mid, "batch": b, "sweep": "batch"} for b in args.batches if b != args.default_batch
    ]
    return [{"kind": "train", "events": args.events, "torch_threads": args.torch_threads, **c} for c in cfgs]


def scale_plot(path: Path, train: list[dict[str, Any]], upsert: dict[str, Any], default_batch: int) -> Path:
    """Three panels: µs/event vs catalogue, µs/event vs batch size, Milvus call latency vs collection rows."""
    from bench.plots import xy_panels

    cat = [r for r in train if r["sweep"] == "catalogue"]
    mid = cat[len(cat) // 2]["items"]
    bat = sorted([r for r in train if r["items"] == mid], key=lambda r: r["batch"])
    sizes = [int(k) for k in upsert]

    def costs(rows: list[dict[str, Any]], x: str) -> dict[str, tuple[list[float], list[float]]]:
        keys = ("train_us_per_event", "publish_us_per_event", "total_us_per_event")
        return {k.split("_us")[0]: ([r[x] for r in rows], [r[k] for r in rows]) for k in keys}

    def ms(key: str) -> list[float]:
        return [upsert[str(n)][key]["median"] * 1e3 for n in sizes]

    milvus = {
        "upsert 1,000 existing": (sizes, ms("upsert_1000_existing_s")),
        "upsert 1,000 new": (sizes, ms("upsert_1000_new_s")),
        "search top-20": (sizes, ms("search_top20_s")),
    }
    return xy_panels(
        path,
        [
            (f"per event vs catalogue (batch {default_batch})", "items = users", "µs per event", costs(cat, "items")),
            (f"per event vs batch size ({mid:,} items)", "batch size", "µs per event", costs(bat, "batch")),
            ("Milvus Lite call vs collection size", "rows", "ms per call (median)", milvus),
        ],
    )


def report(run: Run, train: list[dict[str, Any]], upsert: dict[str, Any], args: argparse.Namespace) -> None:
    cols = ["sweep", "items = users", "batch", "distinct items / users seen", "rows upserted", "train µs/event"]
    cols += ["publish µs/event", "flush µs/event", "total µs/event", "events/s", "RSS before training MiB"]
    cols += ["peak RSS MiB"]
    rows = [
        [
            r["sweep"],
            r["items"],
            r["batch"],
            f"{r['distinct_items']:,} / {r['distinct_users']:,}",
            r["rows_upserted"],
            r["train_us_per_event"],
            r["publish_us_per_event"],
            r["flush_us_per_event"],
            r["total_us_per_event"],
            r["events_per_s"],
            r["rss_before_training_mib"],
            r["peak_rss_mib"],
        ]
        for r in train
    ]
    run.payload["tables"].append(
        table(
            f"Cost per event and peak RSS: {args.events:,} synthetic events per config, app model + Milvus Lite",
            cols,
            rows,
            "One subprocess per row; peak RSS is VmHWM of that process (torch, Milvus Lite in-process, the "
            "generator and the model). Publish = Publisher.publish of the batch's distinct items and users.",
        )
    )
    up_rows = [
        [
            int(k),
            r["load_rows_per_s"],
            r["flush_s"],
            fmt_range({k2: v * 1e3 for k2, v in r["upsert_1000_existing_s"].items() if k2 != "n"}),
            fmt_range({k2: v * 1e3 for k2, v in r["upsert_1000_new_s"].items() if k2 != "n"}),
            fmt_range({k2: v * 1e3 for k2, v in r["get_20_s"].items() if k2 != "n"}),
            fmt_range({k2: v * 1e3 for k2, v in r["search_top20_s"].items() if k2 != "n"}),
            r["peak_rss_mib"],
        ]
        for k, r in upsert.items()
    ]
    run.payload["tables"].append(
        table(
            f"Milvus Lite cost vs collection size (dim {args.dim}, FLAT, after flush; ms, median (min–max) of "
            f"{args.repeats})",
            [
                "rows",
                "bulk load rows/s",
                "flush s",
                "upsert 1,000 existing ms",
                "upsert 1,000 new ms",
                "get 20 ids ms",
                "search top-20 ms",
                "peak RSS MiB",
            ],
            up_rows,
        )
    )
    plot = scale_plot(run.path("scale.png"), train, upsert, args.default_batch)
    run.payload["plots"].append(plot.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=100_000, help="events per train config")
    parser.add_argument("--catalogues", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--default-batch", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads in train workers")
    args = parser.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        with tempfile.TemporaryDirectory(prefix="ebrflow-scale-") as tmp:
            print(json.dumps(WORKERS[cfg["kind"]](cfg, Path(tmp))))
        return 0
    if args.smoke:
        args.events, args.catalogues, args.batches, args.default_batch = 1000, [1000], [256], 256
        args.sizes, args.repeats = [2000], 2
    run = Run("scale", "Scale: catalogue, batch size and collection size", args.out, argv, args.smoke)
    run.payload["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    train = []
    for cfg in train_configs(args):
        print(f"[scale] train {cfg}", flush=True)
        train.append({**cfg, **in_subprocess(cfg, args.timeout_s, args.smoke)})
    print(f"[scale] upsert sizes {args.sizes}", flush=True)
    upsert = in_subprocess(
        {"kind": "upsert", "sizes": args.sizes, "dim": args.dim, "repeats": args.repeats}, args.timeout_s
    )
    upsert.pop("process_wall_s", None)
    run.payload["results"] = {"train": train, "upsert": upsert}
    report(run, train, upsert, args)
    run.payload["notes"] += [
        "Synthetic stream: users = items, Zipf popularity, 60% of ids active at the start (stream.generator).",
        "Milvus flush: every 30 s during training (MilvusStore.flush_if_due); a forced flush before each "
        "collection-size measurement.",
        f"Collection sizes stop at {max(args.sizes):,} rows here (one collection grown through every size, in "
        "10k-row upserts; FACTS.md: Milvus Lite inserts ≈ 14k rows/s on this machine).",
        "The catalogue sweep keeps the event count fixed, so a bigger catalogue means more distinct ids touched "
        "(see that column), not a full catalogue in memory; a run shorter than the 30 s flush interval never "
        "flushes during training (flush µs/event ≈ 0).",
        f"Train workers run torch with {args.torch_threads} intra-op thread(s) (--torch-threads): other processes "
        "shared the 2 cores, and oversubscribed torch threads make per-event costs swing wildly (see throughput).",
    ]
    print(run.write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
