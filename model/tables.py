"""Id tables that grow without restart: raw int64 ids → dense rows, and embeddings whose rows follow them."""

from __future__ import annotations

import numpy as np
import torch


class IdIndex:
    """Maps raw int64 ids to dense row numbers 0..n-1 in order of first appearance.

    >>> idx = IdIndex()
    >>> idx.add(np.array([42, 7, 42])).tolist()
    [0, 1, 0]
    >>> idx.lookup(np.array([7])).tolist(), len(idx)
    ([1], 2)
    >>> big = IdIndex(); _ = big.add(np.arange(3000) * 2)  # past the first buffer: it doubles
    >>> len(big), big.ids()[-1].item(), big.ids().flags.writeable
    (3000, 5998, False)
    >>> again = IdIndex(); again.load_state_dict(big.state_dict()); again.add(np.array([5998, 1])).tolist()
    [2999, 3000]
    """

    def __init__(self) -> None:
        self._rows: dict[int, int] = {}
        self._ids = np.empty(1024, dtype=np.int64)  # row → raw id (-1: a removed id's row, free for reuse)
        self._n = 0  # rows assigned so far (removed ones included)
        self._free: list[int] = []  # rows of removed ids, reused (lowest first) by ids added later

    def __len__(self) -> int:
        return self._n

    def __contains__(self, raw_id: int) -> bool:
        return int(raw_id) in self._rows

    def add(self, raw_ids: np.ndarray) -> np.ndarray:
        """Rows of ``raw_ids``, assigning new rows to ids not seen before."""
        rows = self._rows
        out = np.empty(len(raw_ids), dtype=np.int64)
        new: list[int] = []
        for i, raw in enumerate(raw_ids.tolist()):
            row = rows.get(raw)
            if row is None:
                if self._free:
                    row = rows[raw] = self._free.pop()
                    self._ids[row] = raw
                else:
                    row = rows[raw] = self._n + len(new)
                    new.append(raw)
            out[i] = row
        if new:
            self._append(np.asarray(new, dtype=np.int64))
        return out

    def _append(self, raw_ids: np.ndarray) -> None:
        """Write new ids after the used rows, doubling the buffer when full."""
        end = self._n + len(raw_ids)
        if end > len(self._ids):
            grown = np.empty(max(end, 2 * len(self._ids)), dtype=np.int64)
            grown[: self._n] = self._ids[: self._n]
            self._ids = grown
        self._ids[self._n : end] = raw_ids
        self._n = end

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray:
        """Rows of known ids; raises KeyError naming the first unknown id."""
        rows = self._rows
        return np.fromiter((rows[r] for r in raw_ids.tolist()), dtype=np.int64, count=len(raw_ids))

    def find(self, raw_ids: np.ndarray) -> np.ndarray:
        """Rows of ``raw_ids``, -1 where an id is unknown (nothing is added).

        >>> idx = IdIndex(); _ = idx.add(np.array([5])); idx.find(np.array([5, 6])).tolist()
        [0, -1]
        """
        rows = self._rows
        return np.fromiter((rows.get(r, -1) for r in np.asarray(raw_ids).tolist()), dtype=np.int64, count=len(raw_ids))

    def ids(self) -> np.ndarray:
        """All known raw ids, in row order: a read-only view, O(1) (later additions do not show in it); once ids
        were removed, a copy without them."""
        view = self._ids[: self._n]
        if self._free:
            view = view[view >= 0]
        view.flags.writeable = False
        return view

    def rows(self) -> np.ndarray:
        """Rows held by an id (the free rows of removed ids left out), ascending.

        >>> idx = IdIndex(); _ = idx.add(np.array([5, 6, 7])); _ = idx.remove(np.array([6])); idx.rows().tolist()
        [0, 2]
        """
        return np.flatnonzero(self._ids[: self._n] >= 0) if self._free else np.arange(self._n)

    def remove(self, raw_ids: np.ndarray) -> np.ndarray:
        """Forget ``raw_ids`` (unknown ones are skipped); returns their rows, which ids added later reuse.

        >>> idx = IdIndex(); _ = idx.add(np.array([5, 6, 7]))
        >>> idx.remove(np.array([6, 9])).tolist(), idx.ids().tolist(), idx.add(np.array([8])).tolist()
        ([1], [5, 7], [1])
        """
        rows = np.array([self._rows.pop(r) for r in np.asarray(raw_ids).tolist() if r in self._rows], dtype=np.int64)
        self._ids[rows] = -1
        self._free = sorted({*self._free, *rows.tolist()}, reverse=True)  # pop() hands out the lowest row first
        return rows

    def state_dict(self) -> dict:
        """The ids in row order, -1 for a free row (enough to rebuild the map)."""
        return {"ids": torch.from_numpy(self._ids[: self._n].copy())}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild from ``state_dict()``."""
        ids = state["ids"].numpy().astype(np.int64, copy=True)
        self._ids, self._n = ids, len(ids)
        self._rows = {raw: row for row, raw in enumerate(ids.tolist()) if raw >= 0}
        self._free = sorted(np.flatnonzero(ids < 0).tolist(), reverse=True)


class GrowableEmbedding(torch.nn.Module):
    """A sparse-gradient embedding table whose capacity doubles as ids arrive.

    Rows beyond ``n_used`` are allocated but untouched. ``grow_to`` returns True when the
    underlying parameter was replaced, so the owner can rebuild its optimiser.
    """

    def __init__(self, dim: int, capacity: int = 1024, init_std: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.init_std = init_std
        self.weight = torch.nn.Parameter(torch.randn(capacity, dim) * init_std)

    @property
    def capacity(self) -> int:
        """Rows allocated."""
        return self.weight.shape[0]

    def grow_to(self, n_rows: int) -> bool:
        """Ensure at least ``n_rows`` rows; new rows are random, old rows keep their values."""
        if n_rows <= self.capacity:
            return False
        new_cap = self.capacity
        while new_cap < n_rows:
            new_cap *= 2
        old = self.weight.data
        extra = torch.randn(new_cap - old.shape[0], self.dim, device=old.device) * self.init_std
        self.weight = torch.nn.Parameter(torch.cat([old, extra]))
        return True

    def reset(self, rows: np.ndarray, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give ``rows`` fresh initial values (a removed id's row, before another id reuses it) and zero their
        per-row state in ``optimizer`` (e.g. Adam moments)."""
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.weight.device)
        with torch.no_grad():
            self.weight[index] = torch.randn(len(index), self.dim, device=self.weight.device) * self.init_std
        for value in (optimizer.state.get(self.weight, {}) if optimizer is not None else {}).values():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == self.weight.shape[0]:
                value[index] = 0

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the table, with sparse gradients."""
        return torch.nn.functional.embedding(rows, self.weight, sparse=True)


def regrow_optimizer_state(optimizer: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Swap ``old`` for ``new`` in ``optimizer``, zero-padding its per-row state (e.g. Adam moments)."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == old.shape[0]:
            pad = torch.zeros(new.shape[0] - value.shape[0], *value.shape[1:], dtype=value.dtype, device=value.device)
            grown[key] = torch.cat([value, pad])
        else:
            grown[key] = value
    optimizer.state[new] = grown
