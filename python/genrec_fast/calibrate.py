"""Bias calibration: one multiplier per learned bias, fitted on the validation targets after training.

The history and transition biases' weights (history_bias.py, transition_bias.py) are learned on the training
targets, which the rest of the model fits as well: its item vectors learn those very transitions, so there the
co-occurrence counts add less than they do on held-out targets, and their weights come out small. Re-ranking a
trained model's validation top 200 with its own transition features again (weights fitted on half the users,
NDCG@10 measured on the other half) wanted 2.5x the learned weight of the last item's successors and gained 5% on
Beauty (docs/experiments/datasets.md). The remedy is the stacker's: fit the few combination weights on data the
model did not train on, as early stopping already uses the validation targets.

Groups, each scaled by one factor s_g (the model's own weights are s_g = 1):
  history     the recency terms and the query projection (both terms of the offset scale by s),
  transition  the successor weights a[r],
  reverse     the predecessor weights (`model.transition_reverse`).
The factors are chosen by coordinate search over `GRID`, maximising NDCG@10 of the validation targets. For a
one-token model that is the exact full ranking (every catalog item scored: an item off the biases keeps its
logit, so only the top 10 of those need keeping per user: `Candidates`). A model the trie search ranks
(collaborative codes with the leaf head) adds its offsets inside every code step's log-softmax, so its ranking is
no sum of fixed terms: there each factor set tried is one beam-search ranking of the validation targets, as the
evaluator ranks them (`Decoded`), on `DECODE_USERS` users drawn at random unless `users` says otherwise; a
one-token model on at most `CANDIDATE_USERS` (its `Candidates` hold ~K = 300 biased items a user: 200,000 users
were 6.9 GB and 3 min at 599k items).
`calibrate` also measures what the fit is worth on users it did not see (fitted on
one half of the users, measured on the other: 2-fold) and keeps the model as trained unless that gains: on
MovieLens latest-small's 671 users the halves' factors disagreed and lost 2% on the other half.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Split
from .ensemble import Ensemble
from .evaluate import histories_for, model_ranker, target_ranks
from .item_topk import top_logits
from .row_pairs import RowPairs

GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)
TOP = 10  # NDCG@10
DECODE_USERS = 6000  # a trie-search model: the validation users it is calibrated on by default (~1.5 s a factor set)
CANDIDATE_USERS = 50_000  # a one-token model: all validation users up to this many, else a sample of this many


def bias_groups(model) -> list[str]:
    """The model's calibratable groups, in the order `calibrate` fits them."""
    groups = ["history"] if model.history is not None else []
    t = model.transition
    if t is not None:
        groups.append("transition")
        if t.reverse_weight is not None:
            groups.append("reverse")
    return groups


def _groups(rec) -> list[str]:
    """`bias_groups` of a model `calibrate` can scale; a clear error for any other."""
    if isinstance(rec.model, Ensemble):
        raise ValueError("calibrate: needs one model, not an ensemble")
    groups = bias_groups(rec.model)
    if not groups:
        raise ValueError("calibrate: the model has neither model.history_bias nor model.transition_bias")
    return groups


def _params(model, group: str) -> list:
    """The parameters one group's factor multiplies (a one-token model's offsets scale with them)."""
    if group == "history":
        return [model.history.recency, model.history.query.weight, model.history.query.bias]
    t = model.transition
    if group == "transition":
        return [t.weight] + ([t.cluster_weight] if t.cluster_weight is not None else [])
    return [t.reverse_weight] + ([t.reverse_cluster_weight] if t.reverse_cluster_weight is not None else [])


def scale_biases(model, scales: dict) -> None:
    """Multiply each group's parameters in place by its factor."""
    unknown = sorted(set(scales) - set(bias_groups(model)))
    if unknown:
        raise ValueError(f"scales: unknown group {unknown[0]!r}, expected one of {bias_groups(model)}")
    with torch.no_grad():
        for g, s in scales.items():
            for p in _params(model, g):
                p.mul_(float(s))


class Candidates:
    """What the NDCG@10 of any factors needs, per user: the target's logit z_t (U,) and offsets (G, U), the
    TOP largest logits of the items off every bias (U, TOP), and the logits (U, K) and offsets (G, U, K) of the
    items on some bias (the target left out; -inf logit = padding)."""

    CHUNK = 512  # users a step of `ndcg`: its (users, K) temporaries stay in cache (~1 MB at K = 278)

    def __init__(self, t_z, t_off, rest, z, off):
        self.t_z, self.t_off, self.rest, self.z, self.off = t_z, t_off, rest, z, off
        self._users, self._subset = None, None  # the last `users` asked for and those users' fields

    def ndcg(self, scales: torch.Tensor, users: torch.Tensor | None = None) -> float:
        """scales (G,) -> mean NDCG@10 over `users` (indices; default all). A fit asks ~100 times for the same
        users: their rows are gathered once (the last `users` object is kept), and scored in chunks of users."""
        c = self if users is None else self._select(users)
        s = scales.to(torch.float64)
        total, n = 0.0, len(c.t_z)
        for a in range(0, n, self.CHUNK):
            b = min(a + self.CHUNK, n)
            t = c.t_z[a:b] + _weighted(s, c.t_off[:, a:b])  # (u,)
            z = c.z[a:b] + _weighted(s, c.off[:, a:b])  # (u, K)
            rank = (c.rest[a:b] > t[:, None]).sum(1) + (z > t[:, None]).sum(1)  # (u,) items strictly above
            total += float(torch.where(rank < TOP, 1.0 / torch.log2(rank.double() + 2), 0.0).sum())
        return total / max(n, 1)

    def _select(self, users: torch.Tensor) -> "Candidates":
        if users is not self._users:
            self._users, self._subset = users, None  # (the last subset freed before the next is gathered)
            self._subset = Candidates(self.t_z[users], self.t_off[:, users], self.rest[users], self.z[users],
                                      self.off[:, users])
        return self._subset


def _weighted(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_g s[g] * x[g] over the first dimension, without a (G, ...) temporary."""
    out = x[0] * s[0]
    for g in range(1, len(s)):
        out.add_(x[g], alpha=float(s[g]))
    return out


@torch.inference_mode()
def candidates(rec, split: Split, users: Sequence[int], batch_size: int = 256, progress: bool = True) -> Candidates:
    """The validation `Candidates` of a one-token model with biases (`Recommender`). Nothing per user is as
    long as the catalog: the items off the biases come from the C++ top-k with the biased items excluded."""
    model, groups = rec.model, _groups(rec)
    if not rec.one_step:
        raise ValueError("candidates: needs a model with one token per item (tokenizer.item_tokens='whole'); "
                         "calibrate decodes the others (Decoded)")
    model.eval()
    first, n = int(rec.tokenizer.item_flat[0]), len(rec.catalog.item_ids)
    parts = []
    users = np.asarray(users)
    for s in tqdm(range(0, len(users), batch_size), desc="calibrate", disable=None if progress else True,
                  leave=False):
        u = users[s:s + batch_size]
        enc = rec.encode_batch([split.valid_history(int(x)) for x in u], [int(x) for x in u])
        parts.append(_batch(model, enc, torch.as_tensor(split.valid_target[u], device=rec.device), first, n, groups))
    K = max(p[3].shape[1] for p in parts)
    pad = lambda x, v: F.pad(x, (0, K - x.shape[-1]), value=v)  # noqa: E731
    return Candidates(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1),
                      torch.cat([p[2] for p in parts]), torch.cat([pad(p[3], -math.inf) for p in parts]),
                      torch.cat([pad(p[4], 0.0) for p in parts], 1))


def _batch(model, enc, target, first: int, n: int, groups: list):
    """One batch's `Candidates` fields (on the CPU): the biased items as sorted (user, item) keys, their logits by
    gathered dots, their offsets per group summed over repeats; the target apart; the rest by `top_logits`."""
    memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    h = model.first_heads(memory, enc["mask"])[0]
    pairs = _group_pairs(model, h, memory, enc, groups)  # per group: items (B, N), offsets (B, N)
    on = [items.masked_fill(items == target[:, None], -1) for items, _ in pairs]  # biased, not the target
    biased = RowPairs(on, n)  # (Q,) each user's biased items
    off = torch.stack([biased.sums(t, v.double()) for t, (_, v) in zip(on, pairs)])  # (G, Q) summed over repeats
    t_off = torch.stack([(v.double() * (items == target[:, None])).sum(1) for items, v in pairs])  # (G, B)
    w, b = h.weight[first:first + n], h.bias[first:first + n]  # (n, C), (n,)
    t_z = ((h.x * w[target]).sum(1) + b[target]).double()  # (B,)
    z = ((h.x[biased.row] * w[biased.col]).sum(1) + b[biased.col]).double()  # (Q,)
    mz, moff = biased.padded(z, -math.inf), biased.padded(off, 0.0)  # (B, K), (G, B, K) items in index order
    excluded = np.split(biased.col.cpu().numpy(), np.cumsum(biased.count.cpu().numpy())[:-1])
    tgt = target.cpu().numpy()
    _, rest = top_logits(h, first, n, min(TOP, n), [np.append(e, t) for e, t in zip(excluded, tgt)])
    return t_z.cpu(), t_off.cpu(), torch.from_numpy(rest).double(), mz.cpu(), moff.cpu()


def _group_pairs(model, head, memory, enc, groups):
    """Per group: (items (B, N) item indices, -1 = none; offsets (B, N)) at the model's own weights: the model's
    `bias_parts`, the transition bias's split into its successor and predecessor columns."""
    parts = model.bias_parts([head], memory, enc["item_ids"], enc["mask"])
    out = [parts["history"]] if "history" in groups else []
    if "transition" in groups:
        t, (items, values) = model.transition, parts["transition"]  # (B, R * W)
        col = torch.arange(items.shape[1], device=items.device) % t.items.shape[1]  # the table column of each
        out.append((items, values * (col < t.neighbors)))
        if "reverse" in groups:
            out.append((items, values * (col >= t.neighbors)))
    return out


class Decoded:
    """NDCG@10 of any factors for a model the trie search ranks: the model's bias weights set to factor x trained
    weight, then the validation targets of `users` ranked as the evaluator ranks them (`model_ranker`: 20 beams, top
    20). Each user is decoded at most once per factor set (the 2-fold fits and the final fit share them); `reset`
    puts the trained weights back."""

    def __init__(self, rec, split: Split, users: np.ndarray, groups: Sequence[str], progress: bool = True,
                 batch_size: int = 256):
        self.rec, self.users, self.groups, self.batch_size = rec, np.asarray(users), list(groups), batch_size
        self.hists, self.targets = histories_for(split, "valid", self.users)
        self.trained = {g: [p.detach().clone() for p in _params(rec.model, g)] for g in self.groups}
        self.gains = {}  # factor set -> (n,) each user's NDCG@10, NaN until decoded
        self.bar = tqdm(desc="calibrate (users decoded)", disable=None if progress else True, leave=False)

    def ndcg(self, scales: torch.Tensor, users: torch.Tensor | None = None) -> float:
        """scales (G,) -> mean NDCG@10 over `users` (indices into the calibrated users; default all)."""
        idx = np.arange(len(self.users)) if users is None else np.asarray(users)
        gain = self.gains.setdefault(tuple(float(x) for x in scales), np.full(len(self.users), np.nan))
        todo = idx[np.isnan(gain[idx])]
        if len(todo):
            self._set(scales)
            ranker = model_ranker(self.rec)
            for s in range(0, len(todo), self.batch_size):
                part = todo[s:s + self.batch_size]
                top = np.asarray(ranker([self.hists[i] for i in part], self.users[part], False))[:, :TOP]
                rank = target_ranks(top, self.targets[part])  # (B,) -1: not in the top 10
                gain[part] = np.where(rank >= 0, 1.0 / np.log2(np.maximum(rank, 0) + 2), 0.0)
                self.bar.update(len(part))
        return float(gain[idx].mean())

    def reset(self) -> None:
        self._set(torch.ones(len(self.groups)))
        self.bar.close()

    def _set(self, scales) -> None:
        with torch.no_grad():
            for g, s in zip(self.groups, scales):
                for p, w in zip(_params(self.rec.model, g), self.trained[g]):
                    p.copy_(w * float(s))


def fit(cands: Candidates, groups: Sequence[str], users: torch.Tensor | None = None, rounds: int = 3,
        grid: Sequence[float] = GRID) -> dict:
    """Coordinate search from 1 (the model as trained) -> {group: factor}."""
    scales = torch.ones(len(groups), dtype=torch.float64)
    best = cands.ndcg(scales, users)
    for _ in range(rounds):
        changed = False
        for g in range(len(groups)):
            for v in grid:
                trial = scales.clone()
                trial[g] = v
                m = cands.ndcg(trial, users)
                if m > best + 1e-12:
                    best, scales, changed = m, trial, True
        if not changed:
            break
    return {name: float(s) for name, s in zip(groups, scales)}


def calibrate(rec, split: Split, users: Sequence[int] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Fit the bias factors on the validation targets of `users` (default all, at most `CANDIDATE_USERS` for a
    one-token model and `DECODE_USERS` for a trie-search model, drawn with `seed`) and apply them to
    `rec.model` if the 2-fold estimate gains.
    -> {"scales": {group: factor} (all 1 if not applied), "applied": bool, "valid_ndcg10": before/after on those
    users, "heldout_ndcg10": before/after of the 2-fold fit (each half's factors measured on the other half),
    "users": n}."""
    groups = _groups(rec)
    n = len(split.train)
    if users is not None:
        users = np.asarray(users)
    elif n <= (limit := CANDIDATE_USERS if rec.one_step else DECODE_USERS):
        users = np.arange(n)
    else:  # a trie-search model decodes once a factor set; a one-token model's candidates grow with the users
        users = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    if len(users) < 2:
        raise ValueError(f"users: calibrate needs at least 2 validation users, got {len(users)}")
    cands = candidates(rec, split, users, progress=progress) if rec.one_step else Decoded(rec, split, users, groups,
                                                                                          progress)
    try:
        out = _fit_2fold(cands, groups, len(users), seed)
    finally:
        if isinstance(cands, Decoded):  # the trained weights back, also when the fit fails
            cands.reset()
    scale_biases(rec.model, out["scales"])
    return out


def _fit_2fold(cands, groups: Sequence[str], n: int, seed: int) -> dict:
    """`calibrate`'s fits on `cands` (n users): each half's factors measured on the other half, then, if that
    gains, the factors fitted on all -> calibrate's dict."""
    ones = torch.ones(len(groups), dtype=torch.float64)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    halves = (perm[: n // 2], perm[n // 2:])
    held = []
    for a, b in (halves, halves[::-1]):
        s = fit(cands, groups, a)
        held.append((len(b), cands.ndcg(ones, b), cands.ndcg(torch.tensor([s[g] for g in groups]), b), s))
    w = np.array([h[0] for h in held], dtype=np.float64) / n
    gain = float(w @ [h[2] for h in held]) > float(w @ [h[1] for h in held])
    scales = fit(cands, groups) if gain else {g: 1.0 for g in groups}
    return {"scales": scales, "applied": gain, "users": int(n),
            "valid_ndcg10": {"before": cands.ndcg(ones), "after": cands.ndcg(torch.tensor([scales[g] for g in groups]))},
            "heldout_ndcg10": {"before": float(w @ [h[1] for h in held]), "after": float(w @ [h[2] for h in held]),
                               "half_scales": [h[3] for h in held]}}
