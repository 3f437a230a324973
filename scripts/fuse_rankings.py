"""Validation-only diagnostic: how do GenRec checkpoints and a SASRec peer rank *new* items, and what does a
rank fusion of their lists gain? (docs/experiments/datasets.md, "Where the two differ on new items")

Every validation user (seen items excluded) is ranked by each model (top 50). Printed: each model's NDCG@10 and
HR@10, NDCG@10 by history length, the users each model alone hits, a per-user oracle of the first two, and
reciprocal-rank fusion (score of an item: sum over lists of w / (60 + rank)) of pairs of lists, the weight fitted on
one half of the users and measured on the other (2-fold). Never reads test items.

  python scripts/fuse_rankings.py --data ../shared/data/beauty/sequential_data.txt \\
      --genrec runs/a/best runs/b/best --sasrec runs/sasrec/best
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from genrec_fast.cli import _load_checkpoints, _load_matching_data, _sasrec_and_data
from genrec_fast.data import leave_one_out
from genrec_fast.evaluate import histories_for
from genrec_fast.sasrec import sasrec_ranker

K, C = 50, 60  # list length, RRF constant


def top_lists(rank_chunk, hists: list) -> np.ndarray:
    """(U, K) item indices, -1 padded, in chunks of 512 users."""
    out = []
    for s in range(0, len(hists), 512):
        for row in rank_chunk(hists[s:s + 512]):
            row = np.asarray(row, dtype=np.int64)[:K]
            out.append(np.pad(row, (0, K - len(row)), constant_values=-1))
    return np.stack(out)


def genrec_lists(rec, hists):
    def rank(h):
        items, _ = rec.decode(rec.encode_batch(h, [None] * len(h)), K, K, exclude=[np.asarray(x) for x in h])
        return items
    return top_lists(rank, hists)


def sasrec_lists(model, hists):
    rank = sasrec_ranker(model, K)  # seen items excluded
    return top_lists(lambda h: rank(h, None, True), hists)


def ndcg10(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(U,) NDCG@10 of each user's target in its list."""
    m = top[:, :10] == targets[:, None]
    r = np.where(m.any(1), m.argmax(1), -1)
    return np.where(r >= 0, 1 / np.log2(np.maximum(r, 0) + 2), 0.0)


def rrf(lists: list, weights: list) -> np.ndarray:
    """(U, 10) the best items by sum_l w_l / (C + rank_l), ties by item index."""
    out = np.full((len(lists[0]), 10), -1, dtype=np.int64)
    for u in range(len(out)):
        score: dict = {}
        for top, w in zip(lists, weights):
            for r, i in enumerate(top[u]):
                if i >= 0:
                    score[i] = score.get(i, 0.0) + w / (C + r)
        best = sorted(score.items(), key=lambda t: (-t[1], t[0]))[:10]
        out[u, :len(best)] = [i for i, _ in best]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="p5")
    ap.add_argument("--genrec", nargs="+", default=[], help="GenRec checkpoints (one-token models)")
    ap.add_argument("--sasrec", nargs="*", default=[], help="SASRec checkpoints (train --model sasrec)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ns = lambda ck: argparse.Namespace(checkpoint=[ck], data=args.data, format=args.format, columns=None,  # noqa: E731
                                       id_order="random", seed=0, device="cpu")
    lists, data = {}, None
    for i, ck in enumerate(args.genrec):
        rec = _load_checkpoints(ns(ck))
        data = _load_matching_data(ns(ck), rec.catalog)
        split = leave_one_out(data)
        hists, targets = histories_for(split, "valid", np.arange(data.n_users))
        lists[f"genrec{i}"] = genrec_lists(rec, hists)
    for i, ck in enumerate(args.sasrec):
        model, data = _sasrec_and_data(ns(ck))
        split = leave_one_out(data)
        hists, targets = histories_for(split, "valid", np.arange(data.n_users))
        lists[f"sasrec{i}"] = sasrec_lists(model, hists)
    names = list(lists)
    nd = {n: ndcg10(lists[n], targets) for n in names}
    hit = {n: (lists[n][:, :10] == targets[:, None]).any(1) for n in names}
    print(f"{len(targets)} validation users, seen items excluded")
    for n in names:
        print(f"{n}: NDCG@10 {nd[n].mean():.4f} HR@10 {hit[n].mean():.4f}")
    lengths = np.array([len(h) for h in hists])
    print("NDCG@10 by history length: " + " ".join(names))
    for a, b in [(0, 4), (4, 7), (7, 10), (10, 20), (20, 10**9)]:
        m = (lengths >= a) & (lengths < b)
        if m.any():
            print(f"  [{a}, {b}) {m.mean():.3f} of users: " + " ".join(f"{nd[n][m].mean():.4f}" for n in names))
    half = np.random.default_rng(0).permutation(len(targets)) < len(targets) // 2
    for x, y in itertools.combinations(names, 2):
        print(f"{x} + {y}: only {x} hits {(hit[x] & ~hit[y]).mean():.3f} of users, only {y} "
              f"{(hit[y] & ~hit[x]).mean():.3f}, both {(hit[x] & hit[y]).mean():.3f}; per-user oracle NDCG@10 "
              f"{np.maximum(nd[x], nd[y]).mean():.4f}")
        per = {w: ndcg10(rrf([lists[x], lists[y]], [1 - w, w]), targets) for w in np.round(np.arange(.2, .81, .1), 1)}
        wa = max(per, key=lambda w: per[w][half].mean())
        wb = max(per, key=lambda w: per[w][~half].mean())
        held = (per[wa][~half].sum() + per[wb][half].sum()) / len(targets)
        print(f"  RRF: weight of {y} fitted {wa} / {wb} on the halves; held-out NDCG@10 {held:.4f}")


if __name__ == "__main__":
    main()
