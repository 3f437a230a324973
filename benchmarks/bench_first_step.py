"""The C++ first step (csrc/first_step.cpp) against the PyTorch ops it replaces, and what it does to recommend().

Model: the recommended configuration's shape (one token per item, d_model 64, 2+2 layers, 2 heads, FFN 256, history
+ transition bias in both directions; random weights, a full random neighbour table: bench_catalog.py's
"transition-both" form) at 12,101 items (Amazon Beauty's size). One process, the paths timed call by call in turn
(`bench_catalog.median_times`), so each row saw the same minutes of this noisy VM:

1. the first step alone (`first_step` against `first_step_reference`: encoder, first decoder step, bias pairs) at
   batch 1, 16 and 256;
2. `recommend(k=20)` from original ids, with the C++ first step and with the PyTorch ops (each forced by patching
   `decoding.use_first_step`; by default the C++ step runs up to `first_step.USERS_PER_THREAD` users a thread), and
   the SASRec-style reference of bench_catalog.py: batch-1 p50 ms and users/s at batch 256.

Usage: python benchmarks/bench_first_step.py [--threads 2] [--items 12101] [--singles 300] [--batches 12]
       [--form transition-both|codes|leaf-transition]
"""
from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

import bench_catalog as bc
import genrec_fast.decoding as decoding
from genrec_fast.first_step import first_step, first_step_reference, unusable, unusable_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--singles", type=int, default=300, help="timed one-user calls per path (median)")
    p.add_argument("--batches", type=int, default=12, help="timed calls per path at batch 16 / 256 (median)")
    p.add_argument("--form", default="transition-both", choices=("transition-both", "codes", "leaf-transition"),
                   help="bench_catalog.py's model form: the recommended one-token model (default), or a trie-search "
                        "model (codes; leaf-head codes with both biases, 1 level of ~95-item leaves), which takes "
                        "the C++ encoder only (no first-step table)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rec, _ = bc.build(a.items, form=a.form, levels=1 if a.form.startswith("leaf") else 2,
                      leaf=95 if a.form.startswith("leaf") else 16)
    hist = bc.histories(a.items, 256 * 4)
    ids = rec.catalog.item_ids
    print(f"# first step: C++ vs PyTorch | {platform.processor() or platform.machine()}, {a.threads} threads, "
          f"torch {torch.__version__} | {datetime.date.today()} | {a.items} items, form {a.form}")
    if a.form == "transition-both":
        print("| batch | C++ first step ms | PyTorch ops ms | speed-up |\n|---:|---:|---:|---:|")
    for B in (1, 16, 256) if a.form == "transition-both" else ():
        encs = [rec.encode_batch([np.asarray(h) for h in hist[i * B:(i + 1) * B]], [None] * B)
                for i in range(min(8, len(hist) // B))]
        t = bc.median_times({"cpp": lambda i: first_step(rec.model, encs[i % len(encs)]),
                             "torch": lambda i: first_step_reference(rec.model, encs[i % len(encs)])},
                            a.singles if B == 1 else a.batches, warmup=2)
        print(f"| {B} | {1e3 * t['cpp']:.3f} | {1e3 * t['torch']:.3f} | {t['torch'] / t['cpp']:.1f}x |")

    sas = bc.SASRec(a.items).eval()
    real = decoding.use_first_step
    def on(model, enc, encoder_only=False):  # the C++ path wherever it can run, whatever the batch
        return (unusable_encoder if encoder_only else unusable)(model, enc) is None
    off = lambda model, enc, encoder_only=False: False  # noqa: E731

    def ours(native: bool, calls: list):
        def fn(i):
            decoding.use_first_step = on if native else off
            try:
                rec.recommend(calls[i % len(calls)], k=bc.TOP_K)
            finally:
                decoding.use_first_step = real
        return fn

    singles = [[[ids[i] for i in h]] for h in hist[:a.singles]]
    batches = [[[ids[i] for i in h] for h in hist[b * 256:(b + 1) * 256]] for b in range(4)]
    s_single = [bc.sasrec_batch([h]) for h in hist[:a.singles]]
    s_batch = [bc.sasrec_batch(hist[b * 256:(b + 1) * 256]) for b in range(4)]
    one = bc.median_times({"cpp": ours(True, singles), "torch": ours(False, singles),
                           "sasrec": lambda i: sas.recommend(s_single[i % len(s_single)], bc.TOP_K)}, a.singles, 5)
    many = bc.median_times({"cpp": ours(True, batches), "torch": ours(False, batches),
                            "sasrec": lambda i: sas.recommend(s_batch[i % len(s_batch)], bc.TOP_K)}, a.batches, 1)
    print("\n| recommend(k=20) | batch-1 p50 ms | users/s (batch 256) |\n|---|---:|---:|")
    for name, label in (("cpp", "C++ first step (trie-search forms: the C++ encoder)"), ("torch", "PyTorch ops"),
                        ("sasrec", "SASRec-style reference")):
        print(f"| {label} | {1e3 * one[name]:.2f} | {256 / many[name]:,.0f} |")
    print(f"first_step_bench batch1_ms={1e3 * one['cpp']:.2f} torch_batch1_ms={1e3 * one['torch']:.2f} "
          f"sasrec_batch1_ms={1e3 * one['sasrec']:.2f}")


if __name__ == "__main__":
    main()
