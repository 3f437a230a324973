"""Batched top-k recommendation from item histories, with original ids in and out."""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Hashable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from . import checkpoint
from .batching import encode_histories, pad_encoder
from .beam_search import Trie
from .config import ModelConfig, preset
from .data import NOT_ID_TYPES, Catalog, item_codes, resolve_id, short_ids
from .decoding import beam_decode, item_decode
from .device import check_device
from .ensemble import Ensemble, check_same_files
from .item_topk import PRECISIONS
from .model import GenRec
from .tokenizer import EOS_ID, Encoded, GenRecTokenizer

UNKNOWN_ITEMS = ("error", "skip")
BACKENDS = ("auto", "cpp", "reference", "device")


class Recommendations(NamedTuple):
    """One user's recommendations, as `recommend()` returns them."""

    items: list  # original item ids, best first
    scores: list  # higher is better: the model's log-probability of each item; for a `cascade.Cascade`,
    # (1 - weight) * log P_retriever(item) + weight * log P_ranker(item | candidates) (cascade.combine); for a
    # `hybrid.Hybrid`, (1 - weight) * log P_genrec(item | candidates) + weight * log P_sasrec(item | candidates)


class Recommender:
    """A trained model with its tokenizer, catalog and trie: what `load()` returns."""

    def __init__(self, model: GenRec | Ensemble, tokenizer: GenRecTokenizer, catalog: Catalog, max_items: int = 20,
                 use_users: bool = True, exclude_seen: bool = False):
        """use_users=False: the model was trained on histories only, so user ids are ignored.
        exclude_seen: the default of `recommend(exclude_seen=None)` (True for a model trained with
        `train.mask_seen`, which never learned to rank a history's own items low)."""
        self.model, self.tokenizer, self.catalog, self.max_items = model, tokenizer, catalog, max_items
        self.use_users, self.exclude_seen = use_users, exclude_seen
        self._precision = "float32"
        self.head_precision = os.environ.get("GENREC_HEAD_PRECISION", "float32")  # (the commands' --head-precision)
        for m in getattr(model, "members", [model]):  # leaf heads read the tokenizer's code table
            if m.cfg.leaf_head and m.leaves is None:
                m.attach_leaves(tokenizer)
        self._trie: Trie | None = None
        self._ids: np.ndarray | None = None  # catalog.item_ids as an object array, built on first use

    @property
    def head_precision(self) -> str:
        """One-token models' head: "float32" (the default unless GENREC_HEAD_PRECISION says otherwise) or
        "bfloat16": the table scanned in bfloat16 on CPUs with AVX512-BF16 from 131,072 items, the same items (proved
        per user) and log-probabilities within a small per-user shift (item_topk's `precision`; bf16_head.py)."""
        return self._precision

    @head_precision.setter
    def head_precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"head_precision (or GENREC_HEAD_PRECISION): expected one of {PRECISIONS}, got {value!r}")
        self._precision = value

    @property
    def trie(self) -> Trie:
        """The item trie of the beam search, built on first use (one-token models never need it)."""
        if self._trie is None:
            self._trie = Trie(self.tokenizer.item_flat, self.tokenizer.item_offsets, EOS_ID)
        return self._trie

    @property
    def one_step(self) -> bool:
        """Items are one token each and the model has no EOS step: recommend = one decoder step + top-k."""
        return self.tokenizer.item_tokens == "whole" and not self.model.cfg.item_eos

    @classmethod
    def random(cls, item_ids: Iterable[Hashable], config: ModelConfig | str = "small", vocab_size: int = 1000,
               n_users: int = 0, seed: int = 0, max_items: int = 20, item_tokens: str | None = None,
               code_levels: int = 2, code_branches: int = 32, code_input: str = "all") -> "Recommender":
        """A model with random weights over a catalog of item ids (for benchmarks and smoke tests).

        item_ids: distinct ids, at least one (any iterable, read once). config: a ModelConfig or a preset name.
        item_tokens: "pieces", "whole" or "codes"; None (the default) takes the preset's (`config.preset`: "whole"
          for "recommended", "codes" for "codes", "pieces" for the others), or "pieces" for a ModelConfig."""
        item_ids = _catalog_ids(item_ids)
        if item_tokens is None:
            item_tokens = preset(config).tokenizer.item_tokens if isinstance(config, str) else "pieces"
        cfg = preset(config).model if isinstance(config, str) else config
        codes = item_codes(item_ids, "random", seed)
        table = None
        if item_tokens == "codes":  # balanced codes of random directions: the shape of trained codes
            from .collab_codes import balanced_codes
            vectors = np.random.default_rng(seed).standard_normal((len(codes), 8)).astype(np.float32)
            table = balanced_codes(vectors, code_levels, code_branches)
        tokenizer = GenRecTokenizer.train([], codes, vocab_size, item_tokens, table, code_input)
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size, n_users=n_users, n_items=len(codes))
        torch.manual_seed(seed)
        catalog = Catalog(item_ids, codes, list(range(n_users)))
        return cls(GenRec(cfg).eval(), tokenizer, catalog, max_items)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, items: Sequence[int], user: int | None) -> Encoded:
        """Item indices (+ user index or None) -> encoder input, keeping the most recent items."""
        user = user if self.use_users else None
        return self.tokenizer.encode(items[-self.max_items:], user=user, max_len=self.model.cfg.max_positions)

    def encode_batch(self, histories: Sequence[np.ndarray], users: Sequence[int | None]) -> dict:
        """Item-index histories (+ user indices or None) -> the padded encoder batch (vectorised)."""
        users = users if self.use_users else [None] * len(histories)
        return encode_histories(self.tokenizer, histories, users, self.max_items, self.model.cfg.max_positions,
                                self.device)

    def decode(self, enc: dict, k: int, num_beams: int, exclude=None, allow=None, backend: str = "auto",
               length_penalty: float = 0.0):
        """Padded encoder batch -> item indices (B, k) (-1 = none) and log-probability scores (B, k).

        backend "auto": one decoder step + top-k for one-token models (`one_step`), else the C++ trie search;
        "cpp" / "reference": the C++ / Python trie beam search; "device": the trie search as tensors on the
        model's device (device_search.py; meant for GPUs, not yet measured on one). One-token models with the
        history or transition bias run only "auto" (a ValueError otherwise)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if self.model.training:  # (a trainer validating); eval() itself walks every module: ~0.5 ms
            self.model.eval()
        if backend == "auto" and self.one_step and length_penalty == 0.0:
            first = int(self.tokenizer.item_flat[0]) if len(self.tokenizer.item_flat) else 0
            return item_decode(self.model, enc, first, len(self.catalog.item_ids), k, exclude, allow,
                               precision=self._precision)
        return beam_decode(self.model, self.trie, enc, k, num_beams, exclude=exclude, allow=allow,
                           length_penalty=length_penalty, backend=backend)

    def decode_batch(self, encoded: Sequence[Encoded], k: int, num_beams: int, exclude=None, allow=None,
                     backend: str = "auto", length_penalty: float = 0.0):
        """`decode` of a list of `encode` outputs (padded here)."""
        return self.decode(pad_encoder(encoded, self.device), k, num_beams, exclude, allow, backend, length_penalty)

    def recommend(self, histories: Sequence[Sequence[Hashable]], k: int = 10, users: Sequence | None = None,
                  num_beams: int | None = None, exclude_seen: bool | None = None, allowed_items=None,
                  unknown_items: str = "error", batch_size: int = 256, backend: str = "auto",
                  ) -> list[Recommendations]:
        """Top-k distinct items per history (original ids), best first, with their scores.

        histories: one list of original item ids per request, oldest first; longer than the
          model's window keeps the most recent items. An id matches the catalog's as the CLI and the server
          match it (`data.resolve_id`): 5 finds a catalog's "5" and "5" its 5.
        users: optional original user ids (None entries allowed); an unknown user is served from
          the history alone (as is every user when the model was trained without user tokens).
        num_beams: beam width (default max(k, 20)); k <= num_beams.
        exclude_seen: never recommend an item of the request's own history (None: the model's default,
          True only for models trained with `train.mask_seen`).
        allowed_items: optional collection (list, set, range, array, ...) of original item ids that may be
          recommended; a string or a single id is a TypeError.
        unknown_items: 'error' (ValueError) or 'skip' (dropped with a warning) for ids not in the catalog.
        A bool or a float is no id (True would be read as 1, 79.0 as 79): a TypeError in histories, users and
          allowed_items.
        scores: see `Recommendations.scores`.
        """
        _check_args(histories, k, num_beams, users, exclude_seen, unknown_items, batch_size, backend)
        num_beams = max(k, 20) if num_beams is None else num_beams
        n_items = len(self.catalog.item_ids)  # more beams than items explore nothing more: the same results,
        k, num_beams = min(k, n_items), min(num_beams, n_items)  # without (k x beams) arrays for a huge k
        exclude_seen = self.exclude_seen if exclude_seen is None else bool(exclude_seen)
        idx = [self._history_indices(h, n, unknown_items) for n, h in enumerate(histories)]
        if users is not None:
            _check_ids_typed(users, "users", "user")
        uidx = [None] * len(idx) if users is None else [_index(self.catalog.user_index, u) for u in users]
        allow = self._allow_mask(allowed_items)
        out: list[Recommendations] = []
        for s in range(0, len(idx), batch_size):
            part = range(s, min(s + batch_size, len(idx)))
            exclude = [np.asarray(idx[i], dtype=np.int64) for i in part] if exclude_seen else None
            enc = self.encode_batch([idx[i] for i in part], [uidx[i] for i in part])
            items, scores = self.decode(enc, k, num_beams, exclude=exclude, allow=allow, backend=backend)
            out.extend(self._to_ids(items, scores))
        return out

    def _history_indices(self, history, n: int, unknown_items: str) -> list[int]:
        if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
            raise TypeError(f"histories[{n}]: expected a sequence of item ids, got {type(history).__name__}")
        history = list(history)
        if not history:
            raise ValueError(f"histories[{n}]: empty history; at least one item is needed")
        _check_ids_typed(history, f"histories[{n}]")
        index = self.catalog.item_index
        known = list(map(index.get, history))
        if None not in known:
            return known
        known = [_index(index, x) if i is None else i for x, i in zip(history, known)]
        if None not in known:
            return known
        bad = [x for x, i in zip(history, known) if i is None]
        if bad and unknown_items == "error":
            raise ValueError(f"histories[{n}]: unknown item ids {short_ids(bad)} (pass unknown_items='skip' to drop "
                             "them)")
        if bad:
            warnings.warn(f"histories[{n}]: skipped {len(bad)} unknown item ids {short_ids(bad)}",
                          stacklevel=_caller_stacklevel())
        kept = [i for i in known if i is not None]
        if not kept:
            raise ValueError(f"histories[{n}]: no known item left after skipping unknown ids")
        return kept

    def _allow_mask(self, allowed_items) -> np.ndarray | None:
        if allowed_items is None:
            return None
        if isinstance(allowed_items, (str, bytes)) or not hasattr(allowed_items, "__iter__"):
            raise TypeError(f"allowed_items: expected a collection of item ids (a list, set, ...), "
                            f"got {type(allowed_items).__name__} {allowed_items!r}")
        mask = np.zeros(len(self.catalog.item_ids), dtype=bool)
        allowed_items = list(allowed_items)
        _check_ids_typed(allowed_items, "allowed_items")
        rows = [_index(self.catalog.item_index, x) for x in allowed_items]
        unknown = [x for x, i in zip(allowed_items, rows) if i is None]
        if unknown:
            raise ValueError(f"allowed_items: unknown item ids {short_ids(unknown)}")
        mask[rows] = True
        return mask

    def _to_ids(self, items: np.ndarray, scores: np.ndarray) -> list[Recommendations]:
        """Item indices (B, k) (-1 = none, always at the end of a row) and scores -> original ids per row."""
        if self._ids is None:
            self._ids = np.empty(len(self.catalog.item_ids), dtype=object)
            self._ids[:] = self.catalog.item_ids
        ids, found = self._ids[np.maximum(items, 0)].tolist(), (items >= 0).sum(1).tolist()
        return [Recommendations(i[:n], s[:n]) for i, s, n in zip(ids, scores.tolist(), found)]


def _index(index: dict, x) -> int | None:
    """x's row in a catalog index (`Catalog.item_index` / `user_index`) as `data.resolve_id` spells it, or None."""
    i = index.get(x)
    if i is None:
        key = resolve_id(index, x)
        i = None if key is None else index[key]
    return i


def _check_ids_typed(ids: list, name: str, kind: str = "item") -> None:
    """TypeError naming `name` when ids holds a bool or a float (a dict finds True as the item 1, 79.0 as 79); one
    C-level pass."""
    if NOT_ID_TYPES.keys() & set(map(type, ids)):
        bad = next(x for x in ids if type(x) in NOT_ID_TYPES)
        raise TypeError(f"{name}: {bad!r} is {NOT_ID_TYPES[type(bad)]}, expected {kind} ids (ints or strings as "
                        "in the catalog)")


def _catalog_ids(item_ids) -> list:
    """`Recommender.random`'s item_ids as a list, read once; ValueError for an empty or repeated one."""
    if isinstance(item_ids, (str, bytes)) or not hasattr(item_ids, "__iter__"):
        raise TypeError(f"item_ids: expected a collection of item ids, got {type(item_ids).__name__}")
    ids = list(item_ids)
    if not ids:
        raise ValueError("item_ids: expected at least one item id, got none")
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise ValueError(f"item_ids: expected distinct ids, got {dup!r} more than once")
    return ids


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel, from the function calling this, of the first frame outside this module (the
    user's line, however many of this module's frames lie between: recommend(), Recommender.recommend, ...)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_args(histories, k, num_beams, users, exclude_seen, unknown_items, batch_size, backend) -> None:
    if isinstance(histories, (str, bytes)) or not hasattr(histories, "__len__"):
        raise TypeError("histories: expected a list of item-id lists")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if num_beams is not None and (not _is_int(num_beams) or num_beams < k):
        raise ValueError(f"num_beams: expected an integer >= k ({k}), got {num_beams!r}")
    if exclude_seen is not None and not isinstance(exclude_seen, (bool, np.bool_)):
        raise ValueError(f"exclude_seen: expected True, False or None, got {exclude_seen!r}")
    if users is not None and len(users) != len(histories):
        raise ValueError(f"users: expected {len(histories)} entries (one per history), got {len(users)}")
    if unknown_items not in UNKNOWN_ITEMS:
        raise ValueError(f"unknown_items: expected one of {UNKNOWN_ITEMS}, got {unknown_items!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def load(path: str | Path | Sequence[str | Path], device: str | torch.device = "cpu") -> Recommender:
    """Load a checkpoint directory written by `genrec-fast train` / `genrec_fast.train`.

    A list of directories loads an ensemble: members trained on the same data with the same tokenizer
    (e.g. different `train.seed`), ranked by their mean token log-probabilities (ensemble.py). A directory
    written by `genrec-fast cascade` loads a `cascade.Cascade`, one by `genrec-fast hybrid` a `hybrid.Hybrid`."""
    check_device(device)
    if isinstance(path, (str, Path)) and checkpoint.is_cascade(path):
        from .cascade import load_cascade
        return load_cascade(path, device)
    if isinstance(path, (str, Path)) and checkpoint.is_hybrid(path):
        from .hybrid import load_hybrid
        return load_hybrid(path, device)
    if isinstance(path, (str, Path)):
        model, tokenizer, catalog, train_cfg, _ = checkpoint.load_parts(path, device)
        return _recommender(model, tokenizer, catalog, train_cfg)
    paths = list(path)
    if not paths:
        raise ValueError("path: expected a checkpoint directory or a non-empty list of them, got an empty list")
    pairs = [str(p) for p in paths if checkpoint.is_pair(p)]
    if pairs:
        kind = "cascade" if checkpoint.is_cascade(pairs[0]) else "hybrid"
        raise ValueError(f"path: {pairs[0]} is a {kind}; load it alone (an ensemble takes model checkpoints)")
    parts = [checkpoint.load_parts(p, device) for p in paths]
    check_same_files(paths, ("catalog.json", "tokenizer.model"))
    cfgs = [p[3] for p in parts]
    for p, c in zip(paths[1:], cfgs[1:]):
        if c is not None and cfgs[0] is not None and (c.max_items, c.uses_user_token) != (
                cfgs[0].max_items, cfgs[0].uses_user_token):
            raise ValueError(f"path: {p} encodes histories differently from {paths[0]} (train.max_items or user "
                             f"tokens differ); ensemble members need the same encoder input")
    model, tokenizer, catalog, train_cfg, _ = parts[0]
    return _recommender(Ensemble([p[0] for p in parts]).eval(), tokenizer, catalog, train_cfg)


def _recommender(model, tokenizer, catalog, train_cfg) -> Recommender:
    if train_cfg is None:
        return Recommender(model, tokenizer, catalog)
    return Recommender(model, tokenizer, catalog, train_cfg.max_items, use_users=train_cfg.uses_user_token,
                       exclude_seen=train_cfg.mask_seen)


def recommend(model: Recommender, histories, k: int = 10, users=None, **kwargs) -> list[Recommendations]:
    """`model.recommend(...)`: see `Recommender.recommend`."""
    if not isinstance(model, Recommender):
        raise TypeError(f"model: expected a Recommender from genrec_fast.load(), got {type(model).__name__}")
    return model.recommend(histories, k=k, users=users, **kwargs)
