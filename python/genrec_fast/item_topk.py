"""Top-k one-token items from decoder states: the LM head and the selection in chunks of the catalog.

A model whose items are one token each (and that has no EOS step) ranks the whole catalog with one
softmax: an item's score is its log-probability `z - logsumexp(z over the vocabulary)`. Here the head
`z = x @ W.T + b` runs `chunk` vocabulary rows at a time and each chunk goes straight into a running
top-k and log-sum-exp (`_core.StreamingTopK`, C++), so memory stays (users x chunk) at any catalog
size. An ensemble ranks by the members' mean log-probability; its order is that of the mean logit,
since each member's normaliser is a constant per user.

`item_topk_reference` is the plain PyTorch definition (full logits, log_softmax, masked stable sort):
the fast path returns the same items and scores (to float rounding), ties by smaller item index.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .beam_search import check_filters
from .device_search import top_by_score
from .native import core

FUSED_MIN_USERS = 16  # a tile of the fused head holds 16 users; fewer run as matmuls (BLAS splits the catalog)
DEFAULT_CHUNK = 8192  # vocabulary rows per matmul: (256 users x 8192) fp32 = 8 MB, measured fastest on CPU


class Head(NamedTuple):
    """One model's decoder states and LM head: logits = x @ weight.T + bias."""

    x: torch.Tensor  # (U, C)
    weight: torch.Tensor  # (V, C)
    bias: torch.Tensor | None  # (V,), or None for none


def item_topk(heads: Sequence[Head], first_item: int, num_items: int, k: int, exclude=None, allow=None,
              chunk: int = DEFAULT_CHUNK, threads: int | None = None, fused: bool | None = None,
              history: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best k allowed items per user by mean log-probability over `heads` (one per ensemble member).

    Item i is vocabulary row first_item + i. -> items (U, k) int64 (-1 = none left), scores (U, k) float32
    (-inf padding). exclude / allow as in `beam_search.check_filters`. On a CPU one model with >= 16 users runs the
    fused C++ head (`StreamingTopK.add_head`: logits never stored; fused=False forces the other path),
    else the head runs `chunk` rows at a time as matmuls into the C++ scan; other devices run the
    chunked loop in torch ops, or with fused=True (default: `cuda_fused_default()`) the CUDA head + top-k
    kernel (one model; a clear error where it cannot run).

    history: (items (U, S) int64 tensor of item indices, -1 = none; one (U, S) tensor of logit offsets per
    head) adds each offset to its item's logit, summed over repeats (history_bias.py), exactly: one model on a
    CPU offers the biased pairs to the C++ top-k before the scan, which then skips them, and its normaliser
    counts them biased (`StreamingTopK.add_offsets`); otherwise the scan runs without those items and they
    join afterwards, the normalisers corrected (`_with_history`).
    """
    x0, w0 = heads[0].x, heads[0].weight
    U, V = x0.shape[0], w0.shape[0]
    if not 0 <= first_item <= first_item + num_items <= V:
        raise ValueError(f"items [{first_item}, {first_item + num_items}) do not fit a vocabulary of {V}")
    if k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    ptr, ex_items, allow = check_filters(exclude, allow, U, num_items)
    heads = _drop_zero_bias(heads)
    scan = (heads, first_item, num_items, k, chunk, threads, fused)
    offsets = None
    if history is not None:
        if x0.device.type != "cpu" or len(heads) != 1:
            return _with_history(scan, ptr, ex_items, allow, *history)
        offsets = _check_offsets(*history, U, len(heads))
    items, values, norms = _scan(*scan, ptr, ex_items, allow, offsets)
    return items, _scores(items, values, norms.mean(0))


def _scan(heads, first_item, num_items, k, chunk, threads, fused, ptr, ex_items, allow, offsets=None):
    """-> items (U, k) int64 (-1 = none), their mean member logits (U, k) float32, and every member's
    log-sum-exp over the whole vocabulary, filters ignored (M, U) float64. offsets (CPU, one model): (items
    (U, S) int64, offsets (U, S) float32) added to those logits (`StreamingTopK.add_offsets`)."""
    x0, V = heads[0].x, heads[0].weight.shape[0]
    U = x0.shape[0]
    if x0.device.type != "cpu":
        if cuda_fused_default() if fused is None else fused:
            return _fused_cuda(heads, first_item, num_items, k, ptr, ex_items, allow)
        return _item_topk_torch(heads, first_item, num_items, k, ptr, ex_items, allow, chunk)
    threads = torch.get_num_threads() if threads is None else threads
    top = core().StreamingTopK(U, k, num_items, ptr, ex_items, allow)
    if offsets is not None:
        _add_offsets(top, heads, first_item, *offsets, threads)
    if fused is None:
        fused = len(heads) == 1 and U >= FUSED_MIN_USERS
    if fused:
        return _fused(heads, top, first_item, num_items, threads)
    lse = [core().StreamingTopK(U, 1, 0) for _ in heads] if len(heads) > 1 else None
    for lo, hi, is_item in _spans(V, first_item, num_items, chunk):
        z = _logits(heads, lo, hi)  # (U, hi - lo) member logits (mean logit for an ensemble: see below)
        if lse is None:  # one model: one pass for both the top-k and its normaliser
            _add(top, z[0], lo - first_item if is_item else 0, is_item, True, threads)
            continue
        for acc, zm in zip(lse, z):
            _add(acc, zm, 0, False, True, threads)
        if is_item:
            _add(top, torch.stack(z).mean(0), lo - first_item, True, False, threads)
    items, values, norm = top.results()
    norms = norm[None] if lse is None else np.stack([acc.results()[2] for acc in lse])
    return items, values, norms.astype(np.float64)


def _check_offsets(hist_items: torch.Tensor, offsets: Sequence[torch.Tensor], U: int, members: int):
    """`item_topk`'s history argument for one model on a CPU -> (items (U, S) int64, offsets (U, S) float32),
    C-contiguous."""
    if len(offsets) != members:
        raise ValueError(f"history: expected one offsets tensor per head ({members}), got {len(offsets)}")
    items, off = hist_items.long().contiguous(), offsets[0].float().contiguous()
    if items.dim() != 2 or items.shape[0] != U or off.shape != items.shape:
        raise ValueError(f"history: expected items and offsets of one shape (U={U}, S), got {tuple(items.shape)} "
                         f"and {tuple(off.shape)}")
    return items, off


def _add_offsets(top, heads: Sequence[Head], first_item: int, items: torch.Tensor, offsets: torch.Tensor,
                 threads: int) -> None:
    """The offsets on one model's (user, item) logits, into the C++ top-k before its scan."""
    h = heads[0]
    x, w = h.x.float().contiguous(), h.weight.float().contiguous()  # (U, C), (V, C)
    b = None if h.bias is None else h.bias.float().contiguous()  # (V,); kept alive over the call
    C = x.shape[1]
    top.add_offsets(items.data_ptr(), offsets.data_ptr(), items.shape[0], items.shape[1], x.data_ptr(),
                    w.data_ptr() + 4 * first_item * C, 0 if b is None else b.data_ptr() + 4 * first_item, C, threads)


def _scores(items: np.ndarray, values: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Mean logits (U, k) less the mean normaliser (U,) -> float32 scores, -inf at the padding (a NaN logit
    makes every score NaN)."""
    return np.where(items >= 0, values - norm[:, None], -np.inf).astype(np.float32)


def _with_history(scan: tuple, ptr, ex_items, allow, hist_items: torch.Tensor, offsets: Sequence[torch.Tensor]):
    """`item_topk` with offsets o_m(u, i) on the history items H_u (summed over repeats): the scan ranks the
    other items (H_u excluded; its normalisers still cover every column), then member m's normaliser
    becomes lse_m + log(1 - sum_H exp(z - lse_m) + sum_H exp(z + o - lse_m)) (float64), and the
    history items, scored mean_m(z + o - lse'_m), merge with the scan's k by (score desc, item asc)."""
    heads, first_item, num_items, k = scan[:4]
    U = heads[0].x.shape[0]
    if len(offsets) != len(heads):
        raise ValueError(f"history: expected one offsets tensor per head ({len(heads)}), got {len(offsets)}")
    u_idx, s_idx = (hist_items >= 0).nonzero(as_tuple=True)  # (N,) history positions
    key, inv = torch.unique(u_idx * num_items + hist_items[u_idx, s_idx], return_inverse=True)  # (P,) sorted
    off = torch.zeros(len(heads), len(key), dtype=torch.float64, device=key.device).index_add_(
        1, inv, torch.stack([o[u_idx, s_idx] for o in offsets]).double())  # (M, P)
    pu, pi = key // num_items, key % num_items  # (P,) user, item
    z = torch.stack([_history_logits(h, pu, first_item + pi) for h in heads])  # (M, P) float64
    hu, hi = pu.cpu().numpy(), pi.cpu().numpy()
    ptr2, ex2 = _union_csr(ptr, ex_items, hu, hi, U)
    items, values, norms = _scan(*scan, ptr2, ex2, allow)  # norms (M, U)
    z, off = z.cpu().numpy(), off.cpu().numpy()
    shifted = norms[:, hu]  # (M, P)
    rest = 1.0 - _user_sums(np.exp(z - shifted), hu, U)  # (M, U) the other columns' share of the softmax
    norms2 = norms + np.log(np.maximum(rest, 0.0) + _user_sums(np.exp(z + off - shifted), hu, U))
    scores = _scores(items, values, norms2.mean(0))  # (U, k)
    h_scores = (z + off - norms2[:, hu]).mean(0)  # (P,)
    keep = _allowed(hu, hi, ptr, ex_items, allow) & ~np.isnan(h_scores)
    return _merge(items, scores, hu[keep], hi[keep], h_scores[keep].astype(np.float32), k, U, num_items)


def _history_logits(h: Head, users: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of (user, vocabulary row) pairs (P,) -> (P,) float64, computed in float32 as the scan's are
    (a (P, C) float64 product was most of a batch's time with the transition bias's ~150 pairs per user)."""
    x, w = h.x.float(), h.weight
    if x.device.type == "cpu" and w.dtype == torch.float32 and len(rows) and int(rows.min()) > 0:
        z = _pair_dots_cpu(x, w, users, rows)
    else:
        z = (x.index_select(0, users) * w.index_select(0, rows).float()).sum(1)  # (P,)
    return (z if h.bias is None else z + h.bias[rows].float()).double()


def _pair_dots_cpu(x: torch.Tensor, w: torch.Tensor, users: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[users] . w[rows] for user-sorted pairs (P,) by the C++ gather-and-dot (`leaf_scores`, slot 0 = empty,
    so rows > 0): the (P, C) gathered vectors are never written (5x faster than materialising them at ~300
    pairs per user; einsum was slower still)."""
    from .leaf_head import leaf_scores

    counts = torch.bincount(users, minlength=x.shape[0])  # (U,)
    col = torch.arange(len(users)) - (counts.cumsum(0) - counts)[users]  # (P,) position within its user
    slots = torch.zeros(x.shape[0], int(counts.max()), dtype=torch.long)  # (U, width) vocabulary rows, 0 = empty
    slots[users, col] = rows
    return leaf_scores(w, slots, x)[users, col]  # (P,)


def _user_sums(values: np.ndarray, users: np.ndarray, U: int) -> np.ndarray:
    """(M, P) values of pairs owned by users (P,) -> (M, U) per-user sums."""
    out = np.zeros((values.shape[0], U))
    for m in range(values.shape[0]):
        out[m] = np.bincount(users, weights=values[m], minlength=U)
    return out


def _union_csr(ptr, ex_items, users: np.ndarray, items: np.ndarray, U: int):
    """The exclude lists (CSR or None) plus the pairs (users, items) -> CSR (ptr (U + 1,), items)."""
    if ptr is not None:
        users = np.concatenate([np.repeat(np.arange(U), np.diff(ptr)), users])
        items = np.concatenate([ex_items, items])
    order = np.argsort(users, kind="stable")
    return np.searchsorted(users[order], np.arange(U + 1)).astype(np.int64), items[order].astype(np.int64)


def _allowed(users: np.ndarray, items: np.ndarray, ptr, ex_items, allow) -> np.ndarray:
    """(P,) bool: pair (user, item) passes the filters."""
    ok = np.ones(len(users), dtype=bool)
    if allow is not None:
        ok &= allow[items] if allow.ndim == 1 else allow[users, items]
    if ptr is not None:
        n = int(max(items.max(initial=0), ex_items.max(initial=0))) + 1
        excluded = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr)) * n + ex_items
        ok &= ~np.isin(users * n + items, excluded)
    return ok


def _merge(items, scores, h_users, h_items, h_scores, k: int, U: int, num_items: int):
    """The scan's (U, k) candidates plus the history pairs -> the best k per user by (score desc, item asc)."""
    kth = scores[:, -1]  # (U,) the scan's k-th score (-inf when it has fewer): a pair below it cannot enter
    sel = h_scores >= np.where(np.isnan(kth), -np.inf, kth)[h_users]
    h_users, h_items, h_scores = h_users[sel], h_items[sel], h_scores[sel]
    counts = np.bincount(h_users, minlength=U)
    width, kk = (int(counts.max()) if len(h_users) else 0), items.shape[1]
    cand_i = np.full((U, kk + width), num_items, dtype=np.int64)  # num_items: padding, after every item
    cand_s = np.full((U, kk + width), -np.inf, dtype=np.float32)
    cand_i[:, :kk] = np.where(items >= 0, items, num_items)
    cand_s[:, :kk] = scores
    col = kk + np.arange(len(h_users)) - np.repeat(np.cumsum(counts) - counts, counts)  # pairs are user-sorted
    cand_i[h_users, col], cand_s[h_users, col] = h_items, h_scores
    order = top_by_score(torch.from_numpy(cand_s), torch.from_numpy(cand_i), min(k, cand_s.shape[1])).numpy()
    out_i, out_s = np.take_along_axis(cand_i, order, 1), np.take_along_axis(cand_s, order, 1)
    pad = out_i == num_items
    return np.where(pad, -1, out_i), np.where(pad, -np.inf, out_s).astype(np.float32)


def _fused(heads: Sequence[Head], top, first_item: int, num_items: int, threads: int):
    """One model's head fused with the top-k in C++ (`StreamingTopK.add_head`)."""
    if len(heads) != 1:
        raise ValueError(f"fused: the fused head takes one model, got {len(heads)}")
    h = heads[0]
    x = h.x.float().contiguous()  # (U, C)
    w = h.weight.float().contiguous()  # (V, C)
    b = None if h.bias is None else h.bias.float().contiguous()  # (V,)
    U, C = x.shape
    for lo, hi, is_item in _spans(w.shape[0], first_item, num_items, w.shape[0]):
        bias = 0 if b is None else b.data_ptr() + 4 * lo
        top.add_head(x.data_ptr(), w.data_ptr() + 4 * lo * C, bias, U, C, hi - lo,
                     lo - first_item if is_item else 0, is_item, True, threads)
    items, values, norm = top.results()
    return items, values, norm[None].astype(np.float64)


def _fused_cuda(heads: Sequence[Head], first_item, num_items, k, ptr, ex_items, allow):
    """One model's head fused with the top-k in the CUDA kernel (kernels/head_topk.py); returns what `_scan`
    does."""
    from .kernels.head_topk import head_topk, head_topk_unusable

    h = heads[0]
    why = "an ensemble has several heads" if len(heads) != 1 else head_topk_unusable(h.x, h.weight, k)
    if why:
        raise ValueError(f"fused: the CUDA head + top-k cannot run: {why}; pass fused=False")
    items, values, lse = head_topk(h.x, h.weight, h.bias, first_item, num_items, k, ptr, ex_items, allow)
    return items.cpu().numpy(), values.cpu().numpy(), lse.double().cpu().numpy()[None]


def cuda_fused_default() -> bool:
    """`item_topk(fused=None)` on a GPU: the CUDA head + top-k kernel only with GENREC_CUDA_HEAD_TOPK=1, until it
    is run on a GPU (it is tested on CPU threads: tests/cuda_emu); else the torch loop."""
    return os.environ.get("GENREC_CUDA_HEAD_TOPK", "0") == "1"


def _spans(V: int, first_item: int, num_items: int, chunk: int):
    """(lo, hi, is_item) vocabulary ranges: the tokens before the items, the items in chunks, the rest."""
    end = first_item + num_items
    if first_item > 0:
        yield 0, first_item, False
    for lo in range(first_item, end, chunk):
        yield lo, min(lo + chunk, end), True
    if end < V:
        yield end, V, False


def _logits(heads: Sequence[Head], lo: int, hi: int) -> list:
    """Each head's logits of vocabulary rows [lo, hi): (U, hi - lo) float32, contiguous."""
    return [(h.x @ h.weight[lo:hi].t() if h.bias is None else torch.addmm(h.bias[lo:hi], h.x, h.weight[lo:hi].t()))
            .float().contiguous() for h in heads]


def _drop_zero_bias(heads: Sequence[Head]) -> list:
    """A zero bias (GenRec's final_logits_bias unless converted from a model that set it) as None:
    `mm` then writes the logits once instead of copying the bias into them first."""
    return [Head(h.x, h.weight, None if h.bias is None or not bool(h.bias.any()) else h.bias) for h in heads]


def _add(acc, z: torch.Tensor, first_item: int, topk: bool, lse: bool, threads: int) -> None:
    z = z.contiguous()
    acc.add(z.data_ptr(), z.shape[0], z.shape[1], z.shape[1], first_item, topk, lse, threads)


def _item_topk_torch(heads, first_item, num_items, k, ptr, ex_items, allow, chunk):
    """The chunked loop in torch ops on the heads' device (GPUs): running top-k and log-sum-exp; returns
    what `_scan` does. The filters go to the device once, as given (exclusions as (user, item) pairs, never
    a dense (users x catalog) mask), and no step waits for the host."""
    x0 = heads[0].x
    U, V, dev = x0.shape[0], heads[0].weight.shape[0], x0.device
    allow_t = None if allow is None else torch.from_numpy(np.ascontiguousarray(allow)).to(dev)  # (N,) or (U, N)
    ex_rows = ex_cols = None
    if ptr is not None:  # (E,) user and item of every exclusion
        ex_rows = torch.from_numpy(np.repeat(np.arange(U), np.diff(ptr))).to(dev)
        ex_cols = torch.from_numpy(np.asarray(ex_items, dtype=np.int64)).to(dev)
    best = torch.full((U, k), float("-inf"), device=dev)
    best_i = torch.full((U, k), -1, dtype=torch.long, device=dev)
    lse = torch.full((len(heads), U), float("-inf"), device=dev)
    for lo, hi, is_item in _spans(V, first_item, num_items, chunk):
        z = _logits(heads, lo, hi)
        lse = torch.logaddexp(lse, torch.stack([zm.logsumexp(1) for zm in z]))
        if not is_item:
            continue
        i0, c = lo - first_item, hi - lo
        s = torch.stack(z).mean(0)  # (U, c)
        if allow_t is not None:
            s = s.masked_fill(~allow_t[..., i0:i0 + c], float("-inf"))
        if ex_rows is not None:  # exclusions outside this chunk land on a spare column, dropped after
            col = ex_cols - i0
            col = torch.where((col >= 0) & (col < c), col, c)
            s = F.pad(s, (0, 1)).index_put_((ex_rows, col), s.new_tensor(float("-inf")))[:, :c]
        s = s.masked_fill(s.isnan(), float("-inf"))  # NaN is never chosen
        ids = torch.arange(i0, i0 + c, device=dev).expand(U, -1)
        best, best_i = _merge_topk(torch.cat([best, s], 1), torch.cat([best_i, ids], 1), k)
    best_i = torch.where(best == float("-inf"), -1, best_i)
    return best_i.cpu().numpy(), best.float().cpu().numpy(), lse.double().cpu().numpy()


def _merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int):
    """Best k of each row by (value desc, id asc; ids in [-1, 2**31)) -> (values, ids) (U, k)."""
    top = top_by_score(values, ids, k)  # (U, k)
    return values.gather(1, top), ids.gather(1, top)


def item_topk_reference(logits: Sequence[torch.Tensor], first_item: int, num_items: int, k: int, exclude=None,
                        allow=None) -> tuple[np.ndarray, np.ndarray]:
    """The definition: each member's full logits (U, V) -> log_softmax, mean over members, item columns,
    filters, then the best k by (score desc, item asc); NaN never chosen. Same outputs as `item_topk`."""
    logp = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits]).mean(0)  # (U, V)
    scores = logp[:, first_item:first_item + num_items].cpu().numpy()
    U = scores.shape[0]
    ptr, ex_items, allow = check_filters(exclude, allow, U, num_items)
    items = np.full((U, k), -1, dtype=np.int64)
    out = np.full((U, k), -np.inf, dtype=np.float32)
    for u in range(U):
        ok = ~np.isnan(scores[u])
        if allow is not None:
            ok &= allow if allow.ndim == 1 else allow[u]
        if ptr is not None:
            ok[ex_items[ptr[u]:ptr[u + 1]]] = False
        cand = np.flatnonzero(ok)
        best = cand[np.argsort(-scores[u, cand], kind="stable")[:k]]
        items[u, :len(best)], out[u, :len(best)] = best, scores[u, best]
    return items, out
