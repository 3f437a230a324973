"""LM head + constrained top-k on the GPU (cuda/head_topk.cu): the (users x vocabulary) logits are never
written to memory.

The kernel splits the vocabulary; per (user, split) it writes the best k allowed items by (logit desc, item
asc) and the log-sum-exp parts (max, sum of exp) of every vocabulary row. `merge_splits` (torch, any
device) combines them into what `item_topk`'s scan returns: the best k items, their logits and the
normaliser. `item_topk(..., fused=True)` on a CUDA tensor runs it; its reference is `item_topk_reference`.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["MAX_K", "head_topk_available", "head_topk_unusable", "head_topk", "merge_splits"]

MAX_K = 256  # cuda/head_topk.h kHeadTopKMaxK
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/head_topk.h HeadDType


def _native():
    try:
        from genrec_fast import _core
    except ImportError:
        return None
    return _core if hasattr(_core, "head_topk_forward") else None


def head_topk_available() -> bool:
    """True when the extension was built with the CUDA head + top-k kernel."""
    return _native() is not None


def head_topk_unusable(x: torch.Tensor, weight: torch.Tensor, k: int) -> str:
    """Why the kernel cannot take these inputs ("" when it can)."""
    if not head_topk_available():
        return "genrec_fast was built without the CUDA kernels"
    if x.device.type != "cuda" or weight.device != x.device:
        return f"x and weight must be on one CUDA device, got {x.device} and {weight.device}"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"x (U, C) and weight (V, C) must share C, got shapes {tuple(x.shape)} and {tuple(weight.shape)}"
    if x.dtype not in _DTYPE_CODES or weight.dtype != x.dtype:
        return f"x and weight must share a dtype of fp32/fp16/bf16, got {x.dtype} and {weight.dtype}"
    if x.shape[1] % 16 or x.shape[1] == 0:
        return f"the hidden size must be a positive multiple of 16, got {x.shape[1]}"
    if not 1 <= k <= MAX_K:
        return f"k must be in 1..{MAX_K}, got {k}"
    return ""


def head_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, first_item: int, num_items: int,
              k: int, ptr: np.ndarray | None = None, ex_items: np.ndarray | None = None,
              allow: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best k allowed items of logits = x @ weight.T + bias over vocabulary rows [first_item, +num_items).

    x (U, C), weight (V, C) on one CUDA device; filters as `beam_search.check_filters` returns them (exclude
    CSR ptr (U + 1,) / items, allow (num_items,) or (U, num_items) bool); the CSR may also be int64 tensors on
    x's device (a caller that keeps it there). -> items (U, k) int64 (-1 = none), logits (U, k) float32 (-inf
    padding), lse (U,) float32 over the whole vocabulary (filters ignored).
    """
    why = head_topk_unusable(x, weight, k)
    if why:
        raise ValueError(f"head_topk: {why}")
    U, V, dev = x.shape[0], weight.shape[0], x.device
    if bias is not None and (bias.device != dev or bias.shape != (V,)):
        raise ValueError(f"head_topk: bias must be ({V},) on {dev}, got {tuple(bias.shape)} on {bias.device}")
    if not 0 <= first_item <= first_item + num_items <= V:
        raise ValueError(f"head_topk: items [first_item, first_item + num_items) = [{first_item}, "
                         f"{first_item + num_items}) must lie in the vocabulary's {V} rows")
    x, weight = (t.contiguous() if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(
        memory_format=torch.contiguous_format) for t in (x, weight))  # the kernel reads 16-byte aligned rows
    bias = None if bias is None else bias.float().contiguous()
    splits = int(_native().head_topk_splits(U, V, dev.index if dev.index is not None else torch.cuda.current_device()))
    values = torch.empty(U, splits, k, device=dev)  # (U, S, k)
    items = torch.empty(U, splits, k, dtype=torch.int32, device=dev)
    maxes = torch.empty(U, splits, device=dev)  # (U, S)
    sums = torch.empty(U, splits, device=dev)
    ex_ptr_t, ex_items_t = _exclusions(ptr, ex_items, dev)
    allow_t = None if allow is None else torch.from_numpy(np.ascontiguousarray(allow, dtype=np.uint8)).to(dev)
    with torch.cuda.device(dev):  # the launch goes to x's GPU, whichever is current
        _native().head_topk_forward(
            x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), _DTYPE_CODES[x.dtype], U,
            x.shape[1], V, first_item, num_items, k, _ptr(ex_ptr_t), _ptr(ex_items_t), _ptr(allow_t),
            0 if allow is None or allow.ndim == 1 else num_items, splits, values.data_ptr(), items.data_ptr(),
            maxes.data_ptr(), sums.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)
    return merge_splits(values, items, maxes, sums, k, num_items)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _exclusions(ptr, ex_items, dev):
    """The exclude CSR with each user's items sorted ascending (the kernel walks them in order), on dev."""
    if ptr is None:
        return None, None
    if isinstance(ptr, torch.Tensor):  # sorted on the device: no host round trip
        ptr, ex_items = ptr.to(dev, torch.int64), ex_items.to(dev, torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(ptr) - 1, device=dev), ptr.diff())
        order = torch.sort(ex_items).indices
        order = order[torch.sort(rows[order], stable=True).indices]  # by (row, item)
        items = ex_items[order] if len(ex_items) else torch.zeros(1, dtype=torch.int64, device=dev)
        return ptr.contiguous(), items.contiguous()
    rows = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    order = np.lexsort((ex_items, rows))
    items = np.ascontiguousarray(ex_items[order], dtype=np.int64)
    if len(items) == 0:
        items = np.zeros(1, dtype=np.int64)  # a valid pointer; ptr says every list is empty
    return (torch.from_numpy(np.ascontiguousarray(ptr, dtype=np.int64)).to(dev), torch.from_numpy(items).to(dev))


def merge_splits(values: torch.Tensor, items: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor, k: int,
                 num_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split results -> (items (U, k) int64, logits (U, k) float32, lse (U,) float32).

    values / items (U, S, k): each split's best k, -inf / -1 padding; maxes / sums (U, S): each split's
    max logit and sum of exp(logit - max) (NaN: a NaN logit). Ranked by (logit desc, item asc)."""
    from ..device_search import top_by_score

    v = values.flatten(1).float()  # (U, S * k), S * k >= k (flatten: a reshape(U, -1) of 0 users fails)
    i = items.flatten(1).long()
    i = torch.where(i < 0, num_items, i)  # padding ranks after every item at equal value
    top = top_by_score(v, i, k)  # (U, k)
    best, best_i = v.gather(1, top), i.gather(1, top)
    none = (best == float("-inf")) | (best_i >= num_items)
    best_i = torch.where(none, -1, best_i)
    best = best.masked_fill(none, float("-inf"))
    m = maxes.max(1).values  # (U,)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = m_safe + torch.log((sums * torch.exp(maxes - m_safe[:, None])).sum(1))  # (U,)
    return best_i, best, lse
