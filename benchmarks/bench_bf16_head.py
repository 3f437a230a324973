"""recommend() of a one-token model with the float head against the bfloat16 head (`Recommender.head_precision`,
bf16_head.py), on a CPU with AVX512-BF16, calls alternating in one process.

    python benchmarks/bench_bf16_head.py [--sizes 100000,1000000] [--forms transition-both,whole] [--threads 2]

bench_catalog.py's model and histories (random weights, d 64, top 20); per size and form: users/s at batch 256
(--batches calls each, medians), batch-1 p50 (--singles calls each), whether both return the same items for the
256 users, and the largest score difference (the bfloat16 head's normaliser: its logits are re-scored in float).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_versions  # noqa: E402
import bench_catalog as bc  # noqa: E402

import genrec_fast  # noqa: E402
from genrec_fast import bf16_head  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def compare(n: int, form: str, batches: int, singles: int) -> str:
    rec = ab_versions.build(genrec_fast, n, form)
    hists = [[f"item{i}" for i in h] for h in bc.histories(n, bc.BATCH)]
    out = {}
    for p in PRECISIONS:
        rec.head_precision = p
        out[p] = genrec_fast.recommend(rec, hists, k=bc.TOP_K)
    same = all(a.items == b.items for a, b in zip(*out.values()))
    diff = max(float(np.max(np.abs(np.asarray(a.scores) - np.asarray(b.scores)))) for a, b in zip(*out.values()))
    batch, one = {p: [] for p in PRECISIONS}, {p: [] for p in PRECISIONS}
    for i in range(batches + singles):
        for p in (PRECISIONS if i % 2 else PRECISIONS[::-1]):
            rec.head_precision = p
            h = hists if i < batches else hists[i % bc.BATCH:i % bc.BATCH + 1]
            t = time.perf_counter()
            genrec_fast.recommend(rec, h, k=bc.TOP_K)
            (batch if i < batches else one)[p].append(time.perf_counter() - t)
    ups = {p: bc.BATCH / statistics.median(v) for p, v in batch.items()}
    p50 = {p: statistics.median(v) for p, v in one.items()}
    return (f"| {n:,} | {form} | {ups['float32']:,.0f} | {ups['bfloat16']:,.0f} | "
            f"{ups['bfloat16'] / ups['float32']:.2f}x | {1e3 * p50['float32']:.2f} | {1e3 * p50['bfloat16']:.2f} | "
            f"{p50['float32'] / p50['bfloat16']:.2f}x | {same} ({diff:.1e}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--forms", default="transition-both,whole", help="bench_catalog's one-token forms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--singles", type=int, default=60)
    args = ap.parse_args()
    if not bf16_head.supported():
        sys.exit("this CPU has no AVX512-BF16 (or GENREC_CPU_ISA asks for less): the bfloat16 head cannot run here")
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} threads, batch {bc.BATCH}, top {bc.TOP_K}, torch {torch.__version__}")
    print("| items | form | float32 users/s | bfloat16 users/s | | float32 batch-1 ms | bfloat16 batch-1 ms | "
          "| same items (max score diff) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for n in map(int, args.sizes.split(",")):
        for form in args.forms.split(","):
            print(compare(n, form, args.batches, args.singles), flush=True)


if __name__ == "__main__":
    main()
