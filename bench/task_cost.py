"""Cost of one training step per task, and of MGDA, at batch sizes 256 / 1,024 / 4,096 (median of repeats).

Usage: ``python -m bench.task_cost``. A synthetic graph is pre-filled so sampling sees realistic degrees.
Each figure is forward + backward of that task alone on a freshly sampled subgraph; "sampling" is the
subgraph sampling; "mgda gradients" is the per-task gradients w.r.t. the shared parameters and "mgda solve"
the Frank–Wolfe min-norm solve on them; "step fixed" / "step mgda" are whole ``fit_batch`` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ebrflow.model.balancing import MGDA, min_norm_weights
from ebrflow.model.base import Batch
from ebrflow.model.ssmtl import SSMTLModel
from ebrflow.model.tasks import TASKS

RESULTS = Path(__file__).parent / "results"


def synthetic(n: int, n_users: int, n_items: int, rng: np.random.Generator) -> Batch:
    """Zipf-ish popularity events."""
    users = rng.integers(0, n_users, n)
    items = np.minimum(rng.zipf(1.3, n) - 1, n_items - 1) + 10 * rng.integers(0, n_items // 10, n) % n_items
    return Batch.of(users, items)


def model_args(args: argparse.Namespace) -> dict:
    """Model size flags (defaults are the model's own defaults)."""
    return {"dim": args.dim, "fanouts": tuple(args.fanouts)}


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(batch_size: int, args: argparse.Namespace) -> dict[str, float]:
    """Every figure for one batch size."""
    rng = np.random.default_rng(0)
    model = SSMTLModel(
        tasks={name: {} for name in TASKS},
        max_step_size=max(batch_size, 2048),
        replay_ratio=0.0,
        device="cpu",
        **model_args(args),
    )
    model.fit_batch(synthetic(args.prefill, args.users, args.items, rng))
    batch = synthetic(batch_size, args.users, args.items, rng)
    u, i = model.ingest(batch)
    w = batch.weights
    out = {"sampling": median_ms(lambda: model.subgraph(u, i, w), args.repeats)}

    def task_step(name: str) -> None:
        model.encoder.zero_grad(set_to_none=True)
        sub = model.subgraph(u, i, w)
        model.tasks[name].loss(sub, model.encoder).backward()

    for name in TASKS:
        out[name] = median_ms(lambda name=name: task_step(name), args.repeats) - out["sampling"]
    shared = model.encoder.shared_parameters()
    mgda = MGDA()

    def grads() -> torch.Tensor:
        return mgda.task_gradients(model.task_losses(model.subgraph(u, i, w)), shared)

    g = grads()
    all_losses_ms = median_ms(lambda: model.task_losses(model.subgraph(u, i, w)), args.repeats)
    out["mgda gradients"] = median_ms(grads, args.repeats) - all_losses_ms
    out["mgda solve"] = median_ms(lambda: min_norm_weights(mgda_normalise(g)), args.repeats)
    for kind in ("fixed", "mgda"):
        m = SSMTLModel(
            balancing=kind, max_step_size=max(batch_size, 2048), replay_ratio=0.0, device="cpu", **model_args(args)
        )
        m.fit_batch(synthetic(args.prefill, args.users, args.items, np.random.default_rng(0)))
        out[f"step {kind}"] = median_ms(
            lambda m=m: m.fit_batch(synthetic(batch_size, args.users, args.items, rng)), args.repeats
        )
    return {k: round(v, 2) for k, v in out.items()}


def throughput(args: argparse.Namespace, balancing: str) -> float:
    """Micro-batches per second through ``fit_batch`` with default settings (replay included)."""
    rng = np.random.default_rng(1)
    model = SSMTLModel(balancing=balancing, device="cpu", **model_args(args))
    model.fit_batch(synthetic(args.prefill, args.users, args.items, rng))
    n_batches = args.throughput_batches
    batches = [synthetic(args.throughput_events, args.users, args.items, rng) for _ in range(n_batches + 1)]
    model.fit_batch(batches[0])
    start = time.perf_counter()
    for b in batches[1:]:
        model.fit_batch(b)
    return n_batches / (time.perf_counter() - start)


def mgda_normalise(g: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows, as the MGDA balancer does before solving."""
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)


def main(argv: list[str] | None = None) -> dict:
    """Measure every batch size and write JSON + Markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--fanouts", type=int, nargs="+", default=[10, 5])
    p.add_argument("--throughput-batches", type=int, default=30)
    p.add_argument("--throughput-events", type=int, default=1024)
    p.add_argument("--out", type=Path, default=RESULTS / "task_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {str(b): measure(b, args) for b in args.batch_sizes}
    rates = {kind: round(throughput(args, kind), 2) for kind in ("fixed", "mgda")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "unit": "ms (median)",
        "model": f"dim {args.dim}, fanouts {args.fanouts}, capacity 32, SSL fractions 0.25",
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results, "batches_per_s": rates}, indent=2)
    )
    names = list(next(iter(results.values())))
    lines = ["| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for b, row in results.items():
        lines.append(f"| {b} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    text = (
        f"# Training-step cost per task (ms, median of {args.repeats}, {args.threads} threads)\n\n"
        "Task columns: forward + backward of that task alone, sampling excluded. "
        "`step fixed` / `step mgda`: a whole `fit_batch` with retrieval + CCA-SSG + GraphMAE.\n\n"
    )
    lines.append(
        f"\nDefault `SSMTLModel()` on {args.throughput_events}-event micro-batches (replay 0.25, one step each): "
        f"{rates['fixed']} batches/s with fixed weights, {rates['mgda']} with MGDA."
    )
    args.out.with_suffix(".md").write_text(text + "\n".join(lines) + "\n")
    print(text + "\n".join(lines))
    return {**results, "batches_per_s": rates}


if __name__ == "__main__":
    main()
