"""The leaf head's scores: the item table read in place (rows scattered) vs its leaf-blocked copy.

`LeafHead.ordered` keeps a copy of the item table laid out leaf by leaf, each 16 rows stored transposed, so
a decoder row scores its leaf from one contiguous block, 16 items in the vector lanes; rows of the same leaf
are scored one after the other (from the cache). `LeafHead.leaf_order = False` reads the table in place.

1. The kernel alone (`_core.leaf_scores` through `leaf_head._leaf_scores_native`): a catalog of `--items`
   items in leaves of ~122 (8,192 leaves at 1M), 5,120 rows (256 users x 20 beams) and 20 rows (one user),
   leaves drawn uniformly or Zipf-skewed (popular clusters shared by many rows, as real traffic).
2. `--end-to-end`: recommend() at 1M items for the codes model and the cascade (bench_catalog's models),
   the two settings alternating call by call in one process (this VM's speed drifts by +-20% within
   minutes: only same-process alternation compares).

Usage: python benchmarks/bench_leaf_scores.py [--items 1000000] [--threads 2] [--end-to-end]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genrec_fast.leaf_head import LeafHead, _leaf_scores_native


def kernel_table(n_items: int, leaves: int, dim: int, reps: int) -> None:
    rng = np.random.default_rng(0)
    cells = rng.permutation(n_items)  # item i -> leaf cells[i] % leaves, slot cells[i] // leaves
    head = LeafHead(np.stack([cells % leaves, cells // leaves], 1), np.array([5, 5 + leaves]),
                    5 + leaves + n_items // leaves + 1)
    weight = torch.randn(n_items + 1, dim)  # (n_items + 1, C)
    blocked = head.ordered(weight)
    print(f"| keys | rows | in place (ms) | leaf-blocked (ms) | speed-up |\n|---|---:|---:|---:|---:|")
    for name, draw in (("uniform", lambda k: rng.integers(0, leaves, k)),
                       ("Zipf 1.2", lambda k: (rng.zipf(1.2, k) - 1) % leaves)):
        for rows in (5120, 20):
            times = {False: [], True: []}
            with torch.no_grad():
                for i in range(reps):
                    keys = torch.from_numpy(draw(rows))  # (rows,) leaf per decoder row
                    hidden = torch.randn(rows, dim)  # (rows, C)
                    for order in ((False, True) if i % 2 else (True, False)):
                        t = time.perf_counter()
                        if order:
                            _leaf_scores_native(blocked, head.items[keys], hidden, head.starts[keys])
                        else:
                            _leaf_scores_native(weight, head.items[keys], hidden)
                        times[order].append(time.perf_counter() - t)
            a, b = (1e3 * np.median(times[o]) for o in (False, True))
            print(f"| {name} | {rows} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


def end_to_end(n_items: int, reps: int, singles: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_catalog as bc
    from genrec_fast import recommend
    print("| model | leaf-blocked | users/s, batch 256 (median) | CPU ms per batch | batch-1 p50 (ms) |\n"
          "|---|---|---:|---:|---:|")
    for kind in ("leaf-transition-both", "cascade-20x20"):
        rec, _ = bc.build(n_items, 0, kind, 1, 95)
        ids = rec.catalog.item_ids
        hists = [[ids[i] for i in h] for h in bc.histories(n_items, 256)]
        wall, cpu, one = ({False: [], True: []} for _ in range(3))
        for order in (False, True):  # warm: the copy is made once, at the first call
            LeafHead.leaf_order = order
            recommend(rec, hists, k=20)
        for i in range(reps + singles):
            for order in ((False, True) if i % 2 else (True, False)):
                LeafHead.leaf_order = order
                batch = hists if i < reps else hists[i % 256:i % 256 + 1]
                t, p = time.perf_counter(), time.process_time()
                recommend(rec, batch, k=20)
                if i < reps:
                    wall[order].append(time.perf_counter() - t)
                    cpu[order].append(time.process_time() - p)
                else:
                    one[order].append(time.perf_counter() - t)
        for order in (False, True):
            print(f"| {kind} | {'yes' if order else 'no'} | {256 / np.median(wall[order]):,.0f} | "
                  f"{1e3 * np.median(cpu[order]):.0f} | {1e3 * np.median(one[order]):.2f} |")
        del rec
    LeafHead.leaf_order = True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--leaves", type=int, default=8192, help="leaves of the kernel's catalog (8,192: ~122 items)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20, help="timed calls per setting (median)")
    p.add_argument("--end-to-end", action="store_true", help="also recommend() at --items (a few minutes)")
    p.add_argument("--singles", type=int, default=100, help="end to end: one-user calls per setting")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    print(f"# leaf scores, {a.items:,} items, {a.leaves:,} leaves, C {a.dim}, {a.threads} threads, "
          f"torch {torch.__version__}")
    kernel_table(a.items, a.leaves, a.dim, a.reps)
    if a.end_to_end:
        end_to_end(a.items, a.reps, a.singles)


if __name__ == "__main__":
    main()
