"""A cascade: a fast model proposes candidates, a one-token model scores only those.

The retriever (typically collaborative codes, whose trie search costs little at any catalog size) returns its
top N items with log-probabilities log P_r. With `bias_items` (the default) the candidates also take the items
the ranker's biases name (the user's history items and the transition neighbours of the last items, ~320 a user
in the recommended configuration: items it scores with offsets anyway), after the filters (exclude_seen,
allowed_items); such an item that the retriever did not return gets the lowest log P_r it returned. The ranker
(a one-token model) runs its encoder and first decoder step and scores just the candidates: its logits plus its
bias offsets, normalised over the candidates (log P_o(item | candidates)); it never touches the rest of the
catalog, the part that makes a one-token model slow at 1M items. Items are ranked by

    score = (1 - weight) * log P_r(item) + weight * log P_o(item | candidates)

weight 0 is the retriever's order (the retrieved items first), 1 the ranker's over the candidates. `fit_weight`
chooses the weight on validation targets. A cascade is saved as a directory with cascade.json and the two
checkpoints as retriever/ and ranker/; `genrec_fast.load` reads it like any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .beam_search import check_filters
from .checkpoint import CASCADE, read_pair, save_pair
from .decoding import first_step_heads
from .evaluate import histories_for, metrics_from_ranks, target_ranks
from .item_topk import candidate_logits
from .native import core
from .recommend import Recommender

DEFAULT_CANDIDATES = 20  # the codes search's usual beam width; with the bias items 50 x 50 gave the same (Beauty)
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # the grid `fit_weight` searches


class Cascade(Recommender):
    """`retriever`'s top `candidates` items of a `beams`-wide search (default, and at least, `candidates`: `.beams`
    is the width searched), with `bias_items` the ranker's bias items too, reranked with `ranker` (a one-token
    `Recommender`); `recommend`, `decode` and `encode_batch` as for one model, with scores as in the module
    docstring."""

    def __init__(self, retriever: Recommender, ranker: Recommender, candidates: int = DEFAULT_CANDIDATES,
                 weight: float = 0.5, beams: int | None = None, bias_items: bool = True):
        if isinstance(retriever, Cascade) or isinstance(ranker, Cascade):
            raise ValueError("retriever, ranker: expected single models or ensembles, got a cascade")
        if not ranker.one_step:
            raise ValueError("ranker: expected a model with one token per item and no EOS step (it scores "
                             "candidates in one decoder step), got one with item_tokens="
                             f"{ranker.tokenizer.item_tokens!r}, item_eos={ranker.model.cfg.item_eos}")
        if retriever.catalog.item_ids != ranker.catalog.item_ids:
            raise ValueError("ranker: its catalog's item ids differ from the retriever's (both must be trained on "
                             "the same data with the same --id-order and --seed)")
        if retriever.catalog.user_ids != ranker.catalog.user_ids:
            raise ValueError("ranker: its catalog's user ids differ from the retriever's")
        check_candidates(candidates)
        beams = candidates if beams is None else beams
        check_candidates(beams, "beams")
        beams = max(beams, candidates)  # (narrower would not find `candidates` items: the width searched)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight: expected a number in [0, 1], got {weight!r}")
        super().__init__(retriever.model, retriever.tokenizer, retriever.catalog, retriever.max_items,
                         retriever.use_users or ranker.use_users, retriever.exclude_seen)
        self.retriever, self.ranker, self.candidates, self.weight = retriever, ranker, candidates, float(weight)
        self.beams, self.bias_items = beams, bool(bias_items)
        self.fit: dict = {}  # what `fit_weight` measured, saved with the cascade
        share_transition_table(retriever.model, ranker.model)

    @property
    def one_step(self) -> bool:
        return False  # (calibrate.py and the CLI ask: a cascade is not one model's one step)

    def settings(self) -> dict:
        """What `fit_weight` records beside the weight."""
        return {"candidates": self.candidates, "beams": self.beams, "bias_items": self.bias_items}

    def encode_batch(self, histories, users) -> dict:
        """Both models' padded encoder batches."""
        return {"retriever": self.retriever.encode_batch(histories, users),
                "ranker": self.ranker.encode_batch(histories, users)}

    def decode(self, enc: dict, k: int, num_beams: int, exclude=None, allow=None, backend: str = "auto",
               length_penalty: float = 0.0):
        """-> items (U, k) int64 item indices (-1 = none) and cascade scores (U, k) float32, best first."""
        return combine(*self.candidates_scored(enc, k, num_beams, exclude, allow, backend, length_penalty),
                       self.weight, k)

    def candidates_scored(self, enc: dict, k: int, num_beams: int, exclude=None, allow=None, backend: str = "auto",
                          length_penalty: float = 0.0):
        """The retriever's max(candidates, k) best of max(beams, candidates, k, num_beams) beams, then `rank` ->
        candidates (U, C), log P_r (U, C), log P_o (U, C): what `combine` orders for any weight."""
        n = max(self.candidates, k)
        cand, log_r = self.retriever.decode(enc["retriever"], n, max(self.beams, n, num_beams), exclude, allow,
                                            backend, length_penalty)
        return self.rank(enc["ranker"], cand, log_r, exclude, allow)

    @torch.inference_mode()
    def rank(self, enc: dict, cand: np.ndarray, log_r: np.ndarray, exclude=None, allow=None):
        """The retriever's cand (U, N) item indices (-1 = none) and log P_r (U, N) -> the candidates (U, N + P),
        with the ranker's allowed bias items after the retrieved ones (`bias_items`; -1 = none), their log P_r
        (U, N + P) and the ranker's log P_o(item | candidates) (U, N + P), -inf at -1."""
        heads, pairs = first_step_heads(self.ranker.model, enc)
        if self.bias_items and pairs is not None:
            extra = allowed(pairs[0].cpu().numpy(), exclude, allow, len(self.catalog.item_ids))  # (U, P)
            cand, log_r = union(cand, log_r, extra)
        first = int(self.ranker.tokenizer.item_flat[0])
        z = candidate_logits(heads, first, cand, pairs)  # (U, N + P)
        log_o = torch.log_softmax(z, dim=1).nan_to_num(float("-inf")).cpu().numpy()  # (no candidate: -inf)
        return cand, log_r, log_o

    def save(self, path: str | Path, retriever_dir: str | Path, ranker_dir: str | Path) -> Path:
        """Write cascade.json and copies of the two checkpoint directories (their `load`ed files) to `path`
        (`checkpoint.save_pair`)."""
        cfg = {"candidates": self.candidates, "beams": self.beams, "bias_items": self.bias_items,
               "weight": self.weight, "fit": self.fit}
        return save_pair(path, CASCADE, {"retriever": retriever_dir, "ranker": ranker_dir}, cfg)


def share_transition_table(a: torch.nn.Module, b: torch.nn.Module) -> int:
    """Model b's transition neighbour table (items, counts) replaced by model a's where the two are equal (both
    fit on the same training sequences: the two models of a cascade, ~800 MB each at 1M items with both
    directions), so that one copy stays in memory. -> the bytes b no longer holds."""
    ta, tb = getattr(a, "transition", None), getattr(b, "transition", None)
    if ta is None or tb is None or ta.items is tb.items:
        return 0
    same = all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
               for x, y in ((ta.items, tb.items), (ta.counts, tb.counts)))
    if not same:
        return 0
    freed = sum(t.numel() * t.element_size() for t in (tb.items, tb.counts))
    tb.items, tb.counts = ta.items, ta.counts  # (buffers: not parameters, never trained)
    return freed


def check_candidates(n, name: str = "candidates") -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: expected a positive integer, got {n!r}")


def allowed(items: np.ndarray, exclude, allow, num_items: int) -> np.ndarray:
    """items (U, P) item indices (-1 = none) -> the same with -1 where `exclude` / `allow` (as in
    `beam_search.check_filters`) forbid the item for its user."""
    U = items.shape[0]
    ptr, ex_items, allow = check_filters(exclude, allow, U, num_items)
    ok = items >= 0
    safe = np.maximum(items, 0)
    if allow is not None:
        ok &= allow[safe] if allow.ndim == 1 else np.take_along_axis(allow, safe, 1)
    if ptr is not None:  # (user, item) keys of the exclusions
        users = np.repeat(np.arange(U), np.diff(ptr))
        ok &= ~np.isin(np.arange(U)[:, None] * num_items + safe, users * num_items + ex_items)
    return np.where(ok, items, -1)


def union(cand: np.ndarray, log_r: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cand (U, N) distinct per row (-1 = none), log_r (U, N), extra (U, P) items (-1 = none) -> cand then the
    items of extra in neither cand nor earlier in extra (U, N + P), -1 elsewhere (`append_new_items`); log_r with
    each row's lowest retrieved value for the added items (0 for a row with none retrieved)."""
    found = np.where(cand >= 0, log_r, np.inf).min(1, keepdims=True)  # (U, 1)
    floor = np.where(np.isfinite(found), found, 0.0).astype(np.float32)
    joined = append_new_items(cand, extra)  # (U, N + P)
    return joined, np.concatenate([log_r, np.broadcast_to(floor, extra.shape)], 1)


def append_new_items(cand: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """`append_new_items_reference` in one C++ pass (`_core.append_new_items`: a hash set per user)."""
    cand, extra = (np.ascontiguousarray(a, dtype=np.int64) for a in (cand, extra))
    if cand.ndim != 2 or extra.ndim != 2 or len(cand) != len(extra):
        raise ValueError(f"cand, extra: expected (U, N) and (U, P) item tables, got shapes {cand.shape} and "
                         f"{extra.shape}")
    out = np.empty((len(cand), cand.shape[1] + extra.shape[1]), dtype=np.int64)
    core().append_new_items(cand.ctypes.data, cand.shape[1], extra.ctypes.data, extra.shape[1], len(cand),
                            out.ctypes.data, torch.get_num_threads())
    return out


def append_new_items_reference(cand: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """cand (U, N) distinct per row (-1 = none), extra (U, P) (-1 = none) -> (U, N + P): cand, then each extra item
    in neither cand nor earlier in its row of extra, at its own position; -1 elsewhere."""
    extra = np.where((extra[:, :, None] == cand[:, None, :]).any(2), -1, extra)  # (U, P) not retrieved
    order = np.argsort(extra, axis=1, kind="stable")
    ranked = np.take_along_axis(extra, order, 1)
    dup = np.zeros(extra.shape, dtype=bool)
    dup[:, 1:] = ranked[:, 1:] == ranked[:, :-1]  # a repeat of the item before it in sorted order
    np.put_along_axis(dup, order, dup.copy(), 1)
    return np.concatenate([cand, np.where(dup, -1, extra)], 1)


def combine(cand: np.ndarray, log_r: np.ndarray, log_o: np.ndarray, weight: float, k: int):
    """The cascade's order: cand (U, N) item indices (-1 = none), the two log-probabilities (U, N) -> the best k
    items (U, k) and scores (U, k) by (1 - weight) log_r + weight log_o, ties in the retriever's order."""
    valid = cand >= 0
    mixed = (1 - weight) * np.where(valid, log_r, 0) + weight * np.where(valid, log_o, 0)  # (no -inf * 0 = NaN)
    score = np.where(valid, mixed, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]  # (U, k); -inf (no candidate) last
    items = np.take_along_axis(cand, order, 1)
    return items, np.take_along_axis(score, order, 1).astype(np.float32)


def load_cascade(path: str | Path, device: str | torch.device = "cpu") -> Cascade:
    """A directory written by `Cascade.save` -> the cascade, its fit record in `.fit`."""
    from .recommend import load
    path = Path(path)
    cfg = read_pair(path, CASCADE, "cascade")
    cascade = Cascade(load(path / "retriever", device), load(path / "ranker", device), cfg["candidates"],
                      cfg["weight"], cfg.get("beams"), cfg.get("bias_items", True))
    cascade.fit = cfg.get("fit", {})
    return cascade


def fit_weight(mix, split, users=None, weights=WEIGHTS, batch_size: int = 256, progress: bool = True,
               exclude_seen: bool = False) -> dict:
    """Choose `mix.weight` (a `Cascade` or a `hybrid.Hybrid`: anything with `candidates_scored`, ordered by
    `combine`) on the validation targets of `users` (default all), seen items excluded or not as `exclude_seen`
    (as `evaluate` ranks): the NDCG@10 of every weight in `weights`, the best set on `mix`; a 2-fold check (the
    weight chosen on one half of the users, scored on the other) says whether it holds on users it was not chosen
    on. -> the record, also in `mix.fit`."""
    users = np.arange(len(split.train)) if users is None else np.asarray(users)
    hists, targets = histories_for(split, "valid", users)
    ranks = {w: [] for w in weights}  # per weight, the targets' ranks (U,)
    for s in tqdm(range(0, len(users), batch_size), desc="mixture weight", disable=None if progress else True,
                  leave=False):  # (None: a bar on a terminal only)
        part = hists[s:s + batch_size]
        enc = mix.encode_batch(part, [int(u) for u in users[s:s + batch_size]])
        exclude = [np.asarray(h, dtype=np.int64) for h in part] if exclude_seen else None
        cand, log_a, log_b = mix.candidates_scored(enc, 20, 20, exclude)  # as `evaluate` calls `decode`
        for w in weights:
            items, _ = combine(cand, log_a, log_b, w, 20)
            ranks[w].append(target_ranks(items, targets[s:s + batch_size]))
    ranks = {w: np.concatenate(r) for w, r in ranks.items()}
    ndcg = {w: metrics_from_ranks(r)["NDCG@10"] for w, r in ranks.items()}
    best = max(weights, key=lambda w: (ndcg[w], -abs(w - 0.5)))  # ties: the weight nearer the middle
    half = np.random.default_rng(0).permutation(len(users)) < len(users) // 2  # (U,) fold A
    held_out = []
    for fold in (half, ~half):  # choose on one fold, score on the other
        w = max(weights, key=lambda w: metrics_from_ranks(ranks[w][fold])["NDCG@10"])
        held_out.append(metrics_from_ranks(ranks[w][~fold])["NDCG@10"] * (~fold).sum())
    record = {"weight": best, **mix.settings(), "users": int(len(users)), "exclude_seen": bool(exclude_seen),
              "valid_ndcg10": {str(w): round(v, 5) for w, v in ndcg.items()},
              "held_out_ndcg10": round(sum(held_out) / len(users), 5)}
    mix.weight, mix.fit = float(best), record
    return record
