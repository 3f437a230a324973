"""Building collaborative item codes at catalog scale: time and peak RSS of `collab_codes.build_codes`.

A synthetic catalog of `--items` items and `--users` users whose 5-39 items fall in a window of 2,000
neighbouring item ids around a random centre (local structure for the codes to find), then the codes
(2 levels of `--branches` values + a unique token) built from those sequences in this process.

Usage: python benchmarks/bench_codes.py [--items 1000000] [--users 200000] [--branches 256]
Last line: codes_bench items=<n> interactions=<m> build_s=<s> peak_rss_gb=<g> max_leaf=<k>
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from genrec_fast.collab_codes import build_codes


def synthetic_sequences(n_items: int, n_users: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    lengths, centres = rng.integers(5, 40, n_users), rng.integers(0, n_items, n_users)
    return [(c + rng.integers(0, 2000, n)) % n_items for c, n in zip(centres.tolist(), lengths.tolist())]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--branches", type=int, default=256)
    args = p.parse_args(argv)
    seqs = synthetic_sequences(args.items, args.users)
    t0 = time.perf_counter()
    codes = build_codes(seqs, args.items, levels=2, branches=args.branches)
    build_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"codes_bench items={args.items} interactions={sum(map(len, seqs))} build_s={build_s:.1f} "
          f"peak_rss_gb={rss:.2f} max_leaf={int(codes[:, -1].max()) + 1}")


if __name__ == "__main__":
    main()
