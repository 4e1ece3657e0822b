"""Training-free layer-0 embeddings: a truncated SVD of the degree-normalised live interaction matrix.

With ``R`` the binary (users × items) matrix of buffered edges and ``D`` the degrees, the top-``k`` SVD of
``R̃ = D_u^(-a) · R · D_i^(-b)`` = ``U S Vᵀ`` gives item vectors ``V S`` and user vectors ``U S``. Propagating the
item vectors over a user's items (one LightGCN layer) then scores ``r_u · V S² Vᵀ``: with ``a = 0, b = ½`` a
rank-``k`` item-kNN with cosine similarity, servable by inner product. Refitting gives a new basis, so
``procrustes`` rotates it onto the previous one and trained residuals on top keep their meaning.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, svds

log = logging.getLogger(__name__)
DENSE_LIMIT = 4_000_000  # entries: below this a failed ARPACK run falls back to an exact dense SVD
# ARPACK's convergence tolerance (0: machine precision). On a 10k×5k synthetic graph 1e-3 halves a refit (445 → 218
# ms) with the same subspace (smallest principal-angle cosine 1.0 to the tol=0 fit, singular values equal to 1e-14)
ARPACK_TOL = 1e-3


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
    try:
        u, s, vt = svds(matrix.astype(np.float64), k=kk, tol=ARPACK_TOL, v0=rng.standard_normal(min(n, m)))
    except (ArpackError, ArpackNoConvergence) as exc:  # e.g. "no shifts could be applied" on small matrices
        if n * m > DENSE_LIMIT:
            log.warning("ARPACK failed (%s): block iteration from a random start instead", exc)
            return warm_svd(matrix, k, np.zeros((0, k)), iters=6, seed=seed)
        log.warning("ARPACK failed (%s): dense SVD of the %d×%d matrix instead", exc, n, m)
        u, s, vt = np.linalg.svd(matrix.toarray(), full_matrices=False)
        u, s, vt = u[:, :kk], s[:kk], vt[:kk]
    order = np.argsort(-s)
    u, s, v = u[:, order], s[order], vt[order].T
    pad = k - kk
    return np.pad(u, ((0, 0), (0, pad))), np.pad(s, (0, pad)), np.pad(v, ((0, 0), (0, pad)))


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of tall ``y`` from its Gram matrix (matrix products, not Householder:
    several times faster on one core; directions with a negligible eigenvalue are dropped)."""
    evals, evecs = np.linalg.eigh(y.T @ y)
    keep = evals > evals.max() * 1e-12
    return y @ (evecs[:, keep] / np.sqrt(evals[keep]))


def warm_svd(
    matrix: sp.spmatrix, k: int, start: np.ndarray, iters: int = 1, oversample: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets by block subspace iteration started from ``start`` (column-side vectors).

    ``start`` (rows ≤ columns of ``matrix``) spans roughly the wanted right singular subspace, e.g. the last
    fit's column vectors: a graph that changed a little needs ``iters`` block iterations (a few sparse products
    with ``k + oversample`` columns, then a Rayleigh–Ritz step) instead of ARPACK's hundreds of matrix–vector
    products from scratch. Missing rows (new columns) and the oversampling columns start random.

    >>> rng = np.random.default_rng(0)
    >>> m = sp.csr_matrix(rng.random((60, 40)) * (rng.random((60, 40)) < 0.2))
    >>> _, s_ref, _ = truncated_svd(m, 5)
    >>> _, s, _ = warm_svd(m, 5, truncated_svd(m, 5)[2][:30], iters=2)  # 10 of 40 columns new
    >>> bool(np.allclose(s, s_ref, rtol=1e-2))
    True
    """
    n, m = matrix.shape
    width = min(k + oversample, n, m)
    if width < 1 or matrix.nnz == 0:
        return np.zeros((n, k)), np.zeros(k), np.zeros((m, k))
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((m, width)) * 1e-3
    rows, cols = min(len(start), m), min(start.shape[1], width)
    v[:rows, :cols] += start[:rows, :cols]
    x = matrix.astype(np.float64).tocsr()
    xt = x.T.tocsr()
    for _ in range(iters):
        v = _orthonormal(xt @ _orthonormal(x @ v))
    q = _orthonormal(x @ v)
    b = (xt @ q).T  # Rayleigh–Ritz: the SVD of Qᵀ X, via the eigenvectors of its small Gram matrix
    s2, w = np.linalg.eigh(b @ b.T)
    order = np.argsort(-s2)[:k]
    s = np.sqrt(np.maximum(s2[order], 0.0))
    w = w[:, order]
    u = q @ w
    v = (b.T @ w) / np.where(s > 0, s, 1.0)
    pad = k - len(s)
    return np.pad(u, ((0, 0), (0, pad))), np.pad(s, (0, pad)), np.pad(v, ((0, 0), (0, pad)))


def spectral_embeddings(
    matrix: sp.csr_matrix,
    k: int,
    a: float = 0.0,
    b: float = 0.5,
    seed: int = 0,
    power: float = 1.0,
    start: np.ndarray | None = None,
    iters: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(row vectors ``U S^power``, column vectors ``V S^power``) of ``normalised(matrix, a, b)``.

    With ``start`` (the last fit's column vectors) the SVD is ``warm_svd`` with ``iters`` block iterations;
    otherwise ARPACK from scratch. Both are divided by the largest column-vector length, so the longest item
    vector has length 1 whatever the graph's size (rankings are scale-free; a fixed scale keeps scores
    comparable to a popularity term and to trained id embeddings).

    >>> m = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    >>> users, items = spectral_embeddings(m, 2)
    >>> bool(np.allclose(items[0], items[1])), round(float(np.abs(users @ items.T).max()), 3)
    (True, 1.0)
    """
    norm = normalised(matrix, a, b)
    u, s, v = truncated_svd(norm, k, seed) if start is None or not len(start) else warm_svd(norm, k, start, iters)
    # s**power with directions whose singular value is numerically zero dropped (0**0 would weight them fully)
    weight = np.where(s > (s.max() if len(s) else 0.0) * 1e-9, np.abs(s) ** power, 0.0)
    rows, cols = u * weight, v * weight
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
