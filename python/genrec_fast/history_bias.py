"""History bias: learned logit offsets for the items of the user's own history (repeat consumption).

A one-token model scores item i at the first decoder step by z_i = h . e_i + b_i. Some data repeat
(Yelp: 6.7% of test items are already in the user's history, and ranking the history by recency alone
scores test NDCG@10 .041 there); other data never do (Amazon Beauty). Neither is easy for z alone: the
item's output vector must then be close to (or far from) the decoder state of every history that holds
it. The history bias adds, for every history item at encoder position j,

    s_j = recency[r_j] + (W_q h) . (W_k m_j) / sqrt(C)

to that item's logit (summed over its occurrences): r_j counts the items after j (0 = most recent),
m_j is the encoder state of its piece (a pointer score, as in pointer-generator and RepeatNet). Both
terms start at ~0, so the model starts as one without the bias, and learns to raise repeats (Yelp) or
to lower them (data without repeats) from the training targets.

`offsets` (B, S) is the bias at each encoder position (0 off the history items); `biased_logits` adds
it to full logits (B, V): the definition the tests hold the fast paths to. Training fuses it into the
head + loss (`loss.linear_cross_entropy(offsets=...)`), decoding ranks through `item_topk(..., history=...)`;
neither writes (users x catalog) logits.

Items as collaborative codes with the leaf head (L tokens: cluster levels, then the item in its leaf) get
the same bias at every step t, from that step's decoder state h_t: it lands on a history item's t-th
token in the rows whose tokens so far are the item's first t (`code_offsets`), so the cluster steps
raise or lower the clusters that hold history items and the leaf step the items themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class HistoryBias(nn.Module):
    def __init__(self, d_model: int, max_items: int):
        super().__init__()
        self.query, self.key = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.recency = nn.Parameter(torch.zeros(max_items))  # (R,) by items after this one; the last is shared

    def offsets(self, hidden: torch.Tensor, memory: torch.Tensor, item_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, C) first decoder states, memory (B, S, C), item_ids (B, S) (0 = no item), mask (B, S)
        -> offsets (B, S): s_j at the history items' pieces, 0 elsewhere."""
        return self.score(hidden[:, None], self.state(memory, item_ids, mask))[:, 0]

    def state(self, memory: torch.Tensor, item_ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        """What the offsets need of the encoder, once per user: -> keys (B, S, C) W_k m_j, recency terms
        (B, S), and which positions are history items (B, S) bool."""
        is_item = (item_ids > 0) & mask  # (B, S)
        after = is_item.flip(1).cumsum(1).flip(1) - 1  # (B, S) items after position j
        return self.key(memory), self.recency[after.clamp(0, len(self.recency) - 1)], is_item

    def score(self, hidden: torch.Tensor, state: tuple) -> torch.Tensor:
        """hidden (B, W, C): W decoder states per user (its beams) -> offsets (B, W, S), 0 off the history."""
        keys, recency, is_item = state
        q = self.query(hidden)  # (B, W, C)
        score = torch.einsum("bwc,bsc->bws", q, keys) / math.sqrt(q.shape[-1])  # (B, W, S)
        return (score + recency[:, None]).masked_fill(~is_item[:, None], 0.0)

    def score_at(self, hidden: torch.Tensor, state: tuple, users: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`score`'s entries at K (row, position) pairs: hidden (K, C) the rows' states, users (K,) their users,
        positions (K,) history positions -> (K,), without the (B, W, S) scores."""
        keys, recency, is_item = state
        q = self.query(hidden)  # (K, C)
        score = (q * keys[users, positions]).sum(-1) / math.sqrt(q.shape[-1])  # (K,)
        return (score + recency[users, positions]).masked_fill(~is_item[users, positions], 0.0)


def biased_logits(logits: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """logits (B, V) + each position's offset (B, S) on its token (B, S), summed over repeats -> (B, V).
    Positions off the history carry 0, so their tokens (PAD, mask, EOS, user pieces) are unchanged."""
    return logits.scatter_add(1, tokens, offsets.to(logits.dtype))


def code_offsets(values: torch.Tensor, codes: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items of several tokens (codes): at step t a history item's offset goes to its t-th token, in the rows
    whose first t tokens are the item's. values (B, W, S) offsets of W rows per user, codes (B, S, L) the
    tokens of each position's item (-1 off the history), prefix (B, W, t) the rows' tokens so far ->
    tokens (B, 1, S) (0 where no item; the same for a user's W rows) and values (B, W, S) (0 where the prefix
    differs): `add_offsets`' per-user form."""
    t = prefix.shape[-1]
    own = codes[:, None, :, t]  # (B, 1, S)
    match = (codes[:, None, :, :t] == prefix[:, :, None, :]).all(-1) & (own >= 0)  # (B, W, S)
    return own.clamp(min=0), values * match


def add_offsets(z: torch.Tensor, offsets: tuple, first: int | None = None) -> torch.Tensor:
    """z (R, X) + offset values on the columns of their tokens, summed over repeats. offsets: (tokens (R, S), values
    (R, S)); or per user (`code_offsets`): (tokens (U, 1, S), the same for each of a user's W rows, values (U, W, S)),
    R = U x W user-major (the tokens never copied W times); or K entries (rows (K,), tokens (K,), values (K,))
    (`GenRec._step_offsets` after the first code step: only the pairs that match their row). first: the token of
    column 0 (a leaf head's slots); columns tokens - first, clamped into [0, X) (values there must be 0); None: the
    columns are the tokens."""
    *rows, tokens, values = offsets
    if first is not None:
        tokens = (tokens - first).clamp(0, z.shape[-1] - 1)
    if rows:
        return z.index_put((rows[0], tokens), values.to(z.dtype), accumulate=True)
    if values.dim() == 2:
        return z.scatter_add(1, tokens, values.to(z.dtype))
    U, W, S = values.shape
    return z.view(U, W, -1).scatter_add(2, tokens.expand(U, W, S), values.to(z.dtype)).view(z.shape)


def history_items(item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S) item index of each encoder position, -1 off the history items."""
    return torch.where((item_ids > 0) & mask, item_ids - 1, -1)
