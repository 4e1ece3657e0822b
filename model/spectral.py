"""Training-free layer-0 embeddings: a truncated SVD of the degree-normalised live interaction matrix.

With ``R`` the binary (users × items) matrix of buffered edges and ``D`` the degrees, the top-``k`` SVD of
``R̃ = D_u^(-a) · R · D_i^(-b)`` = ``U S Vᵀ`` gives item vectors ``V S`` and user vectors ``U S``. Propagating the
item vectors over a user's items (one LightGCN layer) then scores ``r_u · V S² Vᵀ``: with ``a = 0, b = ½`` a
rank-``k`` item-kNN with cosine similarity, servable by inner product. Refitting gives a new basis, so
``procrustes`` rotates it onto the previous one and trained residuals on top keep their meaning.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds


def normalised(matrix: sp.csr_matrix, a: float, b: float) -> sp.csr_matrix:
    """``D_row^(-a) · matrix · D_col^(-b)`` (zero-degree rows/columns stay zero).

    >>> m = sp.csr_matrix(np.array([[1.0, 1.0], [0.0, 1.0]]))
    >>> normalised(m, 0.0, 1.0).toarray().tolist()
    [[1.0, 0.5], [0.0, 0.5]]
    """
    rows = np.asarray(matrix.sum(axis=1)).ravel()
    cols = np.asarray(matrix.sum(axis=0)).ravel()
    return sp.diags(np.maximum(rows, 1.0) ** -a) @ matrix @ sp.diags(np.maximum(cols, 1.0) ** -b)


def truncated_svd(matrix: sp.spmatrix, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets ``(U, S, V)``, largest first, zero-padded to ``k`` columns if the matrix is small."""
    n, m = matrix.shape
    kk = min(k, min(n, m) - 1)
    if kk < 1 or matrix.nnz == 0:
        return np.zeros((n, k)), np.zeros(k), np.zeros((m, k))
    rng = np.random.default_rng(seed)
    u, s, vt = svds(matrix.astype(np.float64), k=kk, v0=rng.standard_normal(min(n, m)))
    order = np.argsort(-s)
    u, s, v = u[:, order], s[order], vt[order].T
    pad = k - kk
    return np.pad(u, ((0, 0), (0, pad))), np.pad(s, (0, pad)), np.pad(v, ((0, 0), (0, pad)))


def spectral_embeddings(
    matrix: sp.csr_matrix, k: int, a: float = 0.0, b: float = 0.5, seed: int = 0, power: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(row vectors ``U S^power``, column vectors ``V S^power``) of ``normalised(matrix, a, b)``.

    Both are divided by the largest column-vector length, so the longest item vector has length 1 whatever
    the graph's size (rankings are scale-free; a fixed scale keeps scores comparable to a popularity term and to
    trained id embeddings).

    >>> m = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    >>> users, items = spectral_embeddings(m, 2)
    >>> bool(np.allclose(items[0], items[1])), round(float(np.abs(users @ items.T).max()), 3)
    (True, 1.0)
    """
    u, s, v = truncated_svd(normalised(matrix, a, b), k, seed)
    rows, cols = u * s**power, v * s**power
    longest = float(np.linalg.norm(cols, axis=1).max()) if len(cols) else 0.0
    scale = 1.0 / longest if longest > 0 else 1.0
    return rows * scale, cols * scale


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The orthogonal matrix ``Q`` minimising ‖new·Q − old‖ (rows are the same nodes in both).

    >>> rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    >>> x = np.array([[1.0, 2.0], [3.0, 1.0], [0.5, -1.0]])
    >>> bool(np.allclose(x @ rot @ procrustes(x @ rot, x), x))
    True
    """
    u, _, vt = np.linalg.svd(new.T @ old)
    return u @ vt
