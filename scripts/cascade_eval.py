"""Exploration: what a cascade's candidates hold, on validation (docs/codes.md, "A cascade").

For a codes checkpoint and a one-token checkpoint trained on the same data, prints for all validation users: the
codes model alone (20 beams), the one-token model alone (the whole catalog), and for the codes' top 20 of 20 beams
without and with the ranker's bias items: the candidates' recall (the target among them) and the cascade's
NDCG@10 / HR@10 at weights 0, 0.5 and 1. Validation only: no test numbers. (`genrec-fast cascade` fits the weight.)

Usage: python scripts/cascade_eval.py CODES_CKPT ONE_TOKEN_CKPT --data FILE
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from genrec_fast import data as data_mod
from genrec_fast import load
from genrec_fast.cascade import Cascade, combine
from genrec_fast.data import leave_one_out
from genrec_fast.evaluate import histories_for, metrics_from_ranks, target_ranks

WEIGHTS = (0.0, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codes")
    ap.add_argument("one")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    cascade = Cascade(load(args.codes), load(args.one))
    data = data_mod.load(args.data, "p5", id_order="random", seed=0)
    if data.item_ids != cascade.catalog.item_ids:
        raise SystemExit("--data does not match the checkpoints' catalogs")
    split = leave_one_out(data)
    users = np.arange(len(split.train))
    hists, targets = histories_for(split, "valid", users)
    ranks: dict = {"one token alone": []}
    recall: dict = {False: [], True: []}
    ranks |= {(b, w): [] for b in recall for w in WEIGHTS}
    with torch.inference_mode():
        for s in range(0, len(users), 256):
            t = targets[s:s + 256]
            enc = cascade.encode_batch(hists[s:s + 256], [int(u) for u in users[s:s + 256]])
            items, _ = cascade.ranker.decode(enc["ranker"], 20, 20)
            ranks["one token alone"].append(target_ranks(items, t))
            cand, log_r = cascade.retriever.decode(enc["retriever"], 20, 20)
            for bias_items in recall:
                cascade.bias_items = bias_items
                c, lr, lo = cascade.rank(enc["ranker"], cand, log_r)
                recall[bias_items].append((c == t[:, None]).any(1))
                for w in WEIGHTS:
                    ranks[(bias_items, w)].append(target_ranks(combine(c, lr, lo, w, 20)[0], t))
    for b, r in recall.items():
        print(f"candidates {'+ bias items' if b else 'codes only'}: recall {np.concatenate(r).mean():.4f}")
    for key, r in ranks.items():
        m = metrics_from_ranks(np.concatenate(r))
        name = key if isinstance(key, str) else f"{'+ bias items' if key[0] else 'codes only'}, weight {key[1]}"
        print(f"{name}: NDCG@10 {m['NDCG@10']:.4f} HR@10 {m['HR@10']:.4f}")


if __name__ == "__main__":
    main()
