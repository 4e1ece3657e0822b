"""Shadow A/B overhead: end-to-end events/s of one trainer with 0, 1 and 2 extra model variants.

Usage: ``python -m bench.variants`` (``--smoke`` for tiny sizes). Every configuration consumes the same
pre-produced synthetic events through the whole pipeline (embedded broker, Milvus Lite), in interleaved rounds;
the variants are the old two-tower default and the SSMTL default with a sparser spectral refit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import preproduce, quiet_logs, run_trainer, synthetic, trainer_settings
from bench.output import Run, add_common_args, table
from ebrflow.stream.broker import EmbeddedBroker

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "no variant": {},
    "+ two_tower": {"tt": {"kind": "two_tower"}},
    "+ two_tower + ssmtl (refit every 512)": {"tt": {"kind": "two_tower"}, "ss": {"options": {"spectral_every": 512}}},
}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write bench/results/variants.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.events, args.repeats = 1_000, 1
    quiet_logs()
    run = Run("variants", "Shadow A/B: overhead per extra model variant", args.out, argv, args.smoke)
    run.payload["settings"] = {"events": args.events, "repeats": args.repeats}
    events = synthetic(args.events)
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="ebrflow-variants-") as tmp:
        topic = "bench-variants.events"
        preproduce(broker.bootstrap_servers, topic, events)
        k = 0
        for _ in range(args.repeats):
            for name, variants in CONFIGS.items():
                k += 1
                settings = trainer_settings(
                    broker.bootstrap_servers, topic, f"variants-{k}", Path(tmp) / str(k), model={"variants": variants}
                )
                r = run_trainer(settings, args.events)
                rates[name].append(r.events_per_s)
                print(f"[variants] {name}: {r.events_per_s:,.0f} events/s", flush=True)
    base = statistics.median(rates["no variant"])
    results = {
        name: {"variants": len(CONFIGS[name]), "events_per_s": statistics.median(r), "runs": r, "relative": None}
        for name, r in rates.items()
    }
    for r in results.values():
        r["relative"] = r["events_per_s"] / base if base else None
    run.payload["results"] = results
    run.payload["tables"].append(
        table(
            f"End to end with shadow variants ({args.events:,} events, median of {args.repeats} interleaved rounds)",
            ["configuration", "extra variants", "events/s", "relative to none"],
            [[n, r["variants"], r["events_per_s"], r["relative"]] for n, r in results.items()],
            "Each variant scores, trains and writes its own collections synchronously in the trainer's thread.",
        )
    )
    print(run.write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
