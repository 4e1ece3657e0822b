"""The first model: user and item id embeddings trained with an in-batch sampled-softmax retrieval loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ebrflow.model.base import Batch, TrainReport
from ebrflow.model.edges import RingBuffers
from ebrflow.model.frequency import ItemFrequency
from ebrflow.model.losses import sampled_softmax
from ebrflow.model.tables import GrowableEmbedding, IdIndex, regrow_optimizer_state
from ebrflow.model.training import StepResult, finite_step, train_chunks


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TwoTowerModel:
    """Users and items as id embeddings; in-batch softmax with logQ correction and accidental-hit masking.

    The user tower adds the mean embedding of the user's last ``history`` items to its id embedding, so a
    user with a handful of events is already placed near what they touched (cold start). Training uses the
    logQ-corrected in-batch softmax (an estimate of the full softmax over ``cos(u, v) / T``); embeddings are
    unit vectors (wrap in ``model.prior.PopularityPrior`` to add a recent-popularity prior when serving).
    Each ``fit_batch`` runs ``steps_per_batch`` passes over the batch in chunks of at most
    ``max_step_size`` events (``model.training.train_chunks``). New ids grow the tables (and the optimiser state)
    in place.
    """

    def __init__(
        self,
        dim: int = 64,
        lr: float = 0.05,
        temperature: float = 0.1,
        steps_per_batch: int = 1,
        max_step_size: int = 1024,
        history: int = 32,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        self.dim = dim
        self.history = history
        self.lr = lr
        self.temperature = temperature
        self.steps_per_batch = steps_per_batch
        self.max_step_size = max_step_size
        self.device = pick_device(device)
        self.users = IdIndex()
        self.items = IdIndex()
        self.user_table = GrowableEmbedding(dim).to(self.device)
        self.item_table = GrowableEmbedding(dim).to(self.device)
        self.recent = RingBuffers(max(history, 1))
        self.frequency = ItemFrequency()
        self._optimizer = self._new_optimizer()
        self._version = 0
        self._rng = np.random.default_rng(seed)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam([self.user_table.weight, self.item_table.weight], lr=self.lr)

    @property
    def version(self) -> int:
        """Optimiser steps applied so far."""
        return self._version

    def _grow(self, table: GrowableEmbedding, n_rows: int) -> None:
        old = table.weight
        if table.grow_to(n_rows):
            regrow_optimizer_state(self._optimizer, old, table.weight)

    def fit_batch(self, batch: Batch) -> TrainReport:
        """Train on ``batch``; returns the mean loss over the steps that were applied."""
        u_rows = self.users.add(batch.user_ids)
        i_rows = self.items.add(batch.item_ids)
        self._grow(self.user_table, len(self.users))
        self._grow(self.item_table, len(self.items))
        self.frequency.update(i_rows)
        report = train_chunks(
            lambda idx: self._step(u_rows[idx], i_rows[idx], batch.weights[idx]),
            len(batch),
            self._rng,
            self.steps_per_batch,
            self.max_step_size,
        )
        if self.history:  # after training, so an event never sits in its own user's history while it is learned
            self.recent.grow(len(self.users))
            self.recent.append(u_rows, i_rows, batch.ts_ms)
        return report

    def expire(self, user_ids: np.ndarray, item_ids: np.ndarray) -> None:
        """Forget ids: their rows get initial values (optimiser state zeroed) and ids added later reuse them; a
        removed user's history goes (a user's history may still name a removed item's row: it ages out)."""
        users, items = self.users.remove(np.asarray(user_ids)), self.items.remove(np.asarray(item_ids))
        self.user_table.reset(users[users < self.user_table.capacity], self._optimizer)
        self.item_table.reset(items[items < self.item_table.capacity], self._optimizer)
        self.recent.clear(users[users < len(self.recent.count)])
        self.frequency.reset(items)

    def _step(self, u_rows: np.ndarray, i_rows: np.ndarray, weights: np.ndarray) -> StepResult | None:
        """One guarded optimiser step on these events (None: skipped, the loss or a gradient was not finite)."""
        loss = self._loss(u_rows, i_rows, weights)
        if not finite_step(self._optimizer, loss):
            return None
        self._version += 1
        value = loss.item()
        return StepResult(value, {"retrieval": value}, {"retrieval": 1.0})

    def _user_vectors(self, u_rows: np.ndarray) -> torch.Tensor:
        """Unit user vectors: id embedding plus the mean of the user's recent item embeddings."""
        rows = torch.from_numpy(u_rows).to(self.device)
        vec = self.user_table(rows)
        if self.history:
            self.recent.grow(len(self.users))
            mask = torch.from_numpy(self.recent.valid(u_rows, None)).to(self.device)
            nbr = torch.from_numpy(self.recent.nbr[u_rows]).to(self.device)
            items = self.item_table(nbr) * mask.unsqueeze(-1)
            vec = vec + items.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(vec, dim=-1)

    def _loss(self, u_rows: np.ndarray, i_rows: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        dev = self.device
        i_t = torch.from_numpy(i_rows).to(dev)
        u, v = self._user_vectors(u_rows), F.normalize(self.item_table(i_t), dim=-1)
        log_q = torch.from_numpy(self.frequency.log_q(i_rows)).float().to(dev)
        w = torch.from_numpy(weights).to(dev)
        return sampled_softmax(u, v, i_t, self.temperature, log_q=log_q, weights=w)

    @torch.no_grad()
    def user_embeddings(self, user_ids: np.ndarray) -> np.ndarray:
        """Unit user vectors (id embedding plus recent-item mean)."""
        rows = self.users.lookup(np.asarray(user_ids, dtype=np.int64))
        return self._user_vectors(rows).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def item_embeddings(self, item_ids: np.ndarray) -> np.ndarray:
        """Unit item vectors."""
        rows = torch.from_numpy(self.items.lookup(np.asarray(item_ids, dtype=np.int64))).to(self.device)
        return F.normalize(self.item_table.weight[rows], dim=-1).cpu().numpy().astype(np.float32)

    def known_items(self) -> np.ndarray:
        """Item ids seen so far."""
        return self.items.ids()

    def known_users(self) -> np.ndarray:
        """User ids seen so far."""
        return self.users.ids()

    def state_dict(self) -> dict:
        """Tables, id maps, frequency estimate, optimiser state and version."""
        return {
            "users": self.users.state_dict(),
            "items": self.items.state_dict(),
            "user_table": self.user_table.weight.detach().cpu(),
            "item_table": self.item_table.weight.detach().cpu(),
            "recent": {
                name: torch.from_numpy(getattr(self.recent, name)) for name in ("nbr", "ts", "count", "last_ts")
            },
            "frequency": self.frequency.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "version": self._version,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.users.load_state_dict(state["users"])
        self.items.load_state_dict(state["items"])
        self.user_table.weight = torch.nn.Parameter(state["user_table"].to(self.device))
        self.item_table.weight = torch.nn.Parameter(state["item_table"].to(self.device))
        for name, value in state["recent"].items():
            setattr(self.recent, name, value.numpy().copy())
        self.frequency.load_state_dict(state["frequency"])
        self._optimizer = self._new_optimizer()
        self._optimizer.load_state_dict(state["optimizer"])
        self._version = int(state["version"])
