"""Every next-item target of a sequence in one encoder pass, for models with a causal encoder.

Finetuning asks, for each prefix s_1..s_t of a window, for s_{t+1} from the input
`s_1 .. s_t <mask> EOS`. With a causal encoder the pieces of s_1..s_t do not depend on what follows,
so one packed row serves all T prefixes:

    encoder:  [user pieces] s_1 .. s_T  <mask>_1 EOS_1  <mask>_2 EOS_2 ... <mask>_T EOS_T
    decoder:  [BOS s_2 ..] [BOS s_3 ..] ... [BOS s_{T+1} ..]   (one group per target, labels = pieces + EOS)

Masks give each `<mask>_t EOS_t` pair and each decoder group exactly the keys the single-prefix input
would have, so with `encoder_positions="start"` every target's logits equal those of its own input
(tests/test_prefix_batch.py). With `"end"` positions the shared pieces are numbered back from the end
of the whole window (as SASRec does), so only the last prefix matches its own input exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, GenRecTokenizer


@dataclass
class Packed:
    """One window's packed encoder (L pieces) and decoder (D pieces) rows with their masks."""

    tokens: np.ndarray  # (L,) encoder pieces
    user_ids: np.ndarray  # (L,)
    item_ids: np.ndarray  # (L,)
    positions: np.ndarray  # (L,)
    enc_allow: np.ndarray  # (L, L) bool, True = query row may attend to key column
    dec_in: np.ndarray  # (D,) decoder inputs
    dec_positions: np.ndarray  # (D,) position within each target's group
    labels: np.ndarray  # (D,)
    self_allow: np.ndarray  # (D, D) bool
    cross_allow: np.ndarray  # (D, L) bool


def pack(tokenizer: GenRecTokenizer, items: Sequence[int], user: int | None = None,
         positions: str = "start") -> Packed:
    """A window of T + 1 item indices (T >= 1 targets: items[1:]) and an optional user index."""
    items = np.asarray(items, dtype=np.int64)
    if len(items) < 2:
        raise ValueError(f"items: a window needs at least 2 items (a context and a target), got {len(items)}")
    T = len(items) - 1
    user_p = tokenizer.user_pieces(user) if user is not None else np.zeros(0, np.int64)
    ctx = [tokenizer.input_pieces[i] for i in items[:T]]
    ends = len(user_p) + np.cumsum([len(p) for p in ctx])  # (T,) c_t: context pieces of prefix t
    cT = int(ends[-1])
    L = cT + 2 * T
    tokens = np.concatenate([user_p, *ctx, np.tile([tokenizer.mask_id, EOS_ID], T)]).astype(np.int64)
    user_ids = np.zeros(L, np.int64)
    user_ids[:len(user_p)] = 0 if user is None else user + 1
    item_ids = np.zeros(L, np.int64)
    item_ids[len(user_p):cT] = np.repeat(items[:T] + 1, [len(p) for p in ctx])
    mask_at = cT + 2 * np.arange(T)  # (T,) index of <mask>_t; EOS_t follows it

    # A query sees keys before its prefix end: itself and earlier pieces inside the context,
    # the prefix's context for <mask>_t / EOS_t, plus <mask>_t (and EOS_t for EOS_t itself).
    ends_q = np.concatenate([np.arange(1, cT + 1), np.repeat(ends, 2)])  # (L,)
    enc_allow = np.arange(L)[None, :] < ends_q[:, None]
    enc_allow[mask_at, mask_at] = enc_allow[mask_at + 1, mask_at] = enc_allow[mask_at + 1, mask_at + 1] = True

    if positions == "start":
        pos = np.concatenate([np.arange(cT), np.stack([ends, ends + 1], 1).reshape(-1)])
    elif positions == "end":  # counted back from the whole window's EOS (prefix T's input)
        back = cT - ends  # how far each prefix ends before the window's end
        pos = np.concatenate([cT + 1 - np.arange(cT), np.stack([back + 1, back], 1).reshape(-1)])
    else:
        raise ValueError(f"positions: expected 'start' or 'end', got {positions!r}")

    groups = [tokenizer.target(int(i)) for i in items[1:]]  # per target: pieces + EOS
    sizes = np.array([len(g) for g in groups])
    labels = np.concatenate(groups).astype(np.int64)
    dec_in = np.concatenate([np.append(BOS_ID, g[:-1]) for g in groups]).astype(np.int64)
    group = np.repeat(np.arange(T), sizes)  # (D,) target of each decoder piece
    dec_pos = np.concatenate([np.arange(n) for n in sizes])
    D = len(labels)
    self_allow = (group[:, None] == group[None, :]) & (np.arange(D)[None, :] <= np.arange(D)[:, None])
    cross_allow = np.arange(L)[None, :] < ends[group][:, None]
    cross_allow[np.arange(D), mask_at[group]] = cross_allow[np.arange(D), mask_at[group] + 1] = True
    return Packed(tokens, user_ids, item_ids, pos, enc_allow, dec_in, dec_pos, labels, self_allow, cross_allow)


def pad_packed(batch: Sequence[Packed], ignore: int = -100, device: torch.device | str = "cpu") -> tuple[dict, torch.Tensor]:
    """-> keyword arguments of `GenRec.forward` and labels (B, D). Padding rows attend to themselves
    (an all-False mask row would give NaN) and their labels are `ignore`."""
    B, L, D = len(batch), max(len(p.tokens) for p in batch), max(len(p.labels) for p in batch)
    tokens = np.full((B, L), PAD_ID, np.int64)
    user_ids, item_ids, pos = (np.zeros((B, L), np.int64) for _ in range(3))
    mask = np.zeros((B, L), bool)
    enc_allow = np.broadcast_to(np.eye(L, dtype=bool), (B, L, L)).copy()
    dec_in = np.full((B, D), PAD_ID, np.int64)
    dec_pos = np.zeros((B, D), np.int64)
    labels = np.full((B, D), ignore, np.int64)
    self_allow = np.broadcast_to(np.eye(D, dtype=bool), (B, D, D)).copy()
    cross_allow = np.zeros((B, D, L), bool)
    cross_allow[:, :, 0] = True
    for b, p in enumerate(batch):
        n, d = len(p.tokens), len(p.labels)
        tokens[b, :n], user_ids[b, :n], item_ids[b, :n], pos[b, :n] = p.tokens, p.user_ids, p.item_ids, p.positions
        mask[b, :n] = True
        enc_allow[b, :n, :n] = p.enc_allow
        dec_in[b, :d], dec_pos[b, :d], labels[b, :d] = p.dec_in, p.dec_positions, p.labels
        self_allow[b, :d, :d] = p.self_allow
        cross_allow[b, :d, :n] = p.cross_allow

    def t(x):
        return torch.from_numpy(x).to(device)
    kwargs = dict(tokens=t(tokens), user_ids=t(user_ids), item_ids=t(item_ids), mask=t(mask),
                  decoder_tokens=t(dec_in), attn_mask=t(enc_allow)[:, None], positions=t(pos),
                  decoder_self_mask=t(self_allow)[:, None], cross_mask=t(cross_allow)[:, None],
                  decoder_positions=t(dec_pos))  # masks (B, 1, Q, K)
    return kwargs, t(labels)
