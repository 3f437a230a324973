"""Padding encoded inputs into batches (right padding, so key lengths describe the padding)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .tokenizer import EOS_ID, PAD_ID, Encoded, GenRecTokenizer, check_mask_at


def pad_encoder(batch: Sequence[Encoded], device: torch.device | str = "cpu") -> dict:
    """-> tokens, user_ids, item_ids (B, S) int64 and mask (B, S) bool (True = real piece)."""
    S = max(len(e.tokens) for e in batch)
    out = {name: np.zeros((len(batch), S), dtype=np.int64) for name in ("tokens", "user_ids", "item_ids")}
    out["tokens"][:] = PAD_ID
    mask = np.zeros((len(batch), S), dtype=bool)
    for b, e in enumerate(batch):
        n = len(e.tokens)
        out["tokens"][b, :n], out["user_ids"][b, :n], out["item_ids"][b, :n] = e.tokens, e.user_ids, e.item_ids
        mask[b, :n] = True
    res = {k: torch.from_numpy(v).to(device) for k, v in out.items()}
    res["mask"] = torch.from_numpy(mask).to(device)
    return res


def encode_padded(tokenizer: GenRecTokenizer, histories: Sequence[np.ndarray], users: Sequence[int | None],
                  mask_ats: Sequence[int | None], max_len: int | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """`pad_encoder([tokenizer.encode(h, u, m, max_len) ...])`, built directly when items are whole tokens.

    -> tokens, user_ids, item_ids (B, S) int64 and mask (B, S) bool, the same arrays and errors as that
    reference. The training batch's hot path: one slice copy per row instead of a Python loop over the
    items (the reference spends ~23 us per example, ~7% of a one-thread training step of 128).
    """
    if tokenizer.item_tokens != "whole":
        return pad_encoder([tokenizer.encode(h, u, m, max_len) for h, u, m in zip(histories, users, mask_ats)],
                           device)
    B = len(histories)
    rows = []  # (user pieces, first kept item, kept length incl. <mask>)
    for h, u, m in zip(histories, users, mask_ats):
        check_mask_at(h, m)
        up = tokenizer.user_pieces(u) if u is not None else None
        n_user = 0 if up is None else len(up)
        n_body = len(h) + (m is None)  # items plus the <mask> that follows the history
        start = 0
        if max_len is not None:  # _keep_recent with one piece per entry
            budget = max_len - 1 - n_user
            start = max(0, min(n_body - budget, n_body - min(2, n_body), n_body if m is None else m))
            if n_body - start > budget:
                raise ValueError(f"max_len: {budget} pieces cannot hold the mask and the most recent item")
        rows.append((up, start, n_body - start))
    S = max((0 if up is None else len(up)) + n + 1 for up, _, n in rows)
    special = np.full((B, S), PAD_ID, dtype=np.int64)  # tokens that are no item: pad, user pieces, mask, EOS
    item_ids = np.zeros((B, S), dtype=np.int64)
    user_ids = np.zeros((B, S), dtype=np.int64)
    mask = np.zeros((B, S), dtype=bool)
    for b, ((up, start, n), h, u, m) in enumerate(zip(rows, histories, users, mask_ats)):
        o = 0
        if up is not None:
            o = len(up)
            special[b, :o], user_ids[b, :o] = up, u + 1
        kept = np.asarray(h[start:], dtype=np.int64)
        item_ids[b, o:o + len(kept)] = kept + 1
        at = o + (len(kept) if m is None else m - start)  # where <mask> sits
        item_ids[b, at] = 0
        special[b, at], special[b, o + n] = tokenizer.mask_id, EOS_ID
        mask[b, :o + n + 1] = True
    first_item = tokenizer.sp.get_piece_size()  # whole item tokens: item i is token first_item + i
    tokens = np.where(item_ids > 0, first_item + item_ids - 1, special)
    res = {k: torch.from_numpy(v).to(device) for k, v in
           (("tokens", tokens), ("user_ids", user_ids), ("item_ids", item_ids))}
    res["mask"] = torch.from_numpy(mask).to(device)
    return res


def pad_targets(targets: Sequence[np.ndarray], bos_id: int, ignore: int = -100,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (pieces + EOS) -> decoder inputs [BOS, pieces] (B, T) and labels (B, T), padding = ignore."""
    T = max(len(t) for t in targets)
    inputs = np.full((len(targets), T), PAD_ID, dtype=np.int64)
    labels = np.full((len(targets), T), ignore, dtype=np.int64)
    for b, t in enumerate(targets):
        labels[b, :len(t)] = t
        inputs[b, 0] = bos_id
        inputs[b, 1:len(t)] = t[:-1]
    return torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device)


ROW_LOOP_MAX = 32  # encode_histories: rows below which encode_padded's per-row loop is faster (benchmarks/README.md)


def encode_histories(tokenizer: GenRecTokenizer, histories: Sequence[np.ndarray], users: Sequence[int | None],
                     max_items: int, max_len: int, device: torch.device | str = "cpu") -> dict:
    """Serving input of B histories (item indices, oldest first) with `<mask>` after the history:
    `pad_encoder([tokenizer.encode(h[-max_items:], u, max_len=max_len) ...])` (the reference, tested)
    built with array operations over all items of the batch, for either item form.

    -> tokens, user_ids, item_ids (B, S) int64 and mask (B, S) bool. Each row is
    [user pieces] [pieces of the kept items] <mask> EOS, the oldest items dropped until it fits max_len
    (the most recent item always stays; ValueError if even that does not fit).
    Up to `ROW_LOOP_MAX` rows of one-token items take `encode_padded`'s loop instead (the same arrays):
    a request of one user in ~20 us instead of the array operations' ~90.
    """
    B = len(histories)
    if tokenizer.item_tokens == "whole" and B <= ROW_LOOP_MAX:
        return encode_padded(tokenizer, [h[len(h) - min(len(h), max_items):] for h in histories], users,
                             [None] * B, max_len, device)
    lens = np.array([min(len(h), max_items) for h in histories], dtype=np.int64)  # (B,) items kept per row
    items = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(h, np.int64)[len(h) - n:]
                                                      for h, n in zip(histories, lens)])  # (N,)
    row = np.repeat(np.arange(B), lens)  # (N,)
    user_p = [np.zeros(0, np.int64) if u is None else tokenizer.user_pieces(u) for u in users]
    n_user = np.array([len(p) for p in user_p], dtype=np.int64)  # (B,)
    offsets, flat = tokenizer.input_offsets, tokenizer.input_flat
    plen = offsets[items + 1] - offsets[items]  # (N,) pieces per item
    end = np.cumsum(plen)  # (N,) pieces up to and including each item, over the whole batch
    row_end = np.zeros(B, np.int64)
    row_end[lens > 0] = end[np.cumsum(lens)[lens > 0] - 1]
    suffix = row_end[row] - end + plen  # (N,) pieces from each item to the end of its row
    budget = max_len - 1 - n_user  # (B,) pieces for the items and <mask> (1 is the closing EOS)
    last = np.arange(len(items)) == np.repeat(np.cumsum(lens) - 1, lens)  # (N,) most recent item of its row
    keep = (suffix + 1 <= budget[row]) | last
    used = np.bincount(row[keep], weights=plen[keep], minlength=B).astype(np.int64)  # (B,) item pieces kept
    if np.any(used + 1 > budget):
        b = int(np.flatnonzero(used + 1 > budget)[0])
        raise ValueError(f"max_len: {budget[b]} pieces cannot hold the mask and the most recent item (row {b})")
    items, row, plen = items[keep], row[keep], plen[keep]
    S = int((n_user + used + 2).max()) if B else 0
    tokens = np.full((B, S), PAD_ID, dtype=np.int64)
    user_ids = np.zeros((B, S), dtype=np.int64)
    item_ids = np.zeros((B, S), dtype=np.int64)
    for b in np.flatnonzero(n_user):  # user pieces: a handful of rows at most per request batch
        tokens[b, :n_user[b]], user_ids[b, :n_user[b]] = user_p[b], users[b] + 1
    first_piece = np.cumsum(plen) - plen  # (N',) index of each kept item's first piece in the batch
    row_first = np.full(B, -1, np.int64)
    row_first[row[::-1]] = first_piece[::-1]  # smallest first_piece per row
    p_item = np.repeat(np.arange(len(items)), plen)  # (P,) kept item of each piece
    within = np.arange(len(p_item)) - first_piece[p_item]  # (P,) piece index inside its item
    p_row = row[p_item]
    col = n_user[p_row] + first_piece[p_item] - row_first[p_row] + within
    tokens[p_row, col] = flat[offsets[items[p_item]] + within]
    item_ids[p_row, col] = items[p_item] + 1
    mask_col = n_user + used
    tokens[np.arange(B), mask_col] = tokenizer.mask_id
    tokens[np.arange(B), mask_col + 1] = EOS_ID
    mask = np.arange(S)[None, :] < (mask_col + 2)[:, None]
    out = {k: torch.from_numpy(v).to(device) for k, v in
           (("tokens", tokens), ("user_ids", user_ids), ("item_ids", item_ids))}
    out["mask"] = torch.from_numpy(mask).to(device)
    return out
