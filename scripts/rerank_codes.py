"""Exploration (issue 19): rerank a codes model's beam-search candidates with its first-step item softmax.

For a checkpoint trained with `model.leaf_head` and `train.item_aux > 0` (so h_0 . e_item is a trained
one-token head), prints validation NDCG@10 / HR@10 / NDCG@20 on all users for: the codes search alone
(50 beams, top 50 candidates), the candidates reranked by log P_codes + beta * log P_head for a few beta, and
the head alone ranking the whole catalog. Validation only: no test numbers.

Usage: python scripts/rerank_codes.py CKPT --data FILE [--betas 0,0.25,0.5,1,2]
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
    ap.add_argument("ckpt")
    ap.add_argument("--data", required=True)
    ap.add_argument("--betas", default="0,0.25,0.5,1,2")
    ap.add_argument("--beams", type=int, default=50)
    args = ap.parse_args()
    rec = load(args.ckpt)
    data = data_mod.load(args.data, "p5", id_order="random", seed=0)
    if data.item_ids != rec.catalog.item_ids:
        raise SystemExit("--data does not match the checkpoint's catalog")
    split = leave_one_out(data)
    users = np.arange(len(split.train))
    hists, targets = histories_for(split, "valid", users)
    betas = [float(b) for b in args.betas.split(",")]
    ranks: dict = {b: [] for b in betas} | {"head alone": []}
    m = rec.model
    weight = m.item_embed.weight[1:]  # (n_items, C): the leaf head's item vectors
    with torch.inference_mode():
        for s in range(0, len(users), 256):
            enc = rec.encode_batch(hists[s:s + 256], list(users[s:s + 256]))
            items, scores = rec.decode(enc, args.beams, args.beams)  # (U, beams) candidates, log P_codes
            memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
            h0 = m.first_heads(memory, enc["mask"])[0].x  # (U, C) the first decoder step's state
            head = torch.log_softmax(h0 @ weight.T, -1).numpy()  # (U, n_items)
            t = targets[s:s + 256]
            ranks["head alone"].append(target_ranks(np.argsort(-head, 1)[:, :20], t))
            head_at = np.take_along_axis(head, np.maximum(items, 0), 1)  # (U, beams)
            for b in betas:
                combined = np.where(items >= 0, scores + b * head_at, -np.inf)
                order = np.argsort(-combined, 1, kind="stable")[:, :20]
                ranks[b].append(target_ranks(np.take_along_axis(items, order, 1), t))
    for b, r in ranks.items():
        out = metrics_from_ranks(np.concatenate(r))
        name = b if isinstance(b, str) else f"beta {b}"
        print(f"{name}: NDCG@10 {out['NDCG@10']:.4f} HR@10 {out['HR@10']:.4f} NDCG@20 {out['NDCG@20']:.4f}")


if __name__ == "__main__":
    main()
