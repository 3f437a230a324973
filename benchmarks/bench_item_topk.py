"""The one-token head + top-k for a few users over a large catalog (CPU): the fused C++ head, which splits the
catalog over the threads when the users are too few to give each thread a 16-user tile, against the matmul +
C++ scan path (torch's product, then `StreamingTopK.add`) and plain torch (`mm`, `topk`, `logsumexp`).

    python benchmarks/bench_item_topk.py [--threads 2] [--sizes 100000,1000000] [--users 1,4,8,15,16,32]

d 64, top 20, random weights; each row's three paths are timed call by call in alternation (medians), and the
fused path's items and scores are checked against the matmul + scan path's.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from genrec_fast.item_topk import Head, item_topk

TOP_K, DIM = 20, 64


def plain_torch(x: torch.Tensor, w: torch.Tensor):
    z = x @ w.T  # (U, V)
    values, items = torch.topk(z, TOP_K)
    return items, values - torch.logsumexp(z, 1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="100000,1000000", help="catalog sizes, comma-separated")
    ap.add_argument("--users", default="1,4,8,15,16,32", help="users per call, comma-separated")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per path (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# item_topk, d {DIM}, top {TOP_K}, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| items | users | fused ms | matmul + scan ms | torch mm + topk + logsumexp ms | fused speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    for V in (int(s) for s in args.sizes.split(",")):
        w = torch.randn(V, DIM) * 0.1  # (V, d)
        for U in (int(s) for s in args.users.split(",")):
            x = torch.randn(U, DIM)  # (U, d)
            paths = {
                "fused": lambda: item_topk([Head(x, w, None)], 0, V, TOP_K, threads=args.threads, fused=True),
                "scan": lambda: item_topk([Head(x, w, None)], 0, V, TOP_K, threads=args.threads, fused=False),
                "torch": lambda: plain_torch(x, w),
            }
            fused, scan = paths["fused"](), paths["scan"]()
            np.testing.assert_array_equal(fused[0], scan[0])
            np.testing.assert_allclose(fused[1], scan[1], atol=1e-5)
            times = {name: [] for name in paths}
            for _ in range(args.calls):
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(1e3 * (time.perf_counter() - t0))
            ms = {name: statistics.median(t) for name, t in times.items()}
            print(f"| {V:,} | {U} | {ms['fused']:.2f} | {ms['scan']:.2f} | {ms['torch']:.2f} | "
                  f"{ms['scan'] / ms['fused']:.2f}x |")


if __name__ == "__main__":
    main()
