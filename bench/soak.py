"""Soak: a multi-million-event synthetic run through the real pipeline, sampling RSS and open file descriptors.

`python -m bench.soak [--events 2000000]`: an embedded Tansu broker, a producer thread sending the synthetic
stream (fixed catalogue, so a flat memory curve is the expectation after warm-up), and the trainer in the same
process (consume → train → publish to Milvus Lite → commit, drift and evaluation on). Every few seconds it
records the process's RSS (/proc/self/status VmRSS), open fds (/proc/self/fd) and events trained.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from itertools import takewhile
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.harness import quiet_logs, trainer_settings  # noqa: E402
from bench.output import Run, add_common_args, table  # noqa: E402
from ebrflow.app import build_trainer  # noqa: E402
from ebrflow.stream.broker import EmbeddedBroker  # noqa: E402
from ebrflow.stream.generator import SyntheticStream  # noqa: E402
from ebrflow.stream.kafka_io import ensure_topics, make_producer  # noqa: E402
from ebrflow.stream.replay import events_from_arrays, produce  # noqa: E402


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def growth_per_million(samples: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS (MiB) over events trained (millions): the growth per million events.

    >>> growth_per_million([{"trained": 1e6, "rss_mib": 100.0}, {"trained": 3e6, "rss_mib": 110.0}])
    5.0
    """
    x = np.array([s["trained"] / 1e6 for s in samples])
    y = np.array([s["rss_mib"] for s in samples])
    return float(np.polyfit(x, y, 1)[0]) if len(samples) > 1 and np.ptp(x) > 0 else float("nan")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--expire-after-s", type=float, default=0.0, help="run.expire_after_s (event time; the stream: 50 ms/event)"
    )
    args = parser.parse_args(argv)
    n = 20_000 if args.smoke else args.events
    interval = 0.5 if args.smoke else args.interval
    name = "soak_expiry" if args.expire_after_s else "soak"  # both kept: with expiry, and the growth without it
    title = "Soak: RSS and open file descriptors over a long run" + (" with expiry" if args.expire_after_s else "")
    run = Run(name, title, args.out, argv, args.smoke)
    run.payload["command"] = run.payload["command"].replace(f"bench.{name}", "bench.soak")
    quiet_logs()
    samples: list[dict[str, float]] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = trainer_settings(
            broker.bootstrap_servers,
            "soak.events",
            "soak",
            Path(tmp),
            kafka={"partitions": 4},
            run={"checkpoint_every_batches": 200, "expire_after_s": args.expire_after_s},
        )
        ensure_topics(broker.bootstrap_servers, {"soak.events": 4})
        trainer = build_trainer(settings, broker.bootstrap_servers)
        stop = threading.Event()
        producer = make_producer(broker.bootstrap_servers)
        stream = SyntheticStream(users=20_000, items=5_000, initial_fraction=1.0, seed=3)
        events = takewhile(lambda _: not stop.is_set(), events_from_arrays(stream.chunks(n, chunk=10_000)))
        sender = threading.Thread(target=produce, args=(producer, "soak.events", events), daemon=True)
        runner = threading.Thread(target=trainer.run, kwargs={"max_events": n, "idle_exit_s": 120}, daemon=True)
        t0 = time.monotonic()
        sender.start()
        runner.start()
        while runner.is_alive():
            samples.append(
                {
                    "t_s": time.monotonic() - t0,
                    "rss_mib": rss_mib(),
                    "fds": open_fds(),
                    "trained": trainer.metrics.events_trained._value.get(),
                }
            )
            runner.join(timeout=interval)
        samples.append(
            {
                "t_s": time.monotonic() - t0,
                "rss_mib": rss_mib(),
                "fds": open_fds(),
                "trained": trainer.metrics.events_trained._value.get(),
            }
        )
        stop.set()
        sender.join(timeout=30)
        producer.close(timeout=5)
        trainer.close()
    wall = time.monotonic() - t0
    trained = samples[-1]["trained"] if samples else 0
    warm = [s for s in samples if s["trained"] >= 0.2 * n] or samples
    first, last = warm[0], warm[-1]
    rss = [s["rss_mib"] for s in warm]
    slope = growth_per_million(warm)
    run.payload["settings"] = {
        "events": n,
        "interval_s": interval,
        "users": 20_000,
        "items": 5_000,
        "expire_after_s": args.expire_after_s,
    }
    run.payload["results"] = {
        "samples": samples,
        "trained": trained,
        "wall_s": wall,
        "warm_rss_first_mib": first["rss_mib"],
        "warm_rss_last_mib": last["rss_mib"],
        "warm_rss_min_mib": min(rss),
        "warm_rss_max_mib": max(rss),
        "warm_fds_first": first["fds"],
        "warm_fds_last": last["fds"],
        "warm_rss_mib_per_million_events": slope,
        "expired": {c: trainer.metrics.expired.labels(c)._value.get() for c in ("items", "users")},
    }
    run.payload["tables"].append(
        table(
            "Soak: after warm-up (≥ 20% of events trained)",
            [
                "events trained",
                "wall s",
                "events/s",
                "expire_after_s",
                "RSS first → last MiB",
                "RSS min–max MiB",
                "RSS growth MiB per million events (target ≤ 5 with expiry)",
                "fds first → last",
            ],
            [
                [
                    int(trained),
                    wall,
                    trained / wall,
                    args.expire_after_s or "off",
                    f"{first['rss_mib']:.0f} → {last['rss_mib']:.0f}",
                    f"{min(rss):.0f}–{max(rss):.0f}",
                    slope,
                    f"{first['fds']} → {last['fds']}",
                ]
            ],
        )
    )
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    xs = [s["trained"] / 1e6 for s in samples]
    a1.plot(xs, [s["rss_mib"] for s in samples], color="tab:blue")
    a1.set_ylabel("RSS (MiB)")
    a1.set_title("Soak: trainer process RSS and open fds vs events trained")
    a2.plot(xs, [s["fds"] for s in samples], color="tab:orange")
    a2.set_ylabel("open fds")
    a2.set_xlabel("events trained (millions)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.path(f"{name}.png"), dpi=110)
    plt.close(fig)
    run.payload["plots"].append(f"{name}.png")
    print(run.write())


if __name__ == "__main__":
    main()
