"""Training step cost per target: one example per prefix (with and without the EOS step) vs packed
prefixes (causal encoder).

    python benchmarks/bench_train_step.py [--config configs/beauty-whole-narrow-endpos-ls.json] [--steps 30]

Reads `$GENREC_DATA_DIR/beauty/sequential_data.txt` (default ../shared/data), builds one trainer per mode,
times `--steps` optimizer steps of finetuning batches on one thread and prints ms per step and per target.
"""
import argparse
import dataclasses
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from genrec_fast.config import load_config
from genrec_fast.data import load
from genrec_fast.train import IGNORE, Trainer, to_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/beauty-whole-narrow-endpos-ls.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--causal-max-items", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load(os.path.join(os.environ.get("GENREC_DATA_DIR", "../shared/data"), "beauty/sequential_data.txt"), "p5")
    print("| finetuning batches | steps/epoch | ms/step | targets/step | ms/target |\n|---|---|---|---|---|")
    modes = {"one per prefix": (False, True), "one per prefix, no EOS step (item_eos=False)": (False, False),
             "packed prefixes (causal)": (True, True)}
    for name, (causal, item_eos) in modes.items():
        p = load_config(args.config)
        p.model = dataclasses.replace(p.model, encoder_causal=causal, item_eos=item_eos)
        if causal:
            p.train = dataclasses.replace(p.train, max_items=args.causal_max_items)
        with tempfile.TemporaryDirectory() as out:
            tr = Trainer(data, out, p, progress=False)
            parts = tr.epoch_batches(pretrain=False)
            tr.model.train()
            targets, t0 = 0, time.perf_counter()
            for part in parts[:args.steps]:
                kwargs, labels = to_batch(part, tr.tokenizer, tr.model.cfg, "cpu")
                loss = F.cross_entropy(tr.model(**kwargs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
                tr.opt.zero_grad()
                loss.backward()
                tr.opt.step()
                targets += len(part) if not causal else sum(len(w.items) - 1 for w in part)
            ms = (time.perf_counter() - t0) / args.steps * 1000
            per = targets / args.steps
            print(f"| {name} | {len(parts)} | {ms:.0f} | {per:.0f} | {ms / per:.2f} |")


if __name__ == "__main__":
    main()
