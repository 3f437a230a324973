"""Where one recommend() call spends its time: torch.profiler's top operators, host and device.

Same model and catalog as bench_recommend_gpu.py (random d_model-256 2+2 model, 12,000 items, 20 beams,
top 20). Prints the wall time per call and, per batch size, the operators by self host time (and by
device time on a GPU), so a host-bound call (batch 1 on a GPU) shows which steps to cut.
Usage: python benchmarks/profile_recommend.py [--device cuda] [--batches 1 32] [--calls 5] [--rows 15]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from bench_recommend_gpu import DIMS  # the same model (benchmarks/ is the script's folder, on sys.path)
from genrec_fast import ModelConfig, Recommender


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per batch size")
    ap.add_argument("--rows", type=int, default=15, help="operators listed per table")
    ap.add_argument("--items", type=int, default=12000)
    args = ap.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no GPU")
    items = list(range(1, args.items + 1))
    rec = Recommender.random(items, ModelConfig(**DIMS), vocab_size=1000)
    rec.model.to(args.device)
    rng = np.random.default_rng(0)
    gpu = args.device != "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for batch in args.batches:
        histories = [list(rng.choice(items, 20)) for _ in range(batch)]
        call = lambda: rec.recommend(histories, k=20, num_beams=20, batch_size=batch)  # noqa: E731
        for _ in range(3):
            call()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        sync()
        print(f"\n## batch {batch}: {(time.perf_counter() - t0) / args.calls * 1e3:.2f} ms per call "
              f"({args.device}, mean of {args.calls})")
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                call()
            sync()
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if gpu:
            print(averages.table(sort_by="self_device_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
