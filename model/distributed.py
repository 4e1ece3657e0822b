"""Data-parallel SSMTL over ``torch.distributed``: one replicated model, kept bit-identical on every rank.

Each step every rank contributes its local events (possibly none); ``ReplicatedTrainer.step``

1. all-gathers them in rank order (32 bytes per event: user, item, ts, weight), so every replica ingests the same
   global batch into the same graph (blend scoring, spectral refits, table growth, reservoir and RNG follow);
2. trains each chunk of the global events (``max_step_size`` per rank) data-parallel: rank r computes the loss on
   every ``world``-th event of the chunk, its own subgraph sampled with a seed drawn from the shared RNG;
3. averages the gradients: dense ones with one all-reduce (which also carries the guard's "not finite" flag and
   the losses), sparse id-table rows with an all-gather of (row, value) pairs that every rank coalesces the same
   way; every rank then applies the identical update, so the replicas never drift apart.

Ranks must call ``step`` the same number of times (a fixed cadence: a rank with no events passes an empty batch).
The gathered graph is the whole graph on every rank, so neighbours never live elsewhere (no approximation), at
the price of memory: every rank holds every id table (see README "Scaling out").
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ebrflow.model.base import Batch, TrainReport
from ebrflow.model.ssmtl import SSMTLModel
from ebrflow.model.training import StepResult, train_chunks

EVENT_BYTES = 32  # one exchanged event: user, item, ts (int64) and weight (float32 carried in an int64 slot)


@dataclass
class CommStats:
    """What this rank sent to collectives (payload bytes it contributed) and the seconds spent inside them.

    Collective time includes waiting for slower ranks, so it is the communication *and* imbalance cost.
    ``compute_seconds`` is this rank's training time outside collectives; ``replicated_seconds`` the part of it
    every rank repeats (graph ingest and spectral refits: the work data parallelism does not split).
    """

    bytes_events: int = 0
    bytes_grads: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    replicated_seconds: float = 0.0
    steps: int = 0
    by_op: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_total(self) -> int:
        """Event plus gradient payload bytes."""
        return self.bytes_events + self.bytes_grads


class ReplicatedTrainer:
    """Runs ``SSMTLModel`` data-parallel across the ranks of the default process group (see the module doc).

    ``served`` is what is published and checkpointed: the SSMTL model itself (its blocks and blend follow the global
    batch on every rank alike).
    """

    def __init__(self, model: SSMTLModel, group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(model, SSMTLModel):
            raise TypeError(f"ranks train the SSMTL model (model.kind = 'ssmtl'), not {type(model).__name__}")
        self.served = self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stats = CommStats()

    def _timed(self, op: str, fn: Callable[[], object], nbytes: int, kind: str) -> object:
        """Run one collective, adding its seconds and this rank's payload bytes to ``stats``."""
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.stats.seconds += dt
        self.stats.by_op[op] = self.stats.by_op.get(op, 0.0) + dt
        if kind == "events":
            self.stats.bytes_events += nbytes
        else:
            self.stats.bytes_grads += nbytes
        return out

    def _all_gather(self, tensor: torch.Tensor, op: str, kind: str) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        nbytes = tensor.numel() * tensor.element_size()
        self._timed(op, lambda: dist.all_gather(out, tensor, group=self.group), nbytes, kind)
        return out

    def exchange(self, batch: Batch, header: Sequence[int] = ()) -> tuple[Batch, np.ndarray]:
        """All ranks' events concatenated in rank order, and every rank's ``header`` (rows = ranks).

        ``header`` is a few int64 control values per rank (the pipeline's stop flag and acknowledged step ride here).
        """
        head = torch.tensor([len(batch), *header], dtype=torch.int64)
        heads = torch.stack(self._all_gather(head, "header", "events"))
        counts = heads[:, 0].tolist()
        width = max(counts)
        if width == 0:
            return Batch.of([], []), heads[:, 1:].numpy()
        packed = torch.zeros(width, 4, dtype=torch.int64)
        n = len(batch)
        if n:
            packed[:n, 0] = torch.from_numpy(batch.user_ids)
            packed[:n, 1] = torch.from_numpy(batch.item_ids)
            packed[:n, 2] = torch.from_numpy(batch.ts_ms)
            packed[:n, 3] = torch.from_numpy(batch.weights.astype(np.float64).view(np.int64))
        parts = [p[:c] for p, c in zip(self._all_gather(packed, "events", "events"), counts)]
        rows = torch.cat(parts).numpy()
        weights = rows[:, 3].copy().view(np.float64).astype(np.float32)
        return Batch(rows[:, 0].copy(), rows[:, 1].copy(), weights, rows[:, 2].copy()), heads[:, 1:].numpy()

    def step(self, batch: Batch, header: Sequence[int] = ()) -> tuple[Batch, TrainReport, np.ndarray]:
        """Exchange this rank's events, train every replica on the global batch; returns it, the report, headers."""
        global_batch, headers = self.exchange(batch, header)
        return global_batch, self.fit_global(global_batch), headers

    def fit_global(self, batch: Batch) -> TrainReport:
        """``SSMTLModel.fit_batch`` on the (identical on every rank) global batch, gradients averaged across ranks."""
        m = self.model
        if not len(batch):
            return TrainReport(loss=float("nan"), steps=0)
        t0 = time.perf_counter()
        comm0 = self.stats.seconds
        u, i = m.absorb(batch)
        self.stats.replicated_seconds += time.perf_counter() - t0
        ru, ri, rw = m.reservoir.sample(int(round(m.replay_ratio * len(batch))), m._rng)
        m.reservoir.add(u, i, batch.weights)
        users, items, weights = np.r_[u, ru], np.r_[i, ri], np.r_[batch.weights, rw].astype(np.float32)
        report = train_chunks(
            lambda idx: self._step(users[idx], items[idx], weights[idx]),
            len(users),
            m._rng,
            m.steps_per_batch,
            m.max_step_size * self.world,
            min_step_size=2 * self.world,
        )
        self.stats.steps += 1
        self.stats.compute_seconds += (time.perf_counter() - t0) - (self.stats.seconds - comm0)
        return report

    def _step(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> StepResult | None:
        """One synchronised optimiser step; this rank's share is every ``world``-th event of the chunk."""
        m = self.model
        seeds = m._rng.integers(2**62, size=self.world)  # drawn on every rank: the shared RNG stays in step
        mine = slice(self.rank, None, self.world)
        u, i, w = users[mine], items[mine], weights[mine]
        m._optimizer.zero_grad(set_to_none=True)
        losses = m.task_losses(m.subgraph(u, i, w, seed=int(seeds[self.rank])))
        names = list(losses)
        ok = all(torch.isfinite(v) for v in losses.values())
        task_w = m.balancer.combine(losses, m.encoder.shared_parameters()) if ok else dict.fromkeys(names, 0.0)
        total = sum(task_w[n] * losses[n] for n in names)
        if ok and m.l2 > 0:
            total = total + m.l2 * m.root_norm(u, i)
        ok = ok and bool(torch.isfinite(total))
        if ok:
            total.backward()
        figures = [float(total.detach()) if ok else 0.0, *(float(losses[n].detach()) if ok else 0.0 for n in names)]
        figures += [float(task_w[n]) for n in names]
        synced = self._sync_gradients(bad=not ok, figures=figures)
        if synced is None:
            m._optimizer.zero_grad(set_to_none=True)
            return None
        m._optimizer.step()
        m._version += 1
        k = len(names)
        return StepResult(synced[0], dict(zip(names, synced[1 : 1 + k])), dict(zip(names, synced[1 + k :])))

    def _dense(self) -> list[torch.nn.Parameter]:
        return list(self.model.tasks.parameters())

    def _sync_gradients(self, bad: bool, figures: list[float]) -> list[float] | None:
        """Average every gradient across ranks in place; None when any rank's loss or gradient was not finite."""
        dense = self._dense()
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in dense]
        extra = torch.tensor([float(bad), *figures], dtype=torch.float32)
        buf = torch.cat([*flat, extra])
        nbytes = buf.numel() * buf.element_size()
        self._timed("dense", lambda: dist.all_reduce(buf, group=self.group), nbytes, "grads")
        buf /= self.world
        tail = buf[-len(extra) :].tolist()
        sparse_ok = self._sync_sparse()
        if tail[0] > 0 or not sparse_ok or not torch.isfinite(buf[: -len(extra)].square()).all():
            return None
        offset = 0
        for p in dense:
            n = p.numel()
            p.grad = buf[offset : offset + n].view_as(p).clone()
            offset += n
        return tail[1:]

    def _sync_sparse(self) -> bool:
        """Gather every rank's id-table gradient rows; set the identical averaged sparse gradient on every rank."""
        tables = [t.weight for t in self.model.encoder.tables]
        idx, vals = [], []
        for p in tables:
            g = p.grad.coalesce() if p.grad is not None else None
            idx.append(g.indices()[0] if g is not None else torch.zeros(0, dtype=torch.int64))
            vals.append(g.values() if g is not None else torch.zeros(0, p.shape[1]))
        counts = torch.tensor([len(x) for x in idx], dtype=torch.int64)
        all_counts = torch.stack(self._all_gather(counts, "sparse", "grads"))
        width = int(all_counts.sum(1).max())
        dim = tables[0].shape[1]
        rows = torch.zeros(width, dtype=torch.int64)
        values = torch.zeros(width, dim)
        n = int(counts.sum())
        if n:
            rows[:n], values[:n] = torch.cat(idx), torch.cat(vals)
        g_rows = self._all_gather(rows, "sparse", "grads")
        g_vals = self._all_gather(values, "sparse", "grads")
        ok = True
        for t, p in enumerate(tables):
            r_parts, v_parts = [], []
            for r in range(self.world):
                start = int(all_counts[r, :t].sum())
                end = start + int(all_counts[r, t])
                r_parts.append(g_rows[r][start:end])
                v_parts.append(g_vals[r][start:end])
            v = torch.cat(v_parts) / self.world
            if not len(v):
                p.grad = None
                continue
            ok = ok and bool(torch.isfinite(v.square()).all())
            rows_t = torch.cat(r_parts).unsqueeze(0)
            p.grad = torch.sparse_coo_tensor(rows_t, v, p.shape, check_invariants=False).coalesce()
        return ok


def verify_replicas(trainer: ReplicatedTrainer) -> bool:
    """Compare every rank's ``replica_digest``; if any differs, every rank loads rank 0's state. True if all agreed.

    Replicas stay identical only while every rank computes bit-identical results (same kernels, BLAS, thread
    counts): on mixed machines a spectral refit may differ in its last bits. The ranked loop calls this with each
    checkpoint, so a divergence is logged and repaired instead of growing silently.
    """
    digests: list[str | None] = [None] * trainer.world
    dist.all_gather_object(digests, replica_digest(trainer.served), group=trainer.group)
    if len(set(digests)) == 1:
        return True
    state = [trainer.served.state_dict() if trainer.rank == 0 else None]
    dist.broadcast_object_list(state, src=dist.get_global_rank(trainer.group, 0) if trainer.group else 0,
                               group=trainer.group)  # fmt: skip
    trainer.served.load_state_dict(state[0])  # on every rank, rank 0 too: the sampling RNG restarts alike
    return False


def replica_digest(model: SSMTLModel) -> str:
    """SHA-256 of every tensor a replica holds (parameters, buffers, optimiser moments, graph) and its version."""
    h = hashlib.sha256()

    def feed(obj: object) -> None:
        if torch.is_tensor(obj):
            t = obj.coalesce() if obj.is_sparse else obj
            if t.is_sparse:
                feed(t.indices())
                feed(t.values())
            else:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, np.ndarray):
            h.update(np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, list | tuple):
            for x in obj:
                feed(x)
        else:
            h.update(repr(obj).encode())

    feed(model.state_dict())
    return h.hexdigest()


def owner(ids: np.ndarray, world: int) -> np.ndarray:
    """The rank that publishes each id's Milvus row (one writer per row): a splitmix64 hash of the id mod ``world``.

    >>> owner(np.array([0, 1, 2, 3, 2**62]), 2).tolist()
    [1, 1, 0, 1, 1]
    """
    x = np.asarray(ids, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(world)).astype(np.int64)
