"""SSMTL: a LightGCN block trained per micro-batch on retrieval plus self-supervised tasks, served beside
training-free blocks.

A served vector is ``[learned | spectral | popularity]``; one inner product adds the three scores:
- learned: free id embeddings pooled with one LightGCN hop over the node's buffered neighbours, for users and items
  alike (``½ e + ½ Σ d_self^½ / n_buf · d_nbr^-½ · e_nbr``), trained with an in-batch softmax over cosines;
  served un-normalised (the length carries popularity). Bounded: O(neighbour capacity) per row, whatever the graph.
- spectral (``model.spectral_block``): rank-k item-kNN from the live graph, no training, refitted as it grows;
- popularity (``model.prior.RecentPopularity``): log of each item's recent share of events.
The user side weights the learned block against the training-free ones, per cold/warm segment, with the mix that
ranked held-out events best (``model.blend``): a stream is served mostly by the training-free blocks, a catalogue
trained for epochs by the learned block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from ebrflow.model.balancing import make_balancer
from ebrflow.model.base import Batch, TrainReport
from ebrflow.model.blend import CANDIDATES, BlendSelector, held_out_ranks
from ebrflow.model.encoder import GraphEncoder, Tree
from ebrflow.model.frequency import ItemFrequency
from ebrflow.model.graph import USER, GraphStore
from ebrflow.model.prior import RecentPopularity
from ebrflow.model.replay import Reservoir
from ebrflow.model.spectral_block import SpectralBlock
from ebrflow.model.tables import regrow_optimizer_state
from ebrflow.model.tasks import Subgraph, Task, parse_tasks
from ebrflow.model.training import JointOptimizer, StepResult, finite_step, train_chunks
from ebrflow.model.two_tower import pick_device

log = logging.getLogger(__name__)

DEFAULT_TASKS: dict[str, dict[str, Any]] = {"retrieval": {}}  # the ``tasks`` settings when none are given
BLENDS = {"auto": CANDIDATES, "learned": ((1.0, 0.0, 0.0),), "free": ((0.0, 1.0, 1.0),)}


def split_dims(dim: int, spectral_dim: int | None, popularity: bool) -> tuple[int, int]:
    """(learned, spectral) columns of a ``dim``-wide served vector; by default the spectral block takes half of
    what the popularity coordinate leaves (64 → 32 learned, 31 spectral, 1 popularity).

    >>> split_dims(64, None, True), split_dims(64, 0, False)
    ((32, 31), (64, 0))
    """
    rest = dim - int(popularity)
    spectral = rest // 2 if spectral_dim is None else spectral_dim
    if not 0 <= spectral <= rest - 2:
        raise ValueError(f"spectral_dim must leave the learned block at least 2 of the {rest} columns, got {spectral}")
    return rest - spectral, spectral


class SSMTLModel:
    """Self-supervised multi-task graph retrieval model (Snap's SSMTL with ParetoGNN's MGDA), trained incrementally.

    Each ``fit_batch`` first scores the blends on the batch (held out: not yet trained on), then adds the events to
    the live graph and runs ``steps_per_batch`` passes over them mixed with ``replay_ratio``·len(batch) events
    replayed from a reservoir, in chunks of at most ``max_step_size``. A step computes each task's loss on the
    chunk's subgraph (retrieval trains on exactly the served trees), weights them ("fixed" or "mgda") and takes one
    guarded optimiser step: a non-finite loss or gradient skips it (``TrainReport.skipped_steps``). ``tasks`` are
    settings by task name (``model.tasks.registry``), e.g. ``{"retrieval": {}, "cca_ssg": {"weight": 0.1}}``.
    ``blend``: "auto" (chosen on held-out events), "learned" or "free" (one kind of block only).
    """

    def __init__(
        self,
        *,
        dim: int = 64,
        spectral_dim: int | None = None,
        popularity_half_life: float = 1000.0,
        popularity_scale: float = 0.1,
        popularity_lifetime: float = 0.0,
        blend: Literal["auto", "learned", "free"] = "auto",
        lr: float = 0.001,
        dense_lr: float = 0.001,
        l2: float = 1e-5,
        init_std: float = 0.005,
        fanouts: tuple[int, ...] = (10, 5),
        neighbour_capacity: int = 32,
        ttl_ms: int | None = None,
        graph_mode: Literal["bipartite", "user_user"] = "bipartite",
        symmetric: bool | None = None,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        balancing: Literal["fixed", "mgda"] = "fixed",
        reservoir_size: int = 100_000,
        replay_ratio: float = 0.25,
        steps_per_batch: int = 1,
        max_step_size: int = 2048,
        spectral_every: int = 256,
        spectral_growth: float = 0.03,
        spectral_iters: int = 0,
        spectral_a: float = 0.0,
        spectral_b: float = 0.5,
        spectral_power: float = 1.0,
        key_degree: float = 0.0,
        recency_half_life: float = 20.0,
        select_events: int = 256,
        select_items: int = 1024,
        cold_max_events: int = 5,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        specs = parse_tasks(DEFAULT_TASKS if tasks is None else tasks)
        torch.manual_seed(seed)
        self.dim, self.lr, self.dense_lr, self.l2, self.fanouts = dim, lr, dense_lr, l2, tuple(fanouts)
        self.replay_ratio, self.steps_per_batch, self.max_step_size = replay_ratio, steps_per_batch, max_step_size
        self.balancing, self.seed, self.recency_half_life = balancing, seed, recency_half_life
        self.select_events, self.select_items, self.blend = select_events, select_items, blend
        self.popularity_scale = popularity_scale if popularity_half_life > 0 else 0.0
        self.learned_dim, spectral_dim = split_dims(dim, spectral_dim, popularity_half_life > 0)
        self.device = pick_device(device)
        self.graph = GraphStore(graph_mode, symmetric, neighbour_capacity, ttl_ms, seed)
        self.encoder = GraphEncoder(self.learned_dim, self.graph.n_types, len(self.fanouts), init_std=init_std)
        self.encoder.to(self.device)
        self.spectral = SpectralBlock(
            self.graph,
            spectral_dim,
            a=spectral_a,
            b=spectral_b,
            power=spectral_power,
            every=spectral_every,
            growth=spectral_growth,
            iters=spectral_iters,
            key_degree=key_degree,
            recency_half_life=recency_half_life,
            seed=seed,
        )
        self.popularity = RecentPopularity(popularity_half_life or 1.0, popularity_lifetime)
        self.selector = BlendSelector(BLENDS[blend], cold_max_events)
        self.selecting = True  # score blends on each batch before training on it (a backfill's later epochs: off)
        self._version = 0
        self.tasks = torch.nn.ModuleDict()
        self.task_weights: dict[str, float] = {}  # task name → loss weight (fixed balancing)
        for spec in specs:
            self.add_task(spec.build(self.learned_dim), spec.weight)
        self.frequency = ItemFrequency()
        self.reservoir = Reservoir(reservoir_size, seed)
        self._is_target = np.zeros(0, dtype=bool)
        self._rng = np.random.default_rng(seed)

    def add_task(self, task: Task, weight: float | None = None) -> None:
        """Train ``task`` too, its loss weighted by ``weight`` under fixed balancing (None: ``task.default_weight``).

        Tasks are added before training: the optimiser (which holds the task's heads) and the balancer are rebuilt.
        """
        if self._version:
            raise RuntimeError("add tasks before the first training step")
        if task.name in self.tasks:
            raise ValueError(f"a task named {task.name!r} is already added")
        self.tasks[task.name] = task.to(self.device)
        self.task_weights[task.name] = task.default_weight if weight is None else float(weight)
        self.balancer = make_balancer(self.balancing, self.task_weights)
        self._optimizer = self._new_optimizer()

    def _new_optimizer(self) -> JointOptimizer:
        sparse = torch.optim.SparseAdam([t.weight for t in self.encoder.tables], lr=self.lr)
        heads = list(self.tasks.parameters())
        dense = torch.optim.Adam(heads or [torch.nn.Parameter(torch.zeros(1))], lr=self.dense_lr)
        return JointOptimizer(sparse, dense)

    @property
    def version(self) -> int:
        """Optimiser steps applied so far."""
        return self._version

    # -- training ------------------------------------------------------------------------------------------------

    def fit_batch(self, batch: Batch) -> TrainReport:
        """``absorb`` the batch, then train on it mixed with replayed events."""
        u, i = self.absorb(batch)
        ru, ri, rw = self.reservoir.sample(int(round(self.replay_ratio * len(batch))), self._rng)
        self.reservoir.add(u, i, batch.weights)
        return self._train(np.r_[u, ru], np.r_[i, ri], np.r_[batch.weights, rw].astype(np.float32))

    def train_on(self, batch: Batch) -> TrainReport:
        """Gradient steps on events the graph already holds (a backfill's later epochs), nothing ingested: replaying
        a file must not churn the ring buffers, recount degrees or popularity, or refill the reservoir."""
        users, items = self.graph.users.lookup(batch.user_ids), self.graph.items.lookup(batch.item_ids)
        return self._train(users, items, batch.weights.astype(np.float32))

    def _train(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> TrainReport:
        """``steps_per_batch`` passes over these event rows in guarded optimiser steps."""
        return train_chunks(
            lambda idx: self._step(users[idx], items[idx], weights[idx]),
            len(users),
            self._rng,
            self.steps_per_batch,
            self.max_step_size,
            min_step_size=2,
        )

    def absorb(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Everything before the gradient steps: score the blends on the batch (still held out), ingest it, and
        refit the spectral block when due; returns the events' rows."""
        if self.selecting and len(self.selector.candidates) > 1:
            self.select(batch)
        rows = self.ingest(batch)
        self.spectral.observe(len(batch))
        return rows

    def ingest(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Add events to the graph (TTL eviction, table growth, item counts) without training; returns rows."""
        u, i = self.graph.add_events(batch.user_ids, batch.item_ids, batch.ts_ms)
        self.graph.evict()
        self._grow()
        self._mark_targets(i)
        self.frequency.update(i)
        self.popularity.count(i)
        return u, i

    def _grow(self) -> None:
        sparse = self._optimizer.optimizers[0]
        for t, table in enumerate(self.encoder.tables):
            old = table.weight
            if table.grow_to(self.graph.n_rows(t)):
                regrow_optimizer_state(sparse, old, table.weight)

    def _mark_targets(self, item_rows: np.ndarray) -> None:
        n = self.graph.n_rows(self.graph.item_type)
        if len(self._is_target) < n:
            self._is_target = np.pad(self._is_target, (0, n - len(self._is_target)))
        self._is_target[item_rows] = True

    def subgraph(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray, seed: int | None = None) -> Subgraph:
        """One step's trees around its events (user and item rows).

        Retrieval trains on exactly what is served (``served_tree``: the root and one hop over every buffered
        neighbour, with the served weights); self-supervised tasks get their own ``fanouts``-sampled trees
        (``views``). With ``seed`` every random choice is repeatable; otherwise the model's stream is used.
        """
        dev, g = self.device, self.graph
        rng = self._rng if seed is None else np.random.default_rng(seed)
        n_negatives = max((t.negatives for t in self.tasks.values()), default=0)
        negative_rows = rng.integers(0, g.n_rows(g.item_type), size=n_negatives)
        trees = [self.served_tree("query", users), self.served_tree("key", items)]
        if n_negatives:
            trees.append(self.served_tree("key", negative_rows))
        views = None
        if any(t.fraction is not None for t in self.tasks.values()):
            fanouts = list(self.fanouts)
            sides = [g.sample(users, USER, fanouts, rng), g.sample(items, g.item_type, fanouts, rng)]
            views = tuple(Tree.from_numpy(rows, masks, types, dev) for rows, masks, types in sides)
        log_n = float(np.log(max(g.n_rows(g.item_type), 1)))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return Subgraph(
            users=trees[0],
            items=trees[1],
            item_rows=torch.from_numpy(items).to(dev),
            log_q=torch.from_numpy(self.frequency.log_q(items)).float().to(dev),
            weights=torch.from_numpy(weights).to(dev),
            gen=gen,
            rng=np.random.default_rng(int(rng.integers(2**62))),
            negatives=trees[2] if n_negatives else None,
            negative_log_q=torch.full((n_negatives,), -log_n, device=dev) if n_negatives else None,
            views=views,  # type: ignore[arg-type]
        )

    def served_tree(self, role: str, rows: np.ndarray) -> Tree:
        """The learned block's receptive field of ``rows`` as a one-hop tree: users ("query") over their buffered
        items, recency-weighted, items ("key") over their buffered users.

        An edge weighs ``d_self^½ / n_buf · d_nbr^-½``: the symmetric LightGCN normalisation
        ``d_self^-½ d_nbr^-½``, scaled by ``d_self / n_buf`` where the ring buffer keeps only the latest
        ``n_buf`` of ``d_self`` neighbours, so the sum estimates the full one. The hop is flat: a sparse
        (rows × distinct neighbours) matrix (``Tree.coefs``).
        """
        g, dev = self.graph, self.device
        rows = np.asarray(rows, dtype=np.int64)
        own = USER if role == "query" else g.item_type
        other = g.other(own)
        pos, nbr, w = g.neighbours(own, rows, self.recency_half_life if role == "query" else 0.0)
        n_buf = np.maximum(np.bincount(pos, minlength=len(rows)), 1)
        coef = g.degree_of(own, rows)[pos] ** 0.5 / n_buf[pos] * g.degree_of(other, nbr) ** -0.5 * w
        distinct, column = np.unique(nbr, return_inverse=True)
        if not len(distinct):  # no neighbour at all: one row with no weight keeps the shapes valid
            distinct = np.zeros(1, np.int64)
        index = torch.from_numpy(np.stack([pos, column.reshape(-1)])).to(dev)
        weights = torch.sparse_coo_tensor(
            index, torch.from_numpy(coef.astype(np.float32)).to(dev), (len(rows), len(distinct)), check_invariants=False
        ).coalesce()
        root = np.ones(len(rows), dtype=bool)
        tree = Tree.from_numpy([rows, distinct], [root, np.ones(len(distinct), bool)], [own, other], dev)
        tree.coefs = [torch.ones(len(rows), device=dev), weights]
        return tree

    def task_losses(self, subgraph: Subgraph) -> dict[str, torch.Tensor]:
        """Every enabled task's loss on ``subgraph``."""
        subgraph.prepare(self.encoder, [t.fraction for t in self.tasks.values() if t.fraction is not None])
        return {name: task.loss(subgraph, self.encoder) for name, task in self.tasks.items()}

    def _step(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray) -> StepResult | None:
        """One guarded optimiser step on these events (None: skipped, a loss or a gradient was not finite)."""
        losses = self.task_losses(self.subgraph(users, items, weights))
        if not all(torch.isfinite(v) for v in losses.values()):
            self._optimizer.zero_grad()
            return None
        w = self.balancer.combine(losses, self.encoder.shared_parameters())
        total = sum(w[name] * loss for name, loss in losses.items())
        if self.l2 > 0:
            total = total + self.l2 * self.root_norm(users, items)
        if not finite_step(self._optimizer, total):  # type: ignore[arg-type]
            return None
        self._version += 1
        return StepResult(float(total.item()), {k: float(v.item()) for k, v in losses.items()}, w)

    def root_norm(self, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """Mean squared length of the step's users' id embeddings plus that of its items' (the L2 penalty)."""
        dev, tables = self.device, self.encoder.tables
        u = tables[USER](torch.from_numpy(users).to(dev))
        i = tables[self.graph.item_type](torch.from_numpy(items).to(dev))
        return u.pow(2).sum(-1).mean() + i.pow(2).sum(-1).mean()

    # -- serving -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def learned_block(self, role: str, rows: np.ndarray) -> np.ndarray:
        """The learned block of ``rows``: the served tree pooled with the layer weights, not normalised."""
        tree = self.served_tree(role, rows)
        enc = self.encoder
        out = enc.propagate(enc.inputs(tree), tree.masks, coefs=tree.coefs, served=True, normalise=False)[0]
        return out.cpu().numpy().astype(np.float32)

    def query_blocks(self, rows: np.ndarray) -> list[np.ndarray]:
        """The user side of each block, unweighted: learned query, spectral query, popularity scale (0 or 1 wide)."""
        width = 1 if self.popularity_scale else 0
        scale = np.full((len(rows), width), self.popularity_scale, np.float32)
        return [self.learned_block("query", rows), self.spectral.queries(rows), scale]

    def key_blocks(self, rows: np.ndarray) -> list[np.ndarray]:
        """The item side of each block: learned key, spectral key, ``log q`` (popularity; 0 or 1 wide)."""
        log_q = self.popularity.log_q(rows).astype(np.float32)[:, None]
        return [
            self.learned_block("key", rows),
            self.spectral.keys(rows),
            log_q[:, : 1 if self.popularity_scale else 0],
        ]

    def user_embeddings(self, user_ids: np.ndarray) -> np.ndarray:
        """``[w_l · learned | w_s · spectral | w_p · popularity scale]`` with the blend of the user's segment."""
        rows = self.graph.users.lookup(np.asarray(user_ids, dtype=np.int64))
        w = self.selector.weights(self.graph.degree[rows]).astype(np.float32)
        return np.concatenate([w[:, b : b + 1] * x for b, x in enumerate(self.query_blocks(rows))], axis=1)

    def item_embeddings(self, item_ids: np.ndarray) -> np.ndarray:
        """``[learned | spectral | log q]``: the item's length in the learned block carries how central it is."""
        rows = self.graph.items.lookup(np.asarray(item_ids, dtype=np.int64))
        if self.graph.mode == "user_user" and not self._is_target[rows].all():
            raise KeyError(int(np.asarray(item_ids)[~self._is_target[rows]][0]))
        return np.concatenate(self.key_blocks(rows), axis=1)

    # -- blend selection -----------------------------------------------------------------------------------------

    def select(self, batch: Batch) -> None:
        """Score every candidate blend on (up to ``select_events``) events of ``batch`` new to their user, before
        the model trains on them (``model.blend.held_out_ranks``), and let the selector record them."""
        scored = held_out_ranks(self, batch, self.selector.candidates, self.select_events, self.select_items, self._rng)
        if scored is not None:
            ranks, users, scale = scored
            self.selector.record(ranks, self.graph.degree[users], scale)

    def known_item_rows(self) -> np.ndarray:
        """Rows of every item that can be served."""
        rows = self.graph.items.rows()
        return rows if self.graph.mode == "bipartite" else rows[self._is_target[rows]]

    # -- the rest of the contract ----------------------------------------------------------------------------------

    def known_items(self) -> np.ndarray:
        """Item ids seen so far (in user–user mode: users that appeared as targets)."""
        ids = self.graph.items.ids()  # in row order, like ``rows()``
        return ids if self.graph.mode == "bipartite" else ids[self._is_target[self.graph.items.rows()]]

    def known_users(self) -> np.ndarray:
        """User ids seen so far (in user–user mode: every node)."""
        return self.graph.users.ids()

    def expire(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget ids (unseen for at least the graph's TTL): their rows lose their neighbours and edges, id embedding
        (and its optimiser state), spectral vector, replayed events and item counts; ids added later reuse the rows."""
        g, enc = self.graph, self.encoder
        users, items = g.expire(user_ids, item_ids)
        for t, rows in enumerate((users, items)[: g.n_types]):
            enc.tables[t].reset(rows[rows < enc.tables[t].capacity], self._optimizer.optimizers[0])
        self.spectral.forget((users, items)[: g.n_types])
        self.reservoir.drop(users, items)
        self.frequency.reset(items)
        self.popularity.reset(items)
        self._is_target[items[items < len(self._is_target)]] = False

    def user_degree(self, user_ids: np.ndarray) -> np.ndarray:
        """Lifetime events per user; small values mark cold users."""
        return self.graph.user_degree(user_ids)

    def state_dict(self) -> dict:
        """Graph, blocks, task heads, counts, reservoir, optimiser states and version (tensors/containers)."""
        return {
            "graph": self.graph.state_dict(),
            "encoder": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "tasks": {k: v.detach().cpu() for k, v in self.tasks.state_dict().items()},
            "spectral": self.spectral.state_dict(),
            "popularity": self.popularity.state_dict(),
            "selector": self.selector.state_dict(),
            "frequency": self.frequency.state_dict(),
            "reservoir": self.reservoir.state_dict(),
            "is_target": torch.from_numpy(self._is_target.copy()),
            "sparse_optimizer": self._optimizer.optimizers[0].state_dict(),
            "dense_optimizer": self._optimizer.optimizers[1].state_dict(),
            "version": self._version,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` (table sizes follow the saved state)."""
        self.graph.load_state_dict(state["graph"])
        enc = dict(state["encoder"])
        for t, table in enumerate(self.encoder.tables):
            table.weight = torch.nn.Parameter(enc[f"tables.{t}.weight"].to(self.device))
        self.encoder.load_state_dict(enc)
        self.tasks.load_state_dict(state["tasks"])
        self.spectral.load_state_dict(state["spectral"])
        self.popularity.load_state_dict(state["popularity"])
        self.selector.load_state_dict(state["selector"])
        self.frequency.load_state_dict(state["frequency"])
        self.reservoir.load_state_dict(state["reservoir"])
        self._is_target = state["is_target"].numpy().copy()
        self._optimizer = self._new_optimizer()
        self._optimizer.optimizers[0].load_state_dict(state["sparse_optimizer"])
        self._optimizer.optimizers[1].load_state_dict(state["dense_optimizer"])
        self._version = int(state["version"])
        self._rng = np.random.default_rng(self.seed + self._version)
