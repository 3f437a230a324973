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
        is_item = (item_ids > 0) & mask  # (B, S)
        after = is_item.flip(1).cumsum(1).flip(1) - 1  # (B, S) items after position j
        rank = after.clamp(0, len(self.recency) - 1)
        q = self.query(hidden)  # (B, C)
        score = torch.einsum("bc,bsc->bs", q, self.key(memory)) / math.sqrt(q.shape[-1])  # (B, S)
        return (score + self.recency[rank]).masked_fill(~is_item, 0.0)


def biased_logits(logits: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """logits (B, V) + each position's offset (B, S) on its token (B, S), summed over repeats -> (B, V).
    Positions off the history carry 0, so their tokens (PAD, mask, EOS, user pieces) are unchanged."""
    return logits.scatter_add(1, tokens, offsets.to(logits.dtype))


def history_items(item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S) item index of each encoder position, -1 off the history items."""
    return torch.where((item_ids > 0) & mask, item_ids - 1, -1)
