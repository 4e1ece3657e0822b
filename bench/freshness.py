"""Freshness: from producing an event with a brand-new item to that item's embedding being readable in Milvus.

Usage: ``python -m bench.freshness`` (500 and 2,000 events/s, 60 s each) or ``--smoke``. The real trainer
(``ebrflow.app.build_trainer``: embedded Tansu → micro-batches → two_tower → Milvus Lite) runs in a thread; a
producer thread sends at a steady rate, and every ``--every``-th event carries a never-seen item id. A third
thread polls ``MilvusStore.get`` on the trainer's own client (Milvus Lite allows one process per directory)
every ``--poll-ms`` and stamps when each new item first appears. Latency = first visible − wall time at send.
The trainer's own ``ebrflow_freshness_seconds`` histogram (Kafka record time → publish) is reported beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import quantiles, quiet_logs, start_timed_trainer, synthetic, trainer_settings
from bench.output import Run, add_common_args, table
from bench.plots import cdfs
from ebrflow.app import Trainer
from ebrflow.config import Settings
from ebrflow.stream.broker import EmbeddedBroker
from ebrflow.stream.kafka_io import ensure_topics, make_producer
from ebrflow.stream.replay import Pacer
from ebrflow.stream.schema import Event, EventCodec

NEW_ITEM_BASE = 10**12


def histogram(trainer: Trainer, name: str = "ebrflow_freshness_seconds") -> dict[float, float]:
    """Cumulative bucket counts ``le → count`` of one of the trainer's histograms."""
    out: dict[float, float] = {}
    for family in trainer.metrics.registry.collect():
        for s in family.samples:
            if s.name == f"{name}_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus-style quantile from cumulative buckets (linear inside a bucket); NaN without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


class Prober:
    """Producer and poller threads for one measured phase; ``sent``/``seen`` map new item ids to wall times."""

    def __init__(self, trainer: Trainer, bootstrap: str, topic: str, rate: float, every: int, poll_s: float) -> None:
        self.trainer, self.bootstrap, self.topic = trainer, bootstrap, topic
        self.rate, self.every, self.poll_s = rate, every, poll_s
        self.sent: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.produced = 0
        self.measuring = threading.Event()
        self.stop_producing = threading.Event()
        self.stop_polling = threading.Event()
        self.polls = 0

    def produce(self, events: Any) -> None:
        """Send events at ``rate``; while measuring, every ``every``-th event gets a brand-new item id."""
        producer, codec, pacer = make_producer(self.bootstrap), EventCodec(), Pacer(rate=self.rate)
        users, items = events.user_ids.tolist(), events.item_ids.tolist()
        k = 0
        try:
            while not self.stop_producing.is_set():
                n = self.produced
                pacer.wait(0)
                user, item = users[n % len(users)], items[n % len(items)]
                sample = self.measuring.is_set() and n % self.every == 0
                if sample:
                    item = NEW_ITEM_BASE + k
                    k += 1
                now = time.time()
                ev = Event(user_id=user, item_id=item, ts=int(now * 1000))
                producer.send(self.topic, key=str(user).encode(), value=codec.encode(ev))
                if sample:
                    self.sent[item] = now
                self.produced += 1
        finally:
            producer.flush()
            producer.close()

    def poll(self) -> None:
        """Ask Milvus for the pending new items every ``poll_s``; stamp the first time each is returned."""
        store = self.trainer.store
        while not self.stop_polling.is_set():
            pending = [i for i in list(self.sent) if i not in self.seen]
            if pending:
                found = store.get(store.items, pending, fields=("version",))
                now = time.time()
                for i in found:
                    self.seen.setdefault(i, now)
                self.polls += 1
            time.sleep(self.poll_s)


def measure_rate(
    args: argparse.Namespace, bootstrap: str, rate: float, workdir: Path, events: Any, threads: int, on_demand: bool
) -> dict[str, Any]:
    tag = f"{int(rate)}-t{threads}-{'d' if on_demand else 'w'}"
    topic = f"bench.fresh.{tag}"
    ensure_topics(bootstrap, {topic: 4})
    model = {"threads": threads}  # build_model sets torch's thread count from model.threads
    batch = {"on_demand": on_demand}
    settings = trainer_settings(
        bootstrap, topic, f"fresh-{tag}", workdir / tag, kafka=args.kafka, model=model, batch=batch
    )
    trainer, _ = start_timed_trainer(settings)
    probe = Prober(trainer, bootstrap, topic, rate, args.every, args.poll_ms / 1000)
    threads = [
        threading.Thread(target=trainer.run, kwargs={"idle_exit_s": None}, daemon=True),
        threading.Thread(target=probe.produce, args=(events,), daemon=True),
        threading.Thread(target=probe.poll, daemon=True),
    ]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while trainer.metrics.events_trained._value.get() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # wait for the group join and the first published batch
        time.sleep(args.warmup_s)
        before, trained0, produced0 = histogram(trainer), trainer.metrics.events_trained._value.get(), probe.produced
        t0 = time.monotonic()
        probe.measuring.set()
        time.sleep(args.seconds)
        probe.measuring.clear()
        produced, elapsed = probe.produced - produced0, time.monotonic() - t0
        trained = trainer.metrics.events_trained._value.get() - trained0
        after = histogram(trainer)
        probe.stop_producing.set()
        drain = time.monotonic() + args.drain_s
        while len(probe.seen) < len(probe.sent) and time.monotonic() < drain:
            time.sleep(0.05)
    finally:
        probe.stop_producing.set()
        probe.stop_polling.set()
        trainer.pipeline.stop()
        for t in threads:
            t.join(timeout=60)
        trainer.close()
    latencies = [probe.seen[i] - t for i, t in probe.sent.items() if i in probe.seen]
    trainer_hist = {le: after[le] - before.get(le, 0.0) for le in after}
    return {
        "rate_target": rate,
        "rate_achieved": produced / elapsed,
        "trained_rate": trained / elapsed,
        "sampled": len(probe.sent),
        "found": len(latencies),
        "polls": probe.polls,
        "latency_s": quantiles(latencies) | {"max": float(np.max(latencies)) if latencies else float("nan")},
        "trainer_histogram_s": {f"p{round(q * 100)}": histogram_quantile(q, trainer_hist) for q in (0.5, 0.95, 0.99)},
        "trainer_histogram_count": trainer_hist.get(float("inf"), 0.0),
        "latencies": latencies,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0, 2000.0], help="events/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured phase per rate")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="after the first batch, before measuring")
    parser.add_argument("--drain-s", type=float, default=30.0, help="max wait for the last sampled items")
    parser.add_argument("--every", type=int, default=50, help="every N-th event carries a brand-new item")
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch thread counts (default: torch's, then 1)"
    )
    parser.add_argument(
        "--on-demand",
        nargs="+",
        choices=["true", "false"],
        default=["true"],
        help="batch.on_demand settings to run (the default true; false: batches close only at the timer or size)",
    )
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    args.threads = args.threads or ([default_threads] if args.smoke else list(dict.fromkeys([1, default_threads])))
    if args.smoke:
        args.rates, args.seconds, args.warmup_s, args.drain_s, args.every = [200.0], 2.0, 0.5, 10.0, 20
    args.kafka = {"session_timeout_ms": 2000} if args.smoke else {}
    quiet_logs()
    run = Run("freshness", "Freshness: produce → embedding readable in Milvus", args.out, argv, args.smoke)
    run.payload["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    events = synthetic(200_000 if not args.smoke else 5_000)
    results: dict[str, Any] = {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="ebrflow-fresh-") as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rate in args.rates:
                for on_demand in (flag == "true" for flag in args.on_demand):
                    print(f"[freshness] {rate:g} events/s for {args.seconds:g} s, threads {threads}", flush=True)
                    r = measure_rate(args, broker.bootstrap_servers, rate, Path(tmp), events, threads, on_demand)
                    key = f"{rate:g} events/s, threads={threads}, on_demand={on_demand}"
                    results[key] = r | {"torch_threads": threads, "on_demand": on_demand}
        torch.set_num_threads(default_threads)
    rows = []
    for r in results.values():
        lat, hist = r["latency_s"], r["trainer_histogram_s"]
        rows.append(
            [
                r["torch_threads"],
                "on" if r.get("on_demand", False) else "off",
                r["rate_target"],
                r["rate_achieved"],
                r["trained_rate"],
                f"{r['found']}/{r['sampled']}",
                lat["p50"],
                lat["p95"],
                lat["p99"],
            ]
            + [lat["max"], hist["p50"], hist["p95"], hist["p99"]]
        )
    run.payload["tables"].append(
        table(
            "Freshness (seconds): produce → new item's embedding returned by a Milvus get",
            [
                "torch threads",
                "batch.on_demand",
                "target events/s",
                "achieved events/s",
                "trained events/s",
                "found/sampled",
                "p50",
                "p95",
                "p99",
                "max",
                "trainer histogram p50",
                "p95",
                "p99",
            ],
            rows,
            "Trainer histogram quantiles are interpolated inside ebrflow_freshness_seconds' buckets "
            "(0.1, 0.25, 0.5, 1, 2, 5, … s), so they are coarse; it measures Kafka record time → publish done.",
        )
    )
    series = {k: r["latencies"] for k, r in results.items()}
    run.payload["plots"].append(cdfs(run.path("freshness.png"), series, "Produce → visible in Milvus", "seconds").name)
    run.payload["results"] = results
    defaults = Settings()
    run.payload["notes"] += [
        f"Trainer: ebrflow defaults ({defaults.model.kind} dim {defaults.model.dim} with the served popularity "
        f"prior, micro-batch closes at {defaults.batch.max_events:,} events or {defaults.batch.max_wait_ms} ms, "
        "or when the idle loop asks for one with batch.on_demand on, the default), "
        f"{defaults.milvus.index_type} index, Milvus Lite) with session_timeout_ms=6000; synthetic users/items "
        "(10k/5k) for the other events.",
        f"Every {args.every}th event during the {args.seconds:g} s measured phase has a brand-new item id; "
        f"the poller asks Milvus every {args.poll_ms:g} ms, which adds up to that much to each latency.",
        f"torch threads = model.threads (ebrflow's default 1; {default_threads} is torch's own default here): "
        "oversubscribed torch threads are far slower when other jobs share the cores (see throughput).",
        "Producer, poller and trainer share one Python process (and the GIL) and the machine's 2 cores with "
        "other jobs.",
    ]
    print(run.write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
