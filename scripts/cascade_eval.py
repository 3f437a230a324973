"""Exploration: a codes model's candidates ranked with a one-token model's scores (a cascade), on validation.

The codes model (the fast form at large catalogs) proposes its top N items by trie beam search; the one-token
model scores only those N. Prints validation NDCG@10 / HR@10 on all users for: the codes model alone, the
one-token model alone (full catalog), the candidates' recall, and the candidates ranked by
(1 - a) log P_codes + a log P_one for a few a (a = 1: the one-token model restricted to the candidates).
Validation only: no test numbers.

Usage: python scripts/cascade_eval.py CODES_CKPT ONE_TOKEN_CKPT --data FILE [--candidates 20,50] [--alphas ...]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from genrec_fast import data as data_mod
from genrec_fast import load
from genrec_fast.data import leave_one_out
from genrec_fast.evaluate import histories_for, metrics_from_ranks, target_ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codes")
    ap.add_argument("one")
    ap.add_argument("--data", required=True)
    ap.add_argument("--candidates", default="20,50,100")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("--users", type=int, default=0, help="first N users only (0: all)")
    args = ap.parse_args()
    codes, one = load(args.codes), load(args.one)
    data = data_mod.load(args.data, "p5", id_order="random", seed=0)
    if data.item_ids != codes.catalog.item_ids or data.item_ids != one.catalog.item_ids:
        raise SystemExit("--data does not match the checkpoints' catalogs")
    split = leave_one_out(data)
    users = np.arange(len(split.train))[:args.users or None]
    hists, targets = histories_for(split, "valid", users)
    n_items = len(data.item_ids)
    ns = [int(n) for n in args.candidates.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    ranks: dict = {"codes alone": [], "one token alone": []}
    ranks |= {(n, a): [] for n in ns for a in alphas}
    recall = {n: [] for n in ns}
    with torch.inference_mode():
        for s in range(0, len(users), 256):
            u, t = list(users[s:s + 256]), targets[s:s + 256]
            enc = codes.encode_batch(hists[s:s + 256], u)
            cand, cscore = codes.decode(enc, max(ns), max(ns))  # (U, N) candidates, log P_codes
            ranks["codes alone"].append(target_ranks(cand[:, :20], t))
            enc1 = one.encode_batch(hists[s:s + 256], u)
            items, scores = one.decode(enc1, n_items, 20)  # (U, n_items): the whole catalog ranked
            ranks["one token alone"].append(target_ranks(items[:, :20], t))
            full = np.full((len(u), n_items), -np.inf, dtype=np.float32)
            np.put_along_axis(full, np.maximum(items, 0), scores, 1)
            one_at = np.take_along_axis(full, np.maximum(cand, 0), 1)  # (U, N) log P_one of the candidates
            for n in ns:
                recall[n].append((cand[:, :n] == t[:, None]).any(1))
                for a in alphas:
                    c = np.where(cand[:, :n] >= 0, (1 - a) * cscore[:, :n] + a * one_at[:, :n], -np.inf)
                    order = np.argsort(-c, 1, kind="stable")[:, :20]
                    ranks[(n, a)].append(target_ranks(np.take_along_axis(cand[:, :n], order, 1), t))
    for n in ns:
        print(f"candidates {n}: recall {np.concatenate(recall[n]).mean():.4f}")
    for key, r in ranks.items():
        out = metrics_from_ranks(np.concatenate(r))
        name = key if isinstance(key, str) else f"N {key[0]} a {key[1]}"
        print(f"{name}: NDCG@10 {out['NDCG@10']:.4f} HR@10 {out['HR@10']:.4f} NDCG@20 {out['NDCG@20']:.4f}")


if __name__ == "__main__":
    main()
