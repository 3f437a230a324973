"""Decoding a GenRec model: one-step top-k for one-token items, else trie-constrained beam search.

`item_decode`: items of one token and no EOS step: encoder, one decoder step, then the LM head and
the top-k in chunks of the catalog (item_topk.py), never a (users x vocabulary) matrix.

`beam_decode`: encoder once per user, then one step per piece.

The search's rows are active users x `search.width` slots, and each user's live beams fill its first
slots (docs/beam_search_spec.md). The decoder only runs the first `width` slots of every user, `width`
= the most live beams any user has: e.g. while all items share their first piece, one row per user
instead of `num_beams`. The log-probabilities of the other (dead) slots are never read.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .beam_search import Trie, make_beam_search
from .ensemble import Ensemble
from .first_step import chosen as use_first_step, first_step
from .first_step import decoder_step as native_decoder_step, encode as native_encode, pointers as native_pointers
from .item_topk import DEFAULT_CHUNK, Head, item_topk
from .model import DecoderCache, GenRec


@torch.inference_mode()
def item_decode(model: GenRec | Ensemble, enc: dict, first_item: int, num_items: int, k: int, exclude=None,
                allow=None, chunk: int = DEFAULT_CHUNK, precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """enc: padded encoder batch of U users -> the best k items (U, k) int64 (-1 = none left) and their
    log-probabilities (U, k), for a model whose item i is the single token first_item + i with no EOS step.
    precision: the head's, as in `item_topk`.

    The same items and scores as `beam_decode` with num_beams >= k (tested), ties by smaller item index.
    """
    if model.cfg.item_eos:
        raise ValueError("item_decode: the model was trained with an EOS step after items (item_eos=True); "
                         "use beam_decode")
    heads, history = first_step_heads(model, enc)
    return item_topk(heads, first_item, num_items, k, exclude, allow, chunk, history=history, precision=precision)


@torch.inference_mode()
def first_step_heads(model: GenRec | Ensemble, enc: dict) -> tuple[list[Head], tuple | None]:
    """enc: padded encoder batch -> the first decoder step from BOS as one `Head` per member, and the bias pairs
    (`item_topk`'s history: items (U, P), -1 = none, and one (U, P) offset tensor per head), or None."""
    if use_first_step(model, enc):  # one C++ call: a CPU model, a batch small enough to gain (first_step.py)
        x, history = first_step(model, enc)
        return [Head(x, model.shared.weight, model.final_logits_bias[0])], history
    memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    heads = model.first_heads(memory, enc["mask"])
    # the history and transition biases: offsets on the users' own items and their successors
    return heads, model.bias_pairs(heads, memory, enc["item_ids"], enc["mask"])


@torch.inference_mode()
def beam_decode(model: GenRec | Ensemble, trie: Trie, enc: dict, k: int, num_beams: int = 20, exclude=None, allow=None,
                length_penalty: float = 0.0, backend: str = "auto", timings: dict | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """enc: padded encoder batch of U users -> items (U, k) int64 item indices (-1 = none), scores (U, k).

    timings: optional dict; seconds spent in the trie search's `step` accumulate in timings["search_step"].
    A model trained without EOS (`model.cfg.item_eos` False) needs items of one length L (one token each,
    or collaborative codes): the decoder runs L steps, and EOS, the only token the trie allows after an
    item, adds log 1 = 0 to the item's score.
    """
    if (model.history is not None or model.transition is not None) and not model.cfg.leaf_head:
        raise ValueError(f"beam_decode (backend={backend!r}): a model with model.history_bias or "
                         "model.transition_bias (the recommended configuration) ranks its one-token items in one "
                         "decoder step, which only item_decode runs: recommend's backend='auto' (without a length "
                         "penalty); the trie searches are for items of several tokens")
    if backend == "device":  # the search as device tensors (device_search.py): no host copy per step
        from .device_search import device_beam_decode
        return device_beam_decode(model, trie, enc, k, num_beams, exclude=exclude, allow=allow,
                                  length_penalty=length_penalty, stop_early=True)
    model_steps = decoder_steps(model, trie, "beam_decode")
    U = enc["tokens"].shape[0]
    # (U, S, C), or one such tensor per member for an Ensemble; one C++ call for a CPU model (first_step.py)
    native = use_first_step(model, enc, encoder_only=True)
    if native:  # the encoder and each step's decoder layers as one C++ call each, the weights' pointers read once
        table = native_pointers(model)
        memory = native_encode(model, enc, table=table)
    else:
        memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    cache = model.start_decoding(memory, enc["mask"], enc["item_ids"])
    if native:
        cache.native_step = lambda m, tokens, c: native_decoder_step(m, tokens, c, table=table)
    cache.capacity = trie.max_depth  # the longest decode: the K/V buffers never regrow
    search = make_beam_search(trie, U, num_beams, k, length_penalty=length_penalty, exclude=exclude,
                              allow=allow, backend=backend, threads=torch.get_num_threads())
    device = enc["tokens"].device
    active = np.asarray(search.active_users())
    if len(active) < U:  # users with no allowed item are done before the first step
        cache.reorder(None, torch.as_tensor(active, device=device))
    tokens = torch.full((len(active),), model.cfg.bos_id, dtype=torch.long, device=device)
    width = 1  # decoder rows per active user
    step = 0
    while not search.done():
        slots = search.width  # the search's rows per active user
        lo, hi = trie.window(step)  # the only tokens this step can extend a beam by
        if step < model_steps:
            logprobs = model.decode_logprobs(tokens, cache, lo, hi)  # (len(active) * width, hi - lo)
        else:  # after an item only EOS is allowed, and the model counts it as certain
            logprobs = torch.zeros(len(active) * width, hi - lo, device=device)
        step += 1
        logprobs = _all_slots(logprobs, len(active), width, slots)  # (len(active) * slots, hi - lo)
        parent, next_tokens = _timed_step(search, logprobs.cpu().numpy(), lo, timings)
        if search.done():
            break
        now = np.asarray(search.active_users())
        new_width = _live_width(next_tokens, len(now), num_beams, trie.eos_id)
        keep = _first_slots(len(now), num_beams, new_width)  # the search rows the decoder will run
        if step < model_steps:  # the decoder runs again: its rows follow the beams (else only EOS is left)
            rows = parent[keep] // slots * width + parent[keep] % slots  # their parents among the decoder rows
            _reorder(cache, rows, np.searchsorted(active, now), len(active) * width, device)
        tokens, active, width = torch.as_tensor(next_tokens[keep], device=device), now, new_width
    items, scores = search.results()
    return np.asarray(items), np.asarray(scores)


def decoder_steps(model, trie: Trie, caller: str) -> int:
    """Decoder steps of a search over `trie`: one per token and EOS, or, for a model trained without EOS,
    one per item token (EOS then counts as certain). ValueError if such a model meets items of several
    lengths: without EOS it cannot tell where an item ends."""
    if model.cfg.item_eos:
        return trie.max_depth  # depths count EOS
    if trie.min_depth != trie.max_depth:
        raise ValueError(f"{caller}: a model trained without EOS (item_eos=False) needs items of one length "
                         f"(one token each, or codes), got items of {trie.min_depth - 1} to "
                         f"{trie.max_depth - 1} tokens")
    return trie.max_depth - 1


def _all_slots(logprobs: torch.Tensor, users: int, width: int, slots: int) -> torch.Tensor:
    """(users * width, W) rows of the first `width` slots -> (users * slots, W); other slots are dead (zeros)."""
    if width == slots:
        return logprobs
    out = logprobs.new_zeros((users, slots, logprobs.shape[1]))
    out[:, :width] = logprobs.view(users, width, -1)
    return out.view(users * slots, -1)


def _timed_step(search, logprobs: np.ndarray, offset: int, timings: dict | None):
    if timings is None:
        return search.step(logprobs, offset)
    t0 = time.perf_counter()
    out = search.step(logprobs, offset)
    timings["search_step"] = timings.get("search_step", 0.0) + time.perf_counter() - t0
    return out


def _live_width(tokens: np.ndarray, users: int, num_beams: int, eos_id: int) -> int:
    """The most live beams of any user: live beams come first and never end in EOS, dead slots do."""
    return max(1, int((tokens.reshape(users, num_beams) != eos_id).sum(1).max()))


def _first_slots(users: int, num_beams: int, width: int) -> np.ndarray:
    """Row indices of slots 0..width-1 of every user, user-major: (users * width,)."""
    return (np.arange(users)[:, None] * num_beams + np.arange(width)).reshape(-1)


def _reorder(cache: DecoderCache, rows: np.ndarray, users: np.ndarray, old_rows: int, device) -> None:
    """New decoder row -> old decoder row `rows`; keeps only the users `users` (old positions); skips no-ops."""
    same_rows = len(rows) == old_rows and np.array_equal(rows, np.arange(old_rows))
    same_users = len(users) == len(cache.lengths)
    cache.reorder(None if same_rows else torch.as_tensor(rows, device=device),
                  None if same_users else torch.as_tensor(users, device=device))
