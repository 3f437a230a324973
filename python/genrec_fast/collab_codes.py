"""Collaborative item codes: items that occur near each other in training sequences share code prefixes.

An item's code is `levels` cluster tokens (each of `branches` values, coarse to fine) and a last token,
its index among the items of its leaf, that makes every code unique (as CID+IID in Hua et al. 2023).
Built from the **training interactions only**, in three steps that never form an N x N dense matrix:

1. co-occurrence: a sparse symmetric count of item pairs at most `window` apart in a user's sequence;
2. a spectral embedding: the leading eigenvectors of the normalised co-occurrence D^-1/2 A D^-1/2
   (randomised subspace iteration; the trivial first one dropped) weighted by their eigenvalues, rows
   scaled to unit length; items
   without training interactions get random directions;
3. balanced hierarchical 2-means: each node is split in two equal halves along the line between its
   halves' centroids (a few refinements), log2(branches) times per level, so every level is balanced.

Memory is O(nnz + N * dim); a million items and five million interactions take ~1 min on 2 cores.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp


def cooccurrence(train: Sequence[np.ndarray], n_items: int, window: int = 3) -> sp.csr_matrix:
    """(n_items, n_items) float32 symmetric counts of item pairs 1..window apart within one sequence."""
    if window < 1:
        raise ValueError(f"window: expected >= 1, got {window!r}")
    lengths = np.fromiter(map(len, train), dtype=np.int64, count=len(train))
    flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in train]) if len(train) else np.zeros(0, np.int32)
    owner = np.repeat(np.arange(len(train)), lengths)  # (total,) the sequence of each interaction
    rows, cols = [], []
    for d in range(1, window + 1):
        same = owner[d:] == owner[:-d]  # pairs d apart inside one sequence
        a, b = flat[:-d][same], flat[d:][same]
        keep = a != b
        rows += [a[keep], b[keep]]
        cols += [b[keep], a[keep]]
    r = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    adj = sp.coo_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n_items, n_items)).tocsr()
    adj.sum_duplicates()
    return adj


def spectral_embedding(adj: sp.csr_matrix, dim: int = 32, iters: int = 6, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows: the leading non-trivial eigenvectors of D^-1/2 A D^-1/2."""
    n = adj.shape[0]
    rng = np.random.default_rng(seed)
    deg = np.asarray(adj.sum(1)).ravel()  # (n,)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0).astype(np.float32)
    norm = sp.diags(inv) @ adj @ sp.diags(inv)
    k = min(n, dim + 1 + 8)  # + the trivial vector + oversampling
    q, _ = np.linalg.qr(norm @ rng.standard_normal((n, k)).astype(np.float32))
    for _ in range(iters):  # subspace iteration on S + I: the largest eigenvalues, never the most negative
        q, _ = np.linalg.qr(norm @ q + q)
    vals, vecs = np.linalg.eigh(q.T @ (norm @ q))  # (k,), (k, k) ascending
    # (n, dim) the trivial vector dropped; each direction weighted by its eigenvalue (as a diffusion map
    # does), so that directions beyond the data's clusters (eigenvalues near 0) add little noise
    emb = ((q @ vecs[:, ::-1]) * np.maximum(vals[::-1], 0))[:, 1:dim + 1].astype(np.float32)
    cold = deg == 0
    emb[cold] = rng.standard_normal((int(cold.sum()), emb.shape[1])).astype(np.float32)
    lengths = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(lengths, 1e-12)


def balanced_codes(vectors: np.ndarray, levels: int, branches: int, refine: int = 4) -> np.ndarray:
    """(n, levels + 1) int64 codes: `levels` balanced cluster tokens in [0, branches) and a last token, the
    item's index within its leaf (items of a leaf in catalog order), so that no two items share a code."""
    if branches < 2 or branches & (branches - 1):
        raise ValueError(f"branches: expected a power of two >= 2, got {branches!r}")
    if levels < 1:
        raise ValueError(f"levels: expected >= 1, got {levels!r}")
    n, bits = len(vectors), branches.bit_length() - 1
    path = np.zeros(n, dtype=np.int64)  # every item's bits so far
    nodes = [np.arange(n)]
    for _ in range(levels * bits):
        nxt = []
        for idx in nodes:
            left, right = _halve(vectors[idx], refine)
            path[idx] <<= 1
            path[idx[right]] |= 1
            nxt += [idx[left], idx[right]]
        nodes = [x for x in nxt if len(x)]
    codes = np.zeros((n, levels + 1), dtype=np.int64)
    for lv in range(levels):
        codes[:, lv] = (path >> ((levels - 1 - lv) * bits)) & (branches - 1)
    order = np.lexsort((np.arange(n), path))  # items grouped by leaf, catalog order inside
    starts = np.r_[0, np.flatnonzero(np.diff(path[order])) + 1]  # first position of each leaf
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    codes[order, levels] = rank
    return codes


def _halve(x: np.ndarray, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the two halves (sizes floor/ceil of n/2) of balanced 2-means on x (m, d)."""
    m = len(x)
    if m < 2:
        return np.arange(m), np.zeros(0, dtype=np.int64)
    direction = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))] - x.mean(0)  # the farthest point from the mean
    for _ in range(refine + 1):
        s = x @ direction  # (m,)
        order = np.argsort(s, kind="stable")
        left, right = order[:m // 2], order[m // 2:]
        direction = x[right].mean(0) - x[left].mean(0)
        if not np.any(direction):
            break
    return np.sort(left), np.sort(right)


def build_codes(train: Sequence[np.ndarray], n_items: int, levels: int = 2, branches: int = 32, dim: int = 32,
                window: int = 3, seed: int = 0) -> np.ndarray:
    """(n_items, levels + 1) collaborative codes from the training sequences (see the module docstring)."""
    return balanced_codes(spectral_embedding(cooccurrence(train, n_items, window), dim, seed=seed), levels, branches)


LEAF_ITEMS = 96  # items per leaf the codes preset has on Beauty (12,101 / 128 clusters)
LARGE_LEAF = 1024  # items per leaf from which `train` warns: the leaf head scores a whole leaf per beam


def branches_for(n_items: int, levels: int, leaf: int = LEAF_ITEMS) -> int:
    """Values per cluster level whose leaves hold ~`leaf` items: the power of two nearest
    (n_items / leaf) ** (1 / levels), at least 2."""
    return max(2, 1 << round(math.log2(max(2.0, (n_items / leaf) ** (1 / levels)))))


def checkpoint_item_vectors(path, item_ids: Sequence) -> np.ndarray:
    """(n_items, d) float32 unit rows: the item token vectors of a one-token checkpoint (its LM head rows,
    tied to the input), in the order of `item_ids`, which must be the checkpoint's catalog."""
    from .recommend import load
    rec = load(path)
    if rec.tokenizer.item_tokens != "whole":
        raise ValueError(f"tokenizer.code_vectors: {path} is not a one-token model (item_tokens="
                         f"{rec.tokenizer.item_tokens!r}); train one with tokenizer.item_tokens='whole'")
    if list(rec.catalog.item_ids) != list(item_ids):
        raise ValueError(f"tokenizer.code_vectors: {path} was trained on another catalog (its "
                         f"{len(rec.catalog.item_ids)} item ids differ from the data's {len(item_ids)})")
    rows = rec.tokenizer.item_flat  # (n_items,) item i's token
    vectors = rec.model.shared.weight.detach()[rows].float().numpy()  # (n_items, d)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

