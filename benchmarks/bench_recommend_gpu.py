"""End-to-end recommend() throughput on a GPU (CUDA attention kernels) vs the CPU path, same model.

Model: random weights, d_model 256, 2+2 layers, 4 heads, FFN 1024, a 12,000-item catalog, 20-item
histories, 20 beams, top 20 (the issue-3 benchmark config). Prints a markdown table (users/s).
Usage: python benchmarks/bench_recommend_gpu.py [--batch 256] [--cpu-batch 32] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from genrec_fast import ModelConfig, Recommender

DIMS = dict(d_model=256, encoder_layers=2, decoder_layers=2, n_heads=4, ffn_dim=1024)


def users_per_s(rec: Recommender, histories: list, repeats: int, sync) -> float:
    rec.recommend(histories, k=20, num_beams=20, batch_size=len(histories))  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        rec.recommend(histories, k=20, num_beams=20, batch_size=len(histories))
        sync()
        times.append(time.perf_counter() - t0)
    return len(histories) / statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256, help="users per GPU batch")
    ap.add_argument("--cpu-batch", type=int, default=32, help="users per CPU batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--items", type=int, default=12000)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.batch, args.cpu_batch, args.repeats = 500, 8, 4, 1
    items = list(range(1, args.items + 1))
    rec = Recommender.random(items, ModelConfig(**DIMS), vocab_size=1000)
    rng = np.random.default_rng(0)
    hist = lambda n: [list(rng.choice(items, 20)) for _ in range(n)]  # noqa: E731
    rows = [("cpu fp32", args.cpu_batch, users_per_s(rec, hist(args.cpu_batch), args.repeats, lambda: None))]
    if torch.cuda.is_available():
        rec.model.to("cuda")
        for dtype in (torch.float32, torch.bfloat16):
            rec.model.to(dtype)
            rows.append((f"cuda {str(dtype)[6:]}", args.batch,
                         users_per_s(rec, hist(args.batch), args.repeats, torch.cuda.synchronize)))
        rec.model.float()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"recommend() end to end, {args.items} items, 20 beams, top 20 ({name}, torch threads "
          f"{torch.get_num_threads()})\n\n| path | batch | users/s |\n|---|---|---|")
    for path, batch, ups in rows:
        print(f"| {path} | {batch} | {ups:.1f} |")


if __name__ == "__main__":
    main()
