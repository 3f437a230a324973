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

from . import bf16_head
from .beam_search import check_filters
from .device_search import top_by_score
from .native import core
from .row_pairs import RowPairs

# One model on a CPU takes the fused C++ head from a 16-user tile on, or from 32,768 items whatever the users: there
# it splits the catalog over the threads (spans of >= 16,384 columns, csrc/topk.cpp), while torch's matrix-vector
# product runs on one (1M items, 1 user, 2 threads: 30 -> 13 ms, benchmarks/README.md); else matmuls + the C++ scan.
FUSED_MIN_USERS = 16
FUSED_MIN_ITEMS = 2 ** 15
DEFAULT_CHUNK = 8192  # vocabulary rows per matmul: (256 users x 8192) fp32 = 8 MB, measured fastest on CPU
WHOLE_MATMUL_MAX = 256 * DEFAULT_CHUNK  # users x vocabulary up to which one matmul takes the whole vocabulary
PRECISIONS = ("float32", "bfloat16")  # item_topk's head: float, or the bfloat16 scan (bf16_head.py)


class Head(NamedTuple):
    """One model's decoder states and LM head: logits = x @ weight.T + bias."""

    x: torch.Tensor  # (U, C)
    weight: torch.Tensor  # (V, C)
    bias: torch.Tensor | None  # (V,), or None for none


def item_topk(heads: Sequence[Head], first_item: int, num_items: int, k: int, exclude=None, allow=None,
              chunk: int = DEFAULT_CHUNK, threads: int | None = None, fused: bool | None = None,
              history: tuple | None = None, precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Best k allowed items per user by mean log-probability over `heads` (one per ensemble member).

    Item i is vocabulary row first_item + i. -> items (U, k) int64 (-1 = none left), scores (U, k) float32
    (-inf padding). exclude / allow as in `beam_search.check_filters`. On a CPU one model with >= 16 users or
    >= 32,768 items runs the fused C++ head (`StreamingTopK.add_head`: logits never stored, the catalog split over
    the threads when there are too few users to go round; fused=False forces the other path),
    else the head runs `chunk` rows at a time as matmuls into the C++ scan; other devices run the
    chunked loop in torch ops, or with fused=True (default: `cuda_fused_default()`) the CUDA head + top-k
    kernel (one model; a clear error where it cannot run).

    history: (items (U, S) int64 tensor of item indices, -1 = none; one (U, S) tensor of logit offsets per
    head) adds each offset to its item's logit, summed over repeats (history_bias.py), exactly: one model on a
    CPU offers the biased pairs to the C++ top-k before the scan, which then skips them, and its normaliser
    counts them biased (`StreamingTopK.add_offsets`); an ensemble's C++ scan and the torch loop (GPUs) add them
    to each chunk's member logits (`_ChunkOffsets`). The CUDA head + top-k kernel takes no offsets.

    precision "bfloat16": one float32 model on a CPU with AVX512-BF16, from `bf16_head.MIN_ITEMS` items, scans
    the table rounded to bfloat16 and re-scores its candidates in float (bf16_head.py): the same items, their
    logits to float rounding, the normaliser within a per-user bound; elsewhere (or for a user whose candidates
    cannot prove their order) the float head runs.
    """
    x0, w0 = heads[0].x, heads[0].weight
    U, V = x0.shape[0], w0.shape[0]
    if not 0 <= first_item <= first_item + num_items <= V:
        raise ValueError(f"items [{first_item}, {first_item + num_items}) do not fit a vocabulary of {V}")
    if k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    ptr, ex_items, allow = check_filters(exclude, allow, U, num_items)
    heads = _drop_zero_bias(heads)
    scan = (heads, first_item, num_items, k, chunk, threads, fused)
    offsets = None if history is None else _check_offsets(*history, U, len(heads))
    if precision == "bfloat16" and fused is not False and bf16_head.usable(heads, num_items):
        items, values, norms = _scan_bf16(*scan, ptr, ex_items, allow, offsets)
    else:
        items, values, norms = _scan(*scan, ptr, ex_items, allow, offsets)
    return items, _scores(items, values, norms[0] if len(norms) == 1 else norms.mean(0))


def top_logits(head: Head, first_item: int, num_items: int, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """One model's best k items by raw logit (no normaliser, no offsets), `exclude` as in `item_topk` ->
    items (U, k) int64 (-1 = none left), logits (U, k) float32 (-inf padding). (calibrate.py's items off the
    biases.)"""
    ptr, ex_items, _ = check_filters(exclude, None, head.x.shape[0], num_items)
    items, values, _ = _scan([head], first_item, num_items, k, DEFAULT_CHUNK, None, None, ptr, ex_items, None)
    return items, np.where(items >= 0, values, -np.inf).astype(np.float32)


def candidate_logits(heads: Sequence[Head], first_item: int, items, history: tuple | None = None) -> torch.Tensor:
    """The members' mean logit of given items, offsets added: items (U, N) item indices (-1 = none) -> (U, N)
    float32, -inf at -1 (cascade.py's ranker: N candidates instead of the catalog, so no normaliser).
    history as in `item_topk`. On a CPU (float32 heads) the C++ core's gather-and-dot with a per-user lookup of
    the offsets (`_core.candidate_logits`); elsewhere `candidate_logits_reference`."""
    x0, V = heads[0].x, heads[0].weight.shape[0]
    idx = torch.as_tensor(np.asarray(items), dtype=torch.long, device=x0.device)  # (U, N)
    if idx.dim() != 2 or idx.shape[0] != x0.shape[0]:
        raise ValueError(f"items: expected (U={x0.shape[0]}, N) item indices, got shape {tuple(idx.shape)}")
    if idx.numel() and int(idx.max()) >= V - first_item:
        raise ValueError(f"items: index {int(idx.max())} beyond the vocabulary's {V - first_item} item rows")
    offsets = None if history is None else _check_offsets(*history, x0.shape[0], len(heads))
    native = x0.device.type == "cpu" and all(h.weight.dtype == h.x.dtype == torch.float32 for h in heads)
    if not native:
        return candidate_logits_reference(heads, first_item, idx, offsets)
    idx, (U, N) = idx.contiguous(), idx.shape
    z = torch.zeros((U, N), dtype=torch.float32)
    # (U, S) pair items and (M, U, S) offsets; S = 0 without a bias
    pair_items, pair_offsets = offsets if offsets is not None else (idx.new_empty(U, 0), z.new_empty(len(heads), U, 0))
    for m, h in enumerate(heads):
        w, x = h.weight.detach()[first_item:].contiguous(), h.x.detach().contiguous()  # (V - first, C), (U, C)
        b = None if h.bias is None else h.bias.detach()[first_item:].float().contiguous()
        out = torch.empty((U, N), dtype=torch.float32)
        core().candidate_logits(w.data_ptr(), 0 if b is None else b.data_ptr(), w.shape[0], w.shape[1],
                                x.data_ptr(), idx.data_ptr(), U, N, pair_items.data_ptr(), pair_offsets[m].data_ptr(),
                                pair_items.shape[1], out.data_ptr(), torch.get_num_threads())
        z += out
    return z / len(heads)


def candidate_logits_reference(heads: Sequence[Head], first_item: int, idx: torch.Tensor,
                               offsets: tuple | None = None) -> torch.Tensor:
    """`candidate_logits` in torch ops (any device): idx (U, N) int64 item indices (-1 = none), offsets as
    `_check_offsets` returns them (or None) -> (U, N) float32, -inf at -1."""
    x0, V = heads[0].x, heads[0].weight.shape[0]
    rows = first_item + idx.clamp(min=0)  # (U, N) vocabulary rows
    if offsets is not None:  # the bias pairs as sorted (user, item) keys; each candidate's among them
        hist_items = offsets[0].to(idx.device)
        pairs = RowPairs([hist_items], V - first_item)
        users = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
        at, found = pairs.find(users, idx)  # (U, N)
        offsets = offsets if len(pairs.keys) else None  # (no pair at all)
    z = torch.zeros(idx.shape, dtype=torch.float32, device=x0.device)
    for m, h in enumerate(heads):
        z += torch.bmm(h.weight[rows].float(), h.x.float()[:, :, None])[:, :, 0]  # (U, N)
        if h.bias is not None:
            z += h.bias[rows].float()
        if offsets is not None:  # each pair's offsets summed over repeats, at the candidates that are pairs
            z += torch.where(found, pairs.sums(hist_items, offsets[1][m].to(idx.device))[at], 0.0)
    return (z / len(heads)).masked_fill(idx < 0, float("-inf"))


def _scan(heads, first_item, num_items, k, chunk, threads, fused, ptr, ex_items, allow, offsets=None):
    """-> items (U, k) int64 (-1 = none), their mean member logits (U, k) float32, and every member's
    log-sum-exp over the whole vocabulary, filters ignored (M, U) float64; the logits with `offsets` (items
    (U, S) int64, -1 = none; offsets (M, U, S) float32) added, if given."""
    x0, V = heads[0].x, heads[0].weight.shape[0]
    U = x0.shape[0]
    if x0.device.type != "cpu":
        if offsets is None and (fused or fused is None and cuda_fused_default() and not _cuda_unusable(heads, k)):
            return _fused_cuda(heads, first_item, num_items, k, ptr, ex_items, allow)
        if fused and offsets is not None:
            raise ValueError("fused: the CUDA head + top-k takes no logit offsets (a history or transition "
                             "bias); pass fused=None")
        return _item_topk_torch(heads, first_item, num_items, k, ptr, ex_items, allow, chunk, offsets)
    threads = torch.get_num_threads() if threads is None else threads
    top = core().StreamingTopK(U, k, num_items, ptr, ex_items, allow)
    chunk_offsets = None
    if offsets is not None and len(heads) == 1:  # into the C++ top-k before the scan
        _add_offsets(top, heads[0], first_item, offsets[0], offsets[1][0], threads)
    elif offsets is not None:  # an ensemble: into each chunk's member logits
        chunk_offsets = _ChunkOffsets(*offsets, len(heads), x0.device)
    if fused is None:
        fused = len(heads) == 1 and (U >= FUSED_MIN_USERS or num_items >= FUSED_MIN_ITEMS)
    if fused:
        return _fused(heads, top, first_item, num_items, threads)
    lse = [core().StreamingTopK(U, 1, 0) for _ in heads] if len(heads) > 1 else None
    if lse is None and U * V <= WHOLE_MATMUL_MAX:  # a few users: the whole vocabulary in one matmul
        z = _logits(heads, 0, V)[0]  # (U, V)
        for lo, hi, is_item in _spans(V, first_item, num_items, V):
            top.add(z.data_ptr() + 4 * lo, U, hi - lo, V, lo - first_item if is_item else 0, is_item, True, threads)
        items, values, norm = top.results()
        return items, values, norm[None].astype(np.float64)
    for lo, hi, is_item in _spans(V, first_item, num_items, chunk):
        z = _logits(heads, lo, hi)  # (U, hi - lo) member logits (mean logit for an ensemble: see below)
        if lse is None:  # one model: one pass for both the top-k and its normaliser
            _add(top, z[0], lo - first_item if is_item else 0, is_item, True, threads)
            continue
        z = torch.stack(z)  # (M, U, c)
        if chunk_offsets is not None and is_item:
            z = chunk_offsets.add(z, lo - first_item)
        for acc, zm in zip(lse, z):
            _add(acc, zm, 0, False, True, threads)
        if is_item:
            _add(top, z.mean(0), lo - first_item, True, False, threads)
    items, values, norm = top.results()
    norms = norm[None] if lse is None else np.stack([acc.results()[2] for acc in lse])
    return items, values, norms.astype(np.float64)


def _check_offsets(hist_items: torch.Tensor, offsets: Sequence[torch.Tensor], U: int, members: int):
    """`item_topk`'s history argument -> (items (U, S) int64, offsets (M, U, S) float32), C-contiguous."""
    if len(offsets) != members:
        raise ValueError(f"history: expected one offsets tensor per head ({members}), got {len(offsets)}")
    items, off = hist_items.long().contiguous(), torch.stack([o.float() for o in offsets]).contiguous()
    if items.dim() != 2 or items.shape[0] != U or off.shape[1:] != items.shape:
        raise ValueError(f"history: expected items and offsets of one shape (U={U}, S), got {tuple(items.shape)} "
                         f"and {tuple(off.shape[1:])}")
    return items, off


def _add_offsets(top, h: Head, first_item: int, items: torch.Tensor, offsets: torch.Tensor, threads: int) -> None:
    """Offsets (U, S) on one model's logits of items (U, S), into the C++ top-k before its scan."""
    x, w = h.x.float().contiguous(), h.weight.float().contiguous()  # (U, C), (V, C)
    b = None if h.bias is None else h.bias.float().contiguous()  # (V,); kept alive over the call
    C = x.shape[1]
    top.add_offsets(items.data_ptr(), offsets.data_ptr(), items.shape[0], items.shape[1], x.data_ptr(),
                    w.data_ptr() + 4 * first_item * C, 0 if b is None else b.data_ptr() + 4 * first_item, C, threads)


def _scores(items: np.ndarray, values: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Mean logits (U, k) less the mean normaliser (U,) -> float32 scores, -inf at the padding (a NaN logit
    makes every score NaN)."""
    return np.where(items >= 0, values - norm[:, None], -np.inf).astype(np.float32)


def _fused(heads: Sequence[Head], top, first_item: int, num_items: int, threads: int, w16=None):
    """One model's head fused with the top-k in C++ (`StreamingTopK.add_head`, or `add_head_bf16` over w16, the
    weight's rows in bfloat16 bits (V, C))."""
    if len(heads) != 1:
        raise ValueError(f"fused: the fused head takes one model, got {len(heads)}")
    h = heads[0]
    x = h.x.float().contiguous()  # (U, C)
    w = h.weight.float().contiguous() if w16 is None else w16  # (V, C)
    b = None if h.bias is None else h.bias.float().contiguous()  # (V,)
    (U, C), V = x.shape, w.shape[0]
    add, size = (top.add_head, 4) if w16 is None else (top.add_head_bf16, 2)
    for lo, hi, is_item in _spans(V, first_item, num_items, V):
        bias = 0 if b is None else b.data_ptr() + 4 * lo
        add(x.data_ptr(), w.data_ptr() + size * lo * C, bias, U, C, hi - lo, lo - first_item if is_item else 0,
            is_item, True, threads)
    items, values, norm = top.results()
    return items, values, norm[None].astype(np.float64)


def _scan_bf16(heads, first_item, num_items, k, chunk, threads, fused, ptr, ex_items, allow, offsets=None):
    """`_scan` of one model through the bfloat16 head (bf16_head.py): k' candidates scanned, re-scored in float,
    the best k kept where provably exact; the other users through `_scan`."""
    h = heads[0]
    threads = torch.get_num_threads() if threads is None else threads
    top = core().StreamingTopK(h.x.shape[0], bf16_head.candidates(k, num_items), num_items, ptr, ex_items, allow)
    if offsets is not None:
        _add_offsets(top, h, first_item, offsets[0], offsets[1][0], threads)
    w16, w_max = bf16_head.rows(h.weight)  # (V, C) bfloat16 bits, max row norm
    cand, approx, norm = _fused(heads, top, first_item, num_items, threads, w16)  # (U, k') by scanned value, (1, U)
    history = None if offsets is None else (offsets[0], [offsets[1][0]])
    exact = candidate_logits([h], first_item, cand, history).numpy()  # (U, k') float logits, -inf at -1
    b_max = 0.0 if h.bias is None else float(h.bias.abs().max())
    ok = bf16_head.exact_users(cand, approx, exact, k, bf16_head.error_bound(h.x.float(), w_max, b_max), num_items)
    items, values = bf16_head.best_k(cand, exact, k)
    norm = norm[0]
    redo = np.flatnonzero(~ok)
    if len(redo):  # near ties around the k-th item (or NaN): those users through the float head
        sub = _user_rows(redo, heads, ptr, ex_items, allow, offsets)
        items[redo], values[redo], sub_norm = _scan(sub[0], first_item, num_items, k, chunk, threads, fused, *sub[1:])
        norm[redo] = sub_norm[0]
    return items, values, norm[None]


def _user_rows(rows: np.ndarray, heads, ptr, ex_items, allow, offsets):
    """`_scan`'s per-user arguments restricted to users `rows`: heads, exclude CSR, allow, offsets."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    heads = [Head(h.x[idx], h.weight, h.bias) for h in heads]
    if ptr is not None:
        parts = [ex_items[ptr[u]:ptr[u + 1]] for u in rows]
        ex_items = np.concatenate(parts) if parts else ex_items[:0]
        ptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    if allow is not None and allow.ndim == 2:
        allow = np.ascontiguousarray(allow[rows])
    if offsets is not None:
        offsets = (offsets[0][idx].contiguous(), offsets[1][:, idx].contiguous())
    return heads, ptr, ex_items, allow, offsets


def _cuda_unusable(heads: Sequence[Head], k: int) -> str:
    """Why the CUDA head + top-k kernel cannot score these heads ("" when it can)."""
    from .kernels.head_topk import head_topk_unusable
    return "an ensemble has several heads" if len(heads) != 1 else head_topk_unusable(heads[0].x, heads[0].weight, k)


def _fused_cuda(heads: Sequence[Head], first_item, num_items, k, ptr, ex_items, allow):
    """One model's head fused with the top-k in the CUDA kernel (kernels/head_topk.py); returns what `_scan`
    does."""
    from .kernels.head_topk import head_topk

    h, why = heads[0], _cuda_unusable(heads, k)
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
    `mm` then writes the logits once instead of copying the bias into them first (a few users: not worth the
    check over the vocabulary)."""
    if heads[0].x.shape[0] < FUSED_MIN_USERS:
        return list(heads)
    return [Head(h.x, h.weight, None if h.bias is None or not bool(h.bias.any()) else h.bias) for h in heads]


def _add(acc, z: torch.Tensor, first_item: int, topk: bool, lse: bool, threads: int) -> None:
    z = z.contiguous()
    acc.add(z.data_ptr(), z.shape[0], z.shape[1], z.shape[1], first_item, topk, lse, threads)


def _item_topk_torch(heads, first_item, num_items, k, ptr, ex_items, allow, chunk, offsets=None):
    """The chunked loop in torch ops on the heads' device (GPUs): running top-k and log-sum-exp; returns
    what `_scan` does. The filters go to the device once, as given (exclusions as (user, item) pairs, never
    a dense (users x catalog) mask), and no step waits for the host; `offsets` (as `_scan`'s) are added to
    each chunk's logits before either."""
    x0 = heads[0].x
    U, V, dev = x0.shape[0], heads[0].weight.shape[0], x0.device
    allow_t = None if allow is None else torch.from_numpy(np.ascontiguousarray(allow)).to(dev)  # (N,) or (U, N)
    ex_rows = ex_cols = None
    if ptr is not None:  # (E,) user and item of every exclusion
        ex_rows = torch.from_numpy(np.repeat(np.arange(U), np.diff(ptr))).to(dev)
        ex_cols = torch.from_numpy(np.asarray(ex_items, dtype=np.int64)).to(dev)
    chunk_offsets = None if offsets is None else _ChunkOffsets(*offsets, len(heads), dev)
    best = torch.full((U, k), float("-inf"), device=dev)
    best_i = torch.full((U, k), -1, dtype=torch.long, device=dev)
    lse = torch.full((len(heads), U), float("-inf"), device=dev)
    for lo, hi, is_item in _spans(V, first_item, num_items, chunk):
        z = torch.stack(_logits(heads, lo, hi))  # (M, U, c)
        i0, c = lo - first_item, hi - lo
        if chunk_offsets is not None and is_item:
            z = chunk_offsets.add(z, i0)
        lse = torch.logaddexp(lse, z.logsumexp(2))
        if not is_item:
            continue
        s = z.mean(0)  # (U, c)
        if allow_t is not None:
            s = s.masked_fill(~allow_t[..., i0:i0 + c], float("-inf"))
        if ex_rows is not None:
            s = F.pad(s, (0, 1)).index_put_((ex_rows, _chunk_columns(ex_cols, i0, c)), s.new_tensor(float("-inf")))
            s = s[:, :c]
        s = s.masked_fill(s.isnan(), float("-inf"))  # NaN is never chosen
        ids = torch.arange(i0, i0 + c, device=dev).expand(U, -1)
        best, best_i = _merge_topk(torch.cat([best, s], 1), torch.cat([best_i, ids], 1), k)
    best_i = torch.where(best == float("-inf"), -1, best_i)
    return best_i.cpu().numpy(), best.float().cpu().numpy(), lse.double().cpu().numpy()


class _ChunkOffsets:
    """Offsets (items (U, S), -1 = none; values (M, U, S)) added to the member logits of one chunk of items at a
    time, on the logits' device, summed over repeats (the torch loop; an ensemble's C++ scan)."""

    def __init__(self, items: torch.Tensor, values: torch.Tensor, members: int, device):
        self.items, self.values = items.to(device), values.to(device)  # (U, S), (M, U, S)
        self.users = torch.arange(items.shape[0], device=device)[:, None]  # (U, 1)
        self.members = torch.arange(members, device=device)[:, None, None]  # (M, 1, 1)

    def add(self, z: torch.Tensor, i0: int) -> torch.Tensor:
        """z (M, U, c): logits of items [i0, i0 + c) -> with the offsets landing there (the rest, and -1, go to a
        spare column, dropped)."""
        c = z.shape[2]
        col = _chunk_columns(self.items, i0, c)
        return F.pad(z, (0, 1)).index_put_((self.members, self.users, col), self.values, accumulate=True)[..., :c]


def _chunk_columns(items: torch.Tensor, i0: int, c: int) -> torch.Tensor:
    """Item indices -> their columns in the chunk of items [i0, i0 + c), or c (a spare column, dropped after) for
    items outside it and -1 (none)."""
    col = items - i0
    return torch.where((col >= 0) & (col < c), col, c)


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
