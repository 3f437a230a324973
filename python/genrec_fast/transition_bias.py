"""Transition bias: learned logit offsets for the items that followed the user's last items in OTHER users' sequences.

A one-token model scores item i by z_i = h . e_i + b_i. On sparse data (Amazon: ~9 items per user) many items
are seen too rarely for e_i to learn who buys them after what; the co-occurrence counts of the training
sequences still know. Measured before this was built: adding w * log1p(counts) of the last three items'
successors to a trained model's top 300 raised validation NDCG@10 by 23% on Beauty and 5% on Yelp
(w chosen on half the users, measured on the other half; docs/experiments/datasets.md). So, for the
items c_0, c_1, ... just before `<mask>` (c_0 the most recent), the model adds to item j's logit

    t_j = sum_r a[r] * log1p(N[c_r, j])

where N[a, j] sums 1/d over the pairs (a, j) that stand d = 1..window apart, a first, in one training
sequence, kept for the `neighbors` largest j of each a, and a (context,) starts at 0 (the model starts as one
without it). Training subtracts the example's own user's pairs from N (`OwnPairs`): the target's own
transition, and the user's later items, would otherwise be counted in its feature (a leak the validation
users never get). Serving uses N as built.

The table is derived from the training sequences once (`TransitionBias.fit`) and saved in the state dict.
With `reverse` a second table holds each item's most frequent *predecessors* (N[j, a]: the items that came
before it), weighed by a second vector `reverse_weight`: on Yelp, where visits to businesses follow no fixed
order, re-ranking the top 200 of a trained model with them gained 6% validation NDCG@10, and nothing on
Beauty, where the learned weight can stay ~0 (docs/experiments/datasets.md).

`pairs` gives (B, context * width) items and offsets (width = neighbors, twice that with `reverse`), the form
`item_topk(history=...)` and the fused loss take (summed over repeats): decoding stays exact without (users x catalog) logits. Over codes with
the leaf head (`code_pairs`) the cluster steps weigh the same features with a second vector, `cluster_weight`
(history_bias.code_offsets puts each successor's offset on its token at every step).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn


def _pairs(train: Sequence[np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All (owner, a, b, 1/d) with a d = 1..window items before b in one training sequence."""
    lengths = np.fromiter(map(len, train), dtype=np.int64, count=len(train))
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train]) if len(train) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(train), dtype=np.int64), lengths)
    out = [[], [], [], []]
    for d in range(1, window + 1):
        same = owner[d:] == owner[:-d]
        for acc, v in zip(out, (owner[d:][same], flat[:-d][same], flat[d:][same])):
            acc.append(v)
        out[3].append(np.full(int(same.sum()), 1.0 / d))
    return tuple(np.concatenate(o) if o else np.zeros(0) for o in out)


def _sum_by_key(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the summed weight of each."""
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inv.reshape(-1), weights, minlength=len(uniq))


def neighbor_table(train: Sequence[np.ndarray], n_items: int, neighbors: int, window: int = 3,
                   reverse: bool = False):
    """-> items (n_items + 1, neighbors) int64 (-1 = none; the last row: no item) and counts (same shape) float32:
    each item's `neighbors` successors with the largest N[a, j] (ties: smaller j first), largest first;
    `reverse`: its predecessors, by N[j, a]."""
    if neighbors < 1 or window < 1:
        raise ValueError(f"neighbors and window: expected >= 1, got {neighbors!r} and {window!r}")
    _, a, b, w = _pairs(train, window)
    if reverse:
        a, b = b, a
    keys, counts = _sum_by_key(a * n_items + b, w)
    rows, cols = keys // n_items, keys % n_items
    order = np.lexsort((cols, -counts, rows))  # by row, then count down, then item up
    rows, cols, counts = rows[order], cols[order], counts[order]
    start = np.searchsorted(rows, np.arange(n_items + 1))
    rank = np.arange(len(rows)) - start[rows]
    keep = rank < neighbors
    items = np.full((n_items + 1, neighbors), -1, dtype=np.int64)
    table = np.zeros((n_items + 1, neighbors), dtype=np.float32)
    items[rows[keep], rank[keep]] = cols[keep]
    table[rows[keep], rank[keep]] = counts[keep]
    return torch.from_numpy(items), torch.from_numpy(table)


class OwnPairs:
    """Each training user's own contribution to N (training only): `counts(owner, a, j)` -> the summed 1/d of
    the user's own (a, j) pairs, looked up in one sorted array of keys owner * n^2 + a * n + j."""

    def __init__(self, train: Sequence[np.ndarray], n_items: int, window: int = 3):
        if len(train) * n_items * n_items >= 2 ** 62:
            raise ValueError(f"transition bias: {len(train)} users x {n_items}^2 items overflow the int64 pair keys")
        self.n = n_items
        owner, a, b, w = _pairs(train, window)
        self.keys, self.weights = _sum_by_key((owner * n_items + a) * n_items + b, w)

    def counts(self, owner: np.ndarray, a: np.ndarray, j: np.ndarray, reverse: bool = False) -> np.ndarray:
        """owner (B,), a (B, R), j (B, R, M) item indices (-1 = none) -> (B, R, M) float32: the pairs (a, j), or
        with `reverse` (j, a)."""
        if not len(self.keys):
            return np.zeros(j.shape, dtype=np.float32)
        first, second = (j, a[:, :, None]) if reverse else (a[:, :, None], j)
        q = (owner[:, None, None] * self.n + first) * self.n + second  # (B, R, M)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        hit = (self.keys[pos] == q) & (a[:, :, None] >= 0) & (j >= 0) & (owner[:, None, None] >= 0)
        return np.where(hit, self.weights[pos], 0.0).astype(np.float32)

    def table_counts(self, owner: np.ndarray, a: np.ndarray, j: np.ndarray, neighbors: int) -> np.ndarray:
        """As `counts` for the rows of a `TransitionBias` table j (B, R, W): its first `neighbors` columns are
        successors of a, any further ones (`reverse`) predecessors."""
        own = self.counts(owner, a, j[..., :neighbors])
        if j.shape[-1] == neighbors:
            return own
        return np.concatenate([own, self.counts(owner, a, j[..., neighbors:], reverse=True)], -1)


def context_items(item_ids: torch.Tensor, mask: torch.Tensor, context: int,
                  until: torch.Tensor | None = None) -> torch.Tensor:
    """The `context` most recent items of each row (B, context): item indices, most recent first, -1 where the
    history is shorter. item_ids (B, S) (0 = no item), mask (B, S) bool; until (B,): only positions before
    it count (the `<mask>` of a pretraining example, which has items after it too)."""
    B, S = item_ids.shape
    before = (item_ids > 0) & mask  # (B, S)
    if until is not None:
        before &= torch.arange(S, device=item_ids.device) < until[:, None]
    rank = before.flip(1).cumsum(1).flip(1) - 1  # (B, S) items between this one and the end
    out = torch.full((B, context), -1, dtype=torch.long, device=item_ids.device)
    b, s = (before & (rank < context)).nonzero(as_tuple=True)
    out[b, rank[b, s]] = item_ids[b, s] - 1
    return out


def mask_positions(tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B,) the position of each row's `<mask>` token (S where there is none)."""
    S = tokens.shape[1]
    return torch.where(tokens == mask_id, torch.arange(S, device=tokens.device), S).min(1).values


class TransitionBias(nn.Module):
    """With `clusters` (codes with a leaf head) the cluster steps get weights of their own, `cluster_weight`:
    there every successor's offset lands on its cluster token and the ~150 of a user sum per cluster, where
    the leaf step scores each item alone. One weight for both learned a[0] = .05 on Beauty (the one-token
    model 1.16) and no gain (docs/codes.md)."""

    def __init__(self, n_items: int, context: int, neighbors: int, window: int = 3, clusters: bool = False,
                 reverse: bool = False):
        super().__init__()
        self.window, self.neighbors = window, neighbors
        self.weight = nn.Parameter(torch.zeros(context))  # (R,) a[r]: the one step, or the leaf step
        self.cluster_weight = nn.Parameter(torch.zeros(context)) if clusters else None  # (R,) the cluster steps
        # (R,) the same for the predecessor columns
        self.reverse_weight = nn.Parameter(torch.zeros(context)) if reverse else None
        self.reverse_cluster_weight = nn.Parameter(torch.zeros(context)) if reverse and clusters else None
        width = neighbors * (2 if reverse else 1)  # successors, then predecessors
        # int32 ids: a million items x 50 neighbours take 400 MB with the counts
        self.register_buffer("items", torch.full((n_items + 1, width), -1, dtype=torch.int32))
        self.register_buffer("counts", torch.zeros(n_items + 1, width))

    def fit(self, train: Sequence[np.ndarray]) -> "TransitionBias":
        """The neighbour table of the training sequences (item indices 0..n_items - 1)."""
        n = self.items.shape[0] - 1
        tables = [neighbor_table(train, n, self.neighbors, self.window, reverse=r)
                  for r in ((False, True) if self.reverse_weight is not None else (False,))]
        self.items.copy_(torch.cat([t[0] for t in tables], 1))
        self.counts.copy_(torch.cat([t[1] for t in tables], 1))
        return self

    @property
    def context(self) -> int:
        return self.weight.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a codes checkpoint from before `cluster_weight` used `weight` at every step: so it still does
        if self.cluster_weight is not None and prefix + "weight" in state_dict:
            state_dict.setdefault(prefix + "cluster_weight", state_dict[prefix + "weight"].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def pairs(self, context: torch.Tensor, own: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, R) item indices (-1 = none), own (B, R, W) counts to subtract (training) ->
        items (B, R * W) int64 (-1 = none) and offsets (B, R * W) float, 0 where no item."""
        items, values = self._pairs(context, own, self._columns(self.weight, self.reverse_weight)[None])
        return items, values[:, 0]

    def code_pairs(self, context: torch.Tensor, own: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `pairs`, with the offsets of a cluster step and of the leaf step: -> items (B, N), values (B, 2, N)."""
        if self.cluster_weight is None:
            raise ValueError("TransitionBias.code_pairs: built without clusters (model.leaf_head)")
        return self._pairs(context, own, torch.stack([self._columns(self.cluster_weight, self.reverse_cluster_weight),
                                                      self._columns(self.weight, self.reverse_weight)]))

    def _columns(self, weight: torch.Tensor, reverse: torch.Tensor | None) -> torch.Tensor:
        """(R,) weights of the successor columns (+ (R,) of the predecessor ones) -> (R, W), one per table column."""
        R, M = weight.shape[0], self.neighbors
        cols = [weight[:, None].expand(R, M)] + ([reverse[:, None].expand(R, M)] if reverse is not None else [])
        return torch.cat(cols, 1)

    def _pairs(self, context: torch.Tensor, own: torch.Tensor | None, weight: torch.Tensor):
        """weight (K, R, W) -> items (B, R * W), values (B, K, R * W)."""
        rows = torch.where(context >= 0, context, self.items.shape[0] - 1)  # (B, R); the last row holds no item
        items, counts = self.items[rows].long(), self.counts[rows]  # (B, R, W)
        if own is not None:
            counts = (counts - own).clamp(min=0)
        feature = torch.log1p(counts).masked_fill(items < 0, 0.0)  # (B, R, W)
        values = weight[None] * feature[:, None]  # (B, K, R, W)
        return items.flatten(1), values.flatten(2)
