"""Calibration at catalog scale: users/s of `calibrate.candidates` (the one pass over the validation users that
`train.calibrate` / `genrec-fast calibrate` make) for the recommended configuration's shape.

    python benchmarks/bench_calibrate.py [--items 100000 1000000] [--users 256] [--threads 1]

Model: bench_catalog's one-token model with the history and transition bias in both directions (random
weights, a full random neighbour table: speed does not depend on training); histories: seeded random item ids,
5-20 a user, the last one the validation target. Last line: `calibrate_bench items=<n> users_per_s=<x>`.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_catalog as bc  # noqa: E402


class _Split:
    """What `candidates` reads of a `data.Split`: each user's validation history and target (item indices)."""

    def __init__(self, histories: list):
        self.histories = histories
        self.valid_target = np.array([h[-1] for h in histories])

    def valid_history(self, u: int) -> list:
        return list(self.histories[u][:-1])


def measure(n_items: int, users: int) -> float:
    from genrec_fast.calibrate import candidates
    rec, _ = bc.build(n_items, form="transition-both")
    rec.use_users = False  # the random model has no user table for these users
    split = _Split(bc.histories(n_items, users))
    candidates(rec, split, np.arange(min(users, 16)), progress=False)  # warm-up
    t0 = time.perf_counter()
    candidates(rec, split, np.arange(users), progress=False)
    return users / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    for n in args.items:
        print(f"calibrate_bench items={n} users_per_s={measure(n, args.users):.0f}", flush=True)


if __name__ == "__main__":
    main()
