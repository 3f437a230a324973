"""Training step with the fused LM head + loss (`GenRec.head_loss`, `loss.linear_cross_entropy`) against
the reference (the model's (B, T, V) logits, then `F.cross_entropy` with label smoothing), on Beauty.

    python benchmarks/bench_head_loss.py [--config configs/beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json]
        [--device cpu|cuda] [--threads 1] [--steps 200]

Reads `$GENREC_DATA_DIR/beauty/sequential_data.txt` (default ../shared/data). Both modes run the same
finetuning batches from the same weights, alternating (reference, fused) three times; prints the median
ms per step (forward, backward, optimizer) and how far the two losses of the first step differ.
"""
import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from genrec_fast.config import load_config
from genrec_fast.data import load
from genrec_fast.train import IGNORE, Trainer, cuda_matmul_tf32, to_batch


def step_loss(model, kwargs, labels, smoothing: float, fused: bool) -> torch.Tensor:
    if fused:
        return model.head_loss(model.hidden(**kwargs), labels, smoothing, IGNORE)
    logits = model(**kwargs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, label_smoothing=smoothing)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    data = load(os.path.join(os.environ.get("GENREC_DATA_DIR", "../shared/data"), "beauty/sequential_data.txt"), "p5")
    p = load_config(args.config)
    smoothing = p.train.label_smoothing
    with tempfile.TemporaryDirectory() as out, cuda_matmul_tf32(p.train.tf32 and dev.type == "cuda"):
        tr = Trainer(data, out, p, device=args.device, progress=False)
        batches = [to_batch(part, tr.tokenizer, tr.model.cfg, dev) for part in tr.epoch_batches(False)[:args.steps]]
        start = copy.deepcopy(tr.model.state_dict())
        with torch.no_grad():  # the two losses on the first batch, same weights, no dropout
            tr.model.eval()
            a, b = (step_loss(tr.model, *batches[0], smoothing, fused) for fused in (False, True))
        ms = {False: [], True: []}
        for _ in range(3):
            for fused in (False, True):
                tr.model.load_state_dict(start)
                tr.model.train()
                opt = torch.optim.AdamW(tr.model.parameters(), lr=p.train.lr)
                step_loss(tr.model, *batches[0], smoothing, fused).backward()  # warm-up
                opt.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                for kwargs, labels in batches:
                    loss = step_loss(tr.model, kwargs, labels, smoothing, fused)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sync()
                ms[fused].append((time.perf_counter() - t0) / len(batches) * 1000)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{args.config} on {name}: {len(batches)} finetuning steps of {p.train.batch_size} examples, "
          f"vocabulary {tr.model.cfg.vocab_size}; first-batch loss reference {a.item():.6f}, fused {b.item():.6f} "
          f"(|diff| {abs(a.item() - b.item()):.1e})")
    print("| head + loss | ms/step (median of 3) | runs |\n|---|---|---|")
    for fused, name in ((False, "reference: logits, then F.cross_entropy"), (True, "fused: linear_cross_entropy")):
        print(f"| {name} | {statistics.median(ms[fused]):.1f} | {', '.join(f'{x:.1f}' for x in ms[fused])} |")
    print(f"speed-up: {statistics.median(ms[False]) / statistics.median(ms[True]):.2f}x")


if __name__ == "__main__":
    main()
