"""Leave-one-out evaluation with full ranking: HR@K and NDCG@K for a model and for baselines.

Every ranker returns, for a batch of histories, its top items in order; the same code turns those
lists into metrics, so the model and the baselines are measured alike. Validation histories are the
training items; test histories add the validation item. Targets are only compared, never shown.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .data import Split

KS = (5, 10, 20)
PARTS = ("valid", "test")
Ranker = Callable[[Sequence[np.ndarray], Sequence[int], bool], np.ndarray]  # -> (B, >=20) item indices


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """ranks (U,): 0-based rank of the target in the list, -1 if absent."""
    hit = ranks >= 0
    out = {}
    for k in ks:
        in_k = hit & (ranks < k)
        out[f"HR@{k}"] = float(in_k.mean())
        out[f"NDCG@{k}"] = float(np.where(in_k, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0).mean())
    return out


def target_ranks(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """top (U, K) item indices (-1 = none), targets (U,) -> each target's 0-based rank in its row, -1 if absent."""
    if top.shape[1] == 0:  # (a catalog with nothing left to rank)
        return np.full(len(targets), -1)
    match = top == targets[:, None]  # (U, K)
    return np.where(match.any(1), match.argmax(1), -1)


def histories_for(split: Split, part: str, users: Sequence[int]) -> tuple[list, np.ndarray]:
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    if part == "valid":
        return [split.valid_history(u) for u in users], split.valid_target[users]
    return [split.test_history(u) for u in users], split.test_target[users]


def evaluate(ranker: Ranker, split: Split, part: str = "test", users: Sequence[int] | None = None,
             exclude_seen: bool = False, batch_size: int = 256, progress: bool = True, desc: str = "eval") -> dict:
    """Metrics of `ranker` on the valid or test targets of `users` (default: all)."""
    users = np.arange(len(split.train)) if users is None else np.asarray(users)
    hists, targets = histories_for(split, part, users)
    ranks, t0 = [], time.perf_counter()
    bar = tqdm(range(0, len(users), batch_size), desc=f"{desc} {part}", disable=None if progress else True,
               leave=False)  # None: bars only on a terminal
    for s in bar:
        top = ranker(hists[s:s + batch_size], users[s:s + batch_size], exclude_seen)
        ranks.append(target_ranks(np.asarray(top)[:, :max(KS)], targets[s:s + batch_size]))
    out = metrics_from_ranks(np.concatenate(ranks))
    out.update(users=int(len(users)), seconds=round(time.perf_counter() - t0, 2), exclude_seen=exclude_seen)
    return out


def model_ranker(rec, num_beams: int = 20, use_user: bool = True, backend: str = "auto") -> Ranker:
    """Rank with trie-constrained beam search of a `Recommender` (top-20 from `num_beams` beams)."""
    k = min(max(KS), num_beams)

    def rank(hists, users, exclude_seen):
        enc = rec.encode_batch(hists, [int(u) if use_user else None for u in users])
        exclude = [np.asarray(h) for h in hists] if exclude_seen else None
        items, _ = rec.decode(enc, k, num_beams, exclude=exclude, backend=backend)
        return _pad(items)
    return rank


def popularity_ranker(split: Split, n_items: int) -> Ranker:
    """Most interacted items in the training sequences (the training parts: validation and test items uncounted);
    equal counts in item index order."""
    counts = np.bincount(np.concatenate(split.train), minlength=n_items) if split.train else np.zeros(n_items)
    order = np.argsort(-counts, kind="stable")

    def rank(hists, users, exclude_seen):
        if not exclude_seen:
            return np.tile(order[:max(KS)], (len(hists), 1))
        return np.stack([_first_unseen(order, h) for h in hists])
    return rank


def id_leak_ranker(item_codes: Sequence[str]) -> Ranker:
    """The id-leak rule: item codes `max code in history + 1, + 2, ...` (a leak when ids follow first appearance)."""
    codes = np.array([int(c) for c in item_codes])
    by_code = {int(c): i for i, c in enumerate(codes)}

    def rank(hists, users, exclude_seen):
        out = np.full((len(hists), max(KS)), -1)
        for b, h in enumerate(hists):
            m, j, seen = int(codes[h].max()), 0, set(h.tolist()) if exclude_seen else ()
            for c in range(m + 1, m + 1 + 4 * max(KS)):
                i = by_code.get(c)
                if i is not None and i not in seen and j < max(KS):
                    out[b, j] = i
                    j += 1
        return out
    return rank


def _first_unseen(order: np.ndarray, history: np.ndarray) -> np.ndarray:
    """The first max(KS) items of `order` not in `history`, -1 past the catalog's end (rows of one length)."""
    head = order[:max(KS) + len(history)]
    return _pad(head[~np.isin(head, history)][None, :max(KS)])[0]


def _pad(items: np.ndarray) -> np.ndarray:
    if items.shape[1] >= max(KS):
        return items
    return np.pad(items, ((0, 0), (0, max(KS) - items.shape[1])), constant_values=-1)


def report(rec, split: Split, item_codes: Sequence[str], num_beams: int = 20, progress: bool = True,
           batch_size: int = 256, backend: str = "auto") -> dict:
    """Validation and test metrics of the model (with/without user token, with/without seen items)
    next to the popularity and id-leak baselines, all through `evaluate`."""
    n_items = len(item_codes)
    rankers = {"popularity": popularity_ranker(split, n_items), "id_leak": id_leak_ranker(item_codes)}
    out: dict = {"valid": {}, "test": {}}
    for name, r in rankers.items():
        for part in PARTS:
            out[part][name] = evaluate(r, split, part, progress=False)
        out["test"][name + "+exclude_seen"] = evaluate(r, split, "test", exclude_seen=True, progress=False)
    model = model_ranker(rec, num_beams, backend=backend)
    kw = dict(batch_size=batch_size, progress=progress)
    out["valid"]["genrec"] = evaluate(model, split, "valid", desc="genrec", **kw)
    out["test"]["genrec"] = evaluate(model, split, "test", desc="genrec", **kw)
    out["test"]["genrec+exclude_seen"] = evaluate(model, split, "test", exclude_seen=True, desc="genrec", **kw)
    if rec.use_users:
        no_user = model_ranker(rec, num_beams, use_user=False, backend=backend)
        out["test"]["genrec(no user token)"] = evaluate(no_user, split, "test", desc="genrec-nouser", **kw)
    else:  # a model trained on histories only ignores user ids: the same inputs, the same numbers
        out["test"]["genrec(no user token)"] = dict(out["test"]["genrec"])
    return out


def format_table(rep: dict) -> str:
    """A plain-text table of a `report`."""
    cols = [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")]
    lines = [f"{'part':6} {'ranker':28} " + " ".join(f"{c:>8}" for c in cols)]
    for part, rows in rep.items():
        for name, m in rows.items():
            lines.append(f"{part:6} {name:28} " + " ".join(f"{m[c]:8.4f}" for c in cols))
    return "\n".join(lines)
