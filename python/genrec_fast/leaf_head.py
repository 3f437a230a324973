"""Item-specific last code level (`model.leaf_head`): the unique-making last token of a collaborative code
is scored with the item's own vector, over the items of its leaf only.

With codes (collab_codes.py) an item is L tokens: L - 1 cluster levels, then its index inside its leaf.
Scored as a plain token, that index's output vector is shared by every leaf (index 3 of one leaf has
nothing to do with index 3 of another), so the last step must tell a leaf's items apart from the
decoder state alone. The leaf head replaces the last step's LM head by a softmax over the leaf's items
whose logits are `h . e_item`, e_item the item's ID embedding (the table the encoder adds to the item's
input: tied in and out, as SASRec ties its item table). The item's probability is then a hierarchical
softmax: P(c_1) ... P(c_{L-1} | c_<L-1) P(item | leaf).

The last step's logits keep the token layout the trie search reads: leaf-local index j is still token
`first[-1] + j`; tokens outside the leaf (and empty leaf slots) get -inf. The leaf of a decoder row
is a mixed-radix key of the cluster tokens it was fed, carried in `DecoderCache.leaf_key`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .history_bias import add_offsets
from .native import core

NEG_INF = float("-inf")
LEAF_GROUP = 16  # rows of the leaf-blocked copy stored transposed together (csrc/leaf_scores.h: kLeafGroup)


def table_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`table[index]`, (*index.shape, *table.shape[1:]), as one index_select: 3-6x PyTorch's advanced indexing on a
    CPU (a million items' codes at 76,800 rows: 1.6 -> 0.5 ms; the leaf table at 5,120 rows: 0.7 -> 0.12 ms)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def leaf_scores_reference(item_weight: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor,
                          sparse: bool = False) -> torch.Tensor:
    """The definition: item_weight (n_items + 1, C), slots (R, M) item index + 1 (0 = empty), hidden (R, C) ->
    (R, M) `h . e_item`, -inf at empty slots. Differentiable; `sparse`: item_weight's gradient as a sparse
    tensor of the gathered rows (`train.sparse_tables`), else dense."""
    # an embedding lookup is an index_select: ~2x faster than item_weight[slots] on CPU (a million-item table,
    # 5,120 rows of ~95)
    vectors = F.embedding(slots, item_weight, sparse=sparse)  # (R, M, C)
    z = torch.bmm(vectors, hidden[:, :, None].to(item_weight.dtype))[:, :, 0]  # (R, M)
    return z.masked_fill(slots == 0, NEG_INF)


def _native(item_weight: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether the C++ core scores: without autograd, on float32 CPU tensors."""
    return (not torch.is_grad_enabled() and item_weight.device.type == "cpu" and hidden.device.type == "cpu"
            and item_weight.dtype == hidden.dtype == torch.float32)


def _blocked(weight: torch.Tensor, order: torch.Tensor, rows_per_part: int = 1 << 16) -> torch.Tensor:
    """weight (n, C)'s rows `order` (R,) (R a multiple of LEAF_GROUP) -> (R / 16, C, 16), row j at [j // 16, :, j % 16],
    gathered a part at a time: the only whole-size tensor is the result (at ten million items one 2.6 GB
    table, not three)."""
    out = weight.new_empty((len(order) // LEAF_GROUP, weight.shape[1], LEAF_GROUP))
    for s in range(0, len(order), rows_per_part):
        part = weight.index_select(0, order[s:s + rows_per_part])  # (P, C)
        out[s // LEAF_GROUP:(s + len(part)) // LEAF_GROUP] = part.view(-1, LEAF_GROUP, part.shape[1]).transpose(1, 2)
    return out


def leaf_scores(item_weight: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor,
                sparse: bool = False) -> torch.Tensor:
    """`leaf_scores_reference`; without autograd on float32 CPU tensors, the C++ core's gather-and-dot
    (`_core.leaf_scores`: never writes the (R, M, C) gathered vectors)."""
    if not _native(item_weight, hidden):
        return leaf_scores_reference(item_weight, slots, hidden, sparse)
    return _leaf_scores_native(item_weight, slots, hidden)


def _leaf_scores_native(weight: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor,
                        starts: torch.Tensor | None = None) -> torch.Tensor:
    """`_core.leaf_scores`: slots (R, M), hidden (R, C) -> (R, M). starts (R,): weight is the leaf-blocked copy
    (`LeafHead.ordered`) and slot m of row r reads its row starts[r] + m."""
    w, s, h = weight.detach().contiguous(), slots.contiguous(), hidden.detach().contiguous()
    at = None if starts is None else starts.contiguous()
    out = torch.empty(s.shape, dtype=torch.float32)
    rows, dim = (w.shape[0], w.shape[1]) if at is None else (w.shape[0] * w.shape[2], w.shape[1])
    core().leaf_scores(w.data_ptr(), rows, dim, s.data_ptr(), 0 if at is None else at.data_ptr(),
                       h.data_ptr(), s.shape[0], s.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


class LeafHead(nn.Module):
    """The leaves of a code table (n_items, L): the items of every cluster prefix, by leaf-local index.

    Its tables are buffers outside the state dict (derived from the tokenizer's code table, which the
    checkpoint stores): they follow the model's `.to(device)` and never enter a checkpoint.

    Scoring without autograd on the CPU reads the items' vectors from a copy of the item table laid out leaf by
    leaf, in transposed groups of 16 (`ordered`): ~3x faster than rows scattered over a large table (1M items),
    for n_items x C more floats (~270 MB at 1M items, C 64). `leaf_order = False` reads the table in place."""

    leaf_order = True

    def __init__(self, code_table: np.ndarray, first_tokens: np.ndarray, vocab_size: int):
        super().__init__()
        table = np.asarray(code_table, dtype=np.int64)  # (n_items, L)
        if table.ndim != 2 or table.shape[1] < 2:
            raise ValueError(f"leaf_head: needs codes of >= 2 tokens (cluster levels, then the leaf index), got "
                             f"a table of shape {table.shape}")
        n, L = table.shape
        sizes = table.max(0) + 1 if n else np.ones(L, np.int64)  # (L,) values per column
        strides = np.ones(L - 1, np.int64)  # (L - 1,) mixed radix of the cluster columns, first column slowest
        for c in range(L - 3, -1, -1):
            strides[c] = strides[c + 1] * sizes[c + 1]
        n_keys = int(strides[0] * sizes[0])
        keys = table[:, :-1] @ strides  # (n_items,)
        items = np.zeros((n_keys, int(sizes[-1])), np.int64)  # (n_keys, M) item index + 1, 0 = empty slot
        items[keys, table[:, -1]] = np.arange(1, n + 1)
        filled = items > 0  # the leaf-blocked copy's layout (`ordered`): each leaf's slots up to its last item,
        # rounded up to whole groups of LEAF_GROUP
        length = np.where(filled.any(1), items.shape[1] - filled[:, ::-1].argmax(1), 0)  # (n_keys,)
        length = -(-length // LEAF_GROUP) * LEAF_GROUP
        starts = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)  # (n_keys,) copy row of slot 0
        padded = np.pad(items, ((0, 0), (0, max(0, int(length.max(initial=0)) - items.shape[1]))))
        order = padded[np.arange(padded.shape[1])[None, :] < length[:, None]]  # (sum(length),) item index + 1
        first = np.asarray(first_tokens, np.int64)  # (L,) first token of every column
        self.levels, self.vocab_size = L, vocab_size
        # Python ints for the per-step arithmetic: no device sync inside a decode step
        self.first, self.sizes, self.strides = first.tolist(), sizes.tolist(), strides.tolist()
        self.register_buffer("items", torch.as_tensor(items), persistent=False)  # (n_keys, M)
        codes = np.full((n + 1, L), -1, np.int64)  # (n_items + 1, L) every item id's tokens (0 = no item: -1)
        codes[1:] = table + first
        self.register_buffer("codes", torch.as_tensor(codes), persistent=False)
        self.register_buffer("starts", torch.as_tensor(starts), persistent=False)  # (n_keys,)
        self.register_buffer("order", torch.as_tensor(order), persistent=False)  # (rows of the ordered copy,)
        self._copy: tuple | None = None  # (the item table copied, its data pointer and version, the copy)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LeafHead":
        if tokenizer.item_tokens != "codes":
            raise ValueError(f"model.leaf_head: needs tokenizer.item_tokens='codes', got {tokenizer.item_tokens!r}")
        return cls(tokenizer.code_table, tokenizer.code_first, tokenizer.vocab_size)

    def train(self, mode: bool = True) -> "LeafHead":
        self._copy = None  # training changes the table; a fused optimizer's steps leave its version as it was
        return super().train(mode)

    def step_key(self, key: torch.Tensor | None, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """The running key after feeding `tokens` (R,) of cluster column `column` (key None before the first).
        Tokens outside their column are clamped (dead beams feed EOS: their key is any leaf, never read)."""
        v = (tokens - self.first[column]).clamp(0, self.sizes[column] - 1) * self.strides[column]
        return v if key is None else key + v

    def keys(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (N, L - 1) cluster tokens -> (N,) leaf keys: `step_key` over the columns."""
        key = None
        for column in range(self.levels - 1):
            key = self.step_key(key, prefix[:, column], column)
        return key

    def leaf_logits(self, hidden: torch.Tensor, key: torch.Tensor, item_weight: torch.Tensor,
                    sparse: bool = False) -> torch.Tensor:
        """hidden (R, C), key (R,), item_weight (n_items + 1, C) -> (R, M) logits of the leaf's slots, -inf
        for empty slots (`sparse` as in `leaf_scores_reference`)."""
        slots = table_rows(self.items, key)  # (R, M)
        if self.leaf_order and _native(item_weight, hidden):
            return _leaf_scores_native(self.ordered(item_weight), slots, hidden, self.starts[key])
        return leaf_scores(item_weight, slots, hidden, sparse)  # (R, M)

    def ordered(self, item_weight: torch.Tensor) -> torch.Tensor:
        """item_weight (n_items + 1, C)'s rows in leaf order, blocked: (rows / LEAF_GROUP, C, LEAF_GROUP), row
        j = starts[key] + m the item in slot m of leaf `key` (row 0, the padding item, at empty slots), stored
        at [j // LEAF_GROUP, :, j % LEAF_GROUP] (the C++ core scores a group in vector lanes). Copied again after
        `train()` / `eval()` and when the table is replaced or changed in place (its version counter:
        `load_state_dict`, EMA swaps). Weights changed with neither (a fused optimizer's step, which leaves no
        version, in eval mode; writes through `.data`) need a `model.eval()` before the next recommendation."""
        tag = (item_weight.data_ptr(), item_weight._version, item_weight.shape, item_weight.dtype)
        if self._copy is None or self._copy[0] is not item_weight or self._copy[1] != tag:
            self._copy = None  # the old copy's memory goes before the new one is made
            self._copy = (item_weight, tag, _blocked(item_weight.detach(), self.order))
        return self._copy[2]

    def vocab_logits(self, hidden: torch.Tensor, key: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
        """The last step's logits in the token layout: (R, V), the leaf slots at the last column's tokens,
        -inf everywhere else (log_softmax of it = the leaf softmax)."""
        z = self.leaf_logits(hidden, key, item_weight)  # (R, M)
        out = z.new_full((z.shape[0], self.vocab_size), NEG_INF)
        out[:, self.first[-1]:self.first[-1] + z.shape[1]] = z
        return out

    def window_logprobs(self, hidden: torch.Tensor, key: torch.Tensor, item_weight: torch.Tensor, lo: int = 0,
                        hi: int | None = None, offsets: tuple | None = None) -> torch.Tensor:
        """`log_softmax(vocab_logits(...))[:, lo:hi]` without the (R, V) tensor: float32 (R, hi - lo), the leaf
        softmax's log-probabilities at the columns of their tokens inside [lo, hi), -inf elsewhere.
        offsets: (tokens, values) added to those tokens' logits first (`_offset`)."""
        z = self._offset(self.leaf_logits(hidden, key, item_weight).float(), offsets)  # (R, M)
        logp = F.log_softmax(z, dim=-1)  # (R, M)
        hi = self.vocab_size if hi is None else hi
        out = logp.new_full((logp.shape[0], hi - lo), NEG_INF)
        a, b = max(lo, self.first[-1]), min(hi, self.first[-1] + logp.shape[1])  # the leaf slots inside
        if a < b:
            out[:, a - lo:b - lo] = logp[:, a - self.first[-1]:b - self.first[-1]]
        return out

    def _offset(self, z: torch.Tensor, offsets: tuple | None) -> torch.Tensor:
        """Leaf logits z (R, M) + values at the leaf slots of last-column tokens, summed over repeats, offsets in
        any of `history_bias.add_offsets`' forms. A value must be 0 unless its token is in the row's leaf
        (`history_bias.code_offsets`)."""
        return z if offsets is None else add_offsets(z, offsets, first=self.first[-1])

    def loss_terms(self, hidden: torch.Tensor, prefix: torch.Tensor, target: torch.Tensor,
                   item_weight: torch.Tensor, smoothing: float, offsets: tuple | None = None,
                   sparse: bool = False) -> torch.Tensor:
        """Cross-entropy of the leaf softmax per target: hidden (N, C) at the last step, prefix (N, L - 1)
        its cluster tokens, target (N,) its last token -> (N,). Label smoothing spreads over the leaf's
        items (the classes the trie allows). offsets as in `window_logprobs`; `sparse`: item_weight's gradient
        as a sparse tensor (`leaf_scores_reference`)."""
        z = self._offset(self.leaf_logits(hidden, self.keys(prefix), item_weight, sparse), offsets)  # (N, M)
        y = (target - self.first[-1])[:, None]  # (N, 1) leaf-local index
        logp = F.log_softmax(z, dim=-1)
        nll = -logp.gather(1, y)[:, 0]
        if not smoothing:
            return nll
        valid = torch.isfinite(z)
        mean_nll = -logp.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1)  # (N,) mean over the leaf's items
        return (1 - smoothing) * nll + smoothing * mean_nll
