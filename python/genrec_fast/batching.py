"""Padding encoded inputs into batches (right padding, so key lengths describe the padding)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .tokenizer import PAD_ID, Encoded


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
