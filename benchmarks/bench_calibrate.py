"""Calibration at catalog scale: users/s of `calibrate.candidates` (the one pass over the validation users that
`train.calibrate` / `genrec-fast calibrate` make) for the recommended configuration's shape.

    python benchmarks/bench_calibrate.py [--items 100000 1000000] [--users 256] [--threads 1]
    python benchmarks/bench_calibrate.py --items 599000 --users 40000 --threads 2 --fit   # + the factors' fit

Model: bench_catalog's one-token model with the history and transition bias in both directions (random
weights, a full random neighbour table: speed does not depend on training); histories: seeded random item ids,
5-20 a user, the last one the validation target. `--fit` also times the fit on those candidates (`calibrate`'s
2-fold coordinate search, ~350 NDCG evaluations over halves and all users). Last line: `calibrate_bench
items=<n> users_per_s=<x>` (+ ` fit_s=<y>`).
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


def measure(n_items: int, users: int, fit: bool = False) -> dict:
    from genrec_fast.calibrate import _fit_2fold, bias_groups, candidates
    rec, _ = bc.build(n_items, form="transition-both")
    rec.use_users = False  # the random model has no user table for these users
    split = _Split(bc.histories(n_items, users))
    candidates(rec, split, np.arange(min(users, 16)), progress=False)  # warm-up
    t0 = time.perf_counter()
    cands = candidates(rec, split, np.arange(users), progress=False)
    out = {"users_per_s": users / (time.perf_counter() - t0)}
    if fit:
        t0 = time.perf_counter()
        _fit_2fold(cands, bias_groups(rec.model), users, 0)
        out["fit_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fit", action="store_true", help="also time the factors' fit on the candidates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    for n in args.items:
        m = measure(n, args.users, args.fit)
        fit = f" fit_s={m['fit_s']:.1f}" if args.fit else ""
        print(f"calibrate_bench items={n} users_per_s={m['users_per_s']:.0f}{fit}", flush=True)


if __name__ == "__main__":
    main()
