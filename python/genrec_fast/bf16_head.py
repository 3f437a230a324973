"""The one-token head over bfloat16 rows on CPUs with AVX512-BF16: the same items as the float head, its
scores to float rounding, the normaliser approximate.

The float head's tiles are bound by their multiply-adds at batch 256 and by reading the (V, C) table for one
user (256 MB at 1M items, d 64). Here the scan reads the table rounded to bfloat16 (`_core.StreamingTopK.
add_head_bf16`: half the bytes, and one VDPBF16PS takes two columns for 16 users) into a top-k of
k' = k + max(2k, 64) candidates, which are then re-scored in float (`item_topk.candidate_logits`, offsets
included) and the best k kept. Exactness of the items is checked per user, never assumed: every scanned logit
is within B_u of its float value, where B_u = kappa * |x_u| * max_i |w_i| + gamma * max_i |b_i| (the rounding
of x and w to bfloat16, unit roundoff 2^-8, and of the float sums over C + 1 terms; Cauchy-Schwarz over the
columns); an item left out of the candidates scanned at most a_k' (the last candidate's scanned value), so
when a_k' < a_k - 2 B_u (a_k: the k-th best scanned value) none of them can beat the k-th re-scored candidate.
Users for whom the check fails (near ties around the k-th item, NaN) are ranked again by the float head.

The normaliser (log-sum-exp over the vocabulary) comes from the bfloat16 scan: each unbiased term within a factor
exp(B_u) of the float one, so the returned log-probabilities are the float ones shifted per user by at most ~B_u
(exactly log(1 +- (exp(+-B_u) - 1) S0 / S), S0 / S the unbiased over the biased softmax mass: 1 without the biases'
offsets, larger where they push down items that carry much of the mass). The ranking is exact; scores of different
users, or summed across models, carry that error.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .native import core

UNIT = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
# candidates beyond k at least: k' = k + max(2k, EXTRA). The bound is a worst case: a user's largest error over
# 200,000 random rows is 14-21% of it (d 64); at 1M random items, 256 users, top 20, k' = 40 left 69% of the users
# to the float head, k' = 68 or more none.
EXTRA = 64
# the catalog size from which item_topk takes it: below, the re-scoring and the longer top-k cost about what the
# scan saves (recommend(), both biases, alternating: 256 users 0.87x at 12,101 items, 0.99x at 50,000, 1.08-1.09x
# at 100,000, 1.26-1.35x at 300,000 and 1M; one user 0.96x at 100,000, 1.5x at 1M; benchmarks/bench_bf16_head.py)
MIN_ITEMS = 2 ** 17
_warned = False  # usable()'s warning, once a process


def supported() -> bool:
    """True where the bfloat16 head runs: AVX-512 in use (`GENREC_CPU_ISA` unset or asking for it) and
    AVX512-BF16 on the CPU."""
    return bool(core().bf16_head_supported())


def usable(heads, num_items: int) -> bool:
    """One float32 model on a CPU, at least MIN_ITEMS items, an even hidden size and a CPU that runs it (asked
    for on a CPU that cannot: a warning, once a process)."""
    global _warned
    h = heads[0]
    if h.x.device.type == "cpu" and not supported() and not _warned:
        _warned = True
        warnings.warn("precision='bfloat16': this CPU has no AVX512-BF16 (or GENREC_CPU_ISA asks for less); the head "
                      "runs in float32", RuntimeWarning, stacklevel=3)
    return (len(heads) == 1 and h.x.device.type == "cpu" and h.x.dtype == h.weight.dtype == torch.float32
            and num_items >= MIN_ITEMS and h.x.shape[1] % 2 == 0 and supported())


def rows(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """weight (V, C) float32 -> its rows rounded to bfloat16 (V, C) as int16 bits, and max_i |w_i| (float);
    kept on the weight tensor and made again only when the tensor changes (its data pointer, version or shape; an
    inference tensor, which keeps no version, by its pointer and shape)."""
    key = (weight.data_ptr(), None if weight.is_inference() else weight._version, tuple(weight.shape))
    hit = getattr(weight, "_genrec_bf16", None)
    if hit is None or hit[0] != key:
        w = weight.detach().float().contiguous()
        hit = (key, w.to(torch.bfloat16).view(torch.int16).contiguous(), float(w.norm(dim=1).max()) if len(w) else 0.0)
        weight._genrec_bf16 = hit
    return hit[1], hit[2]


def error_bound(x: torch.Tensor, w_max: float, b_max: float) -> np.ndarray:
    """B_u for each row of x (U, C): the most a bfloat16-scanned logit can differ from its exact value."""
    C = x.shape[1]
    gamma = (C + 1) * 2.0 ** -24 / (1 - (C + 1) * 2.0 ** -24)  # float sums of C products and the bias
    kappa = 2 * UNIT + UNIT ** 2 + gamma * (1 + UNIT) ** 2
    x_norm = x.double().norm(dim=1).numpy()
    return kappa * x_norm * w_max + gamma * b_max + 1e-30


def candidates(k: int, num_items: int) -> int:
    """k': the candidates the bfloat16 scan keeps for a top k."""
    return max(k, min(num_items, k + max(2 * k, EXTRA)))


def exact_users(cand: np.ndarray, approx: np.ndarray, exact: np.ndarray, k: int, bound: np.ndarray,
                num_items: int) -> np.ndarray:
    """cand / approx (U, k') the scan's candidates and scanned values, best first (-1 / -inf padding); exact (U,
    k') their float values -> (U,) True where the best k of the candidates are provably the best k overall."""
    k2 = cand.shape[1]
    # the heap never filled, or holds the whole catalog: every allowed item is a candidate
    short = (cand < 0).any(1) | (k2 >= num_items)
    with np.errstate(invalid="ignore"):
        margin = approx[:, k2 - 1].astype(np.float64) < approx[:, min(k, k2) - 1].astype(np.float64) - 2 * bound
    clean = ~np.isnan(approx).any(1) & ~np.isnan(exact).any(1)
    return clean & (short | margin)


def best_k(cand: np.ndarray, exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates per row by (float value desc, item asc), -1 / -inf padding last."""
    key = np.where(cand >= 0, -exact.astype(np.float64), np.inf)
    order = np.lexsort((np.where(cand >= 0, cand, np.iinfo(np.int64).max), key), axis=1)[:, :k]
    items = np.take_along_axis(cand, order, 1)
    values = np.take_along_axis(exact, order, 1)
    return items, np.where(items >= 0, values, -np.inf).astype(np.float32)
