"""Building a training batch: `encode_padded` (one slice copy per row) against the reference it replaced
(`pad_encoder` over one `tokenizer.encode` per example), on Beauty's finetuning batches.

    python benchmarks/bench_batching.py [--config configs/beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json]
        [--batches 300]

Reads `$GENREC_DATA_DIR/beauty/sequential_data.txt` (default ../shared/data). Both build the encoder
tensors of the same batches, alternating three times; prints the median ms per batch of each and checks
that the tensors are equal. (A whole one-thread training step of the same config: ~38 ms on the 2-core
Xeon of 2026-11-28, benchmarks/README.md.)
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from genrec_fast.batching import encode_padded, pad_encoder
from genrec_fast.config import load_config
from genrec_fast.data import load
from genrec_fast.train import Trainer


def reference(tok, part, max_len):
    return pad_encoder([tok.encode(e.items, e.user, e.mask_at, max_len) for e in part])


def fast(tok, part, max_len):
    return encode_padded(tok, [e.items for e in part], [e.user for e in part], [e.mask_at for e in part], max_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json")
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load(os.path.join(os.environ.get("GENREC_DATA_DIR", "../shared/data"), "beauty/sequential_data.txt"), "p5")
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(data, out, load_config(args.config), progress=False)
    tok, max_len = tr.tokenizer, tr.model.cfg.max_positions
    parts = tr.epoch_batches(False)[:args.batches]
    for part in parts:
        a, b = reference(tok, part, max_len), fast(tok, part, max_len)
        assert all(torch.equal(a[k], b[k]) for k in a), "encode_padded differs from the reference"
    ms = {"reference": [], "encode_padded": []}
    for _ in range(3):
        for name, fn in (("reference", reference), ("encode_padded", fast)):
            t0 = time.perf_counter()
            for part in parts:
                fn(tok, part, max_len)
            ms[name].append(1e3 * (time.perf_counter() - t0) / len(parts))
    print(f"{len(parts)} finetuning batches of {tr.tcfg.batch_size}, {tok.item_tokens} item tokens; equal tensors")
    print("| batch encoder | ms/batch (median of 3) | runs |\n|---|---|---|")
    for name, v in ms.items():
        print(f"| {name} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    print(f"speed-up {statistics.median(ms['reference']) / statistics.median(ms['encode_padded']):.1f}x")


if __name__ == "__main__":
    main()
