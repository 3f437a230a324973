"""Trie-constrained beam decoding of a GenRec model: encoder once per user, then one step per piece."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .beam_search import Trie, make_beam_search
from .model import GenRec


@torch.no_grad()
def beam_decode(model: GenRec, trie: Trie, enc: dict, k: int, num_beams: int = 20, exclude=None, allow=None,
                length_penalty: float = 0.0, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """enc: padded encoder batch of U users -> items (U, k) int64 item indices (-1 = none), scores (U, k)."""
    U = enc["tokens"].shape[0]
    memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])  # (U, S, C)
    cache = model.start_decoding(memory, enc["mask"])
    search = make_beam_search(trie, U, num_beams, k, length_penalty=length_penalty, exclude=exclude,
                              allow=allow, backend=backend)
    device = memory.device
    active = np.asarray(search.active_users())
    if len(active) < U:  # users with no allowed item are done before the first step
        cache.reorder(None, torch.as_tensor(active, device=device))
    tokens = torch.full((len(active),), model.cfg.bos_id, dtype=torch.long, device=device)
    while not search.done():
        logprobs = F.log_softmax(model.decode_step(tokens, cache).float(), dim=-1)  # (R, V)
        parent, next_tokens = search.step(logprobs.cpu().numpy())
        if search.done():
            break
        now = np.asarray(search.active_users())
        users = None if len(now) == len(active) else torch.as_tensor(np.searchsorted(active, now), device=device)
        cache.reorder(torch.as_tensor(parent, device=device), users)
        tokens, active = torch.as_tensor(next_tokens, device=device), now
    items, scores = search.results()
    return np.asarray(items), np.asarray(scores)
