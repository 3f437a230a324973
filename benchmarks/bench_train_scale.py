"""Training at catalog scale: one finetuning epoch of the narrow one-token model over a million items.

    python benchmarks/bench_train_scale.py [--items 1000000] [--users 200000] [--threads 1]
        [--softmax sampled] [--eval-users 500]   # one epoch in a fresh subprocess (~4 min at 1M, one thread)
    python benchmarks/bench_train_scale.py --steps 8 --items 12101 1000000   # ms per step: full vs sampled
    python benchmarks/bench_train_scale.py --checkpoint                      # checkpoint save/load times
    python benchmarks/bench_train_scale.py --recommended --threads 2 --eval-users 2000  # the recommended
        # configuration (both biases) sampled: its epoch, validation and calibration's pass over 2,000 users
    python benchmarks/bench_train_scale.py --steps 6 --recommended --items 12101 1000000  # its step: full vs sampled

Data: SYNTHETIC (`synthetic_catalog`): every item has a planted successor, followed 75% of the time,
else a Zipf-popular item; 5-10 items per user; built with numpy alone (no Python loop per item or
user), as a SequenceData whose catalog holds all `--items` items (at 1M items and 200,000 users, 40% never
occur, as in a real long tail; `data.from_user_sequences` takes 1.4 s on these histories but keeps only the
599k items that occur).
Model: configs/beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json (d_model 64, FFN 256, 2 heads, 2+2 layers,
one token per item, no EOS step) with pretrain_epochs=0, finetune_epochs=1, train.softmax=`--softmax`.

The epoch runs in a fresh subprocess that reports the wall time of each phase (data, tokenizer, trainer
set-up, epoch, validation, checkpoint save and load) and its peak RSS (VmHWM; the parent checks it
against getrusage(RUSAGE_CHILDREN)). The last line reads
`train_scale_bench items=<n> users=<u> epoch_s=<x> train_rss_gb_1m=<y>`. Other scripts import
`measure_train(items, users, threads)` (add this directory to sys.path).

Measured 2026-12-01 on this project's 2-core x86_64 CPU (shared with other work), torch 2.13.0+cpu, one
thread. Steps (`--steps 20 --items 12101 --users 22363`, `--steps 8 --items 1000000`), median ms:

| items | softmax | fwd+bwd | clip+optimizer | step |
|---|---|---|---|---|
| 12,101 | full (fused chunked head, dense AdamW) | 34.1 | 3.2 | 37.3 |
| 12,101 | sampled, dense AdamW | 22.2 | 3.2 | 25.5 |
| 12,101 | sampled, sparse tables + SparseAdam (train.softmax="sampled") | 22.7 | 4.2 | 26.9 |
| 1,000,000 | full | 2269.0 | 111.9 | 2380.8 |
| 1,000,000 | sampled, dense AdamW | 469.3 | 108.1 | 577.4 |
| 1,000,000 | sampled, sparse tables + SparseAdam | 17.5 | 4.5 | 22.1 |

One epoch at 1,000,000 items, 200,000 users (7,031 steps of 128): data 1.1 s, tokenizer 0.4 s, trainer
set-up 2.8 s, epoch 201 s (28.6 ms a step with batching), validation of 500 users 2.3 s, checkpoint save
4.3 s (1.5 GB with the optimizer state), load 1.8 s; peak RSS 2.54 GB through validation, 3.12 GB with
the checkpoint load (a second model). Last line:
`train_scale_bench items=1000000 users=200000 epoch_s=201.17 train_rss_gb_1m=3.12`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "beauty-whole-narrow-pre3-ls3-noeos-hdrop3.json"


def synthetic_catalog(n_items: int, n_users: int, seed: int = 0, follow_prob: float = 0.75,
                      lengths: tuple[int, int] = (5, 10)):
    """SYNTHETIC SequenceData of `n_users` histories over a catalog of `n_items` items, vectorised:
    one numpy step per history position, over all users at once."""
    from genrec_fast.data import SequenceData
    rng = np.random.default_rng(seed)
    succ = rng.permutation(n_items)  # (N,) each item's planted successor
    cdf = np.cumsum(rng.permutation(1.0 / np.arange(1, n_items + 1) ** 0.8))  # (N,) Zipf popularity, shuffled
    cdf /= cdf[-1]

    def popular(k: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(k)), n_items - 1)  # (k,)

    lo, hi = lengths
    seqs = np.empty((n_users, hi), dtype=np.int64)  # (U, hi)
    seqs[:, 0] = popular(n_users)
    for t in range(1, hi):
        follow = rng.random(n_users) < follow_prob  # (U,)
        seqs[:, t] = np.where(follow, succ[seqs[:, t - 1]], popular(n_users))
    n = rng.integers(lo, hi + 1, n_users)  # (U,) history lengths
    flat = seqs[np.arange(hi) < n[:, None]]  # (sum n,) row-major: user by user
    sequences = np.split(flat, np.cumsum(n)[:-1])
    codes = (rng.permutation(n_items) + 1).astype(str).tolist()  # random item codes, as id_order="random"
    return SequenceData(list(range(1, n_users + 1)), list(range(1, n_items + 1)), sequences, codes,
                        name=f"synthetic catalog ({n_items} items, planted successors)")


def bench_preset(softmax: str = "sampled", eval_users: int = 500, threads: int = 1, num_negatives: int = 1024,
                 recommended: bool = False):
    """The narrow model of CONFIG, or (recommended) the preset "recommended" (both biases; its calibration
    timed apart by `run_epoch`), for one finetuning epoch."""
    from genrec_fast.config import load_config
    p = load_config("recommended" if recommended else str(CONFIG))
    p.train = dataclasses.replace(p.train, pretrain_epochs=0, finetune_epochs=1, eval_users=eval_users,
                                  softmax=softmax, num_negatives=num_negatives, threads=threads, calibrate=False)
    return p


def _rss_gb() -> dict:
    """Current and peak resident memory of this process, GB (from /proc/self/status)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 2**20, 3) for k in ("VmRSS", "VmHWM")}


def _timed(out: dict, name: str, fn):
    t0 = time.perf_counter()
    value = fn()
    out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    out[f"{name}_rss_gb"] = _rss_gb()
    return value


def run_epoch(items: int, users: int, threads: int, softmax: str = "sampled", eval_users: int = 500,
              recommended: bool = False) -> dict:
    """One finetuning epoch in this process -> phase times (s) and memory (GB); with `recommended`, also
    calibration's pass over `eval_users` validation users."""
    import torch
    from genrec_fast import checkpoint
    from genrec_fast.data import leave_one_out
    from genrec_fast.evaluate import evaluate, model_ranker
    from genrec_fast.tokenizer import GenRecTokenizer
    from genrec_fast.train import Trainer
    torch.set_num_threads(threads)
    p = bench_preset(softmax, eval_users, threads, recommended=recommended)
    out: dict = {"items": items, "users": users, "threads": threads, "softmax": softmax, "recommended": recommended}
    data = _timed(out, "data", lambda: synthetic_catalog(items, users))
    train_part = leave_one_out(data).train
    _timed(out, "tokenizer", lambda: GenRecTokenizer.train(train_part, data.item_codes, p.tokenizer.vocab_size,
                                                           p.tokenizer.item_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        tr = _timed(out, "trainer_init", lambda: Trainer(data, tmp, p, progress=False))  # trains the tokenizer again
        out["steps"] = tr.steps_per_epoch(False)
        out["loss"] = _timed(out, "epoch", lambda: tr.train_epoch(False))
        tr.epoch += 1
        ranker = _timed(out, "recommender", lambda: model_ranker(tr.recommender(), tr.tcfg.num_beams))
        valid = _timed(out, "validate", lambda: evaluate(ranker, tr.split, "valid", tr.eval_users, progress=False))
        out["valid_ndcg10"] = valid["NDCG@10"]
        if recommended:
            from genrec_fast.calibrate import candidates
            _timed(out, "calibrate_pass", lambda: candidates(tr.recommender(), tr.split, np.arange(eval_users),
                                                             progress=False))
        _timed(out, "save", lambda: tr._save("last", with_state=True))
        _timed(out, "load", lambda: checkpoint.load_parts(Path(tmp) / "last"))
        out["checkpoint_gb"] = round(sum(f.stat().st_size for f in (Path(tmp) / "last").iterdir()) / 2**30, 3)
    out["step_ms"] = round(1000 * out["epoch_s"] / max(1, out["steps"]), 1)
    out["peak_rss_gb"] = _rss_gb()["VmHWM"]
    return out


def measure_train(items: int, users: int, threads: int, softmax: str = "sampled", eval_users: int = 500,
                  recommended: bool = False) -> dict:
    """`run_epoch` in a fresh subprocess (so its peak RSS is the epoch's alone) -> its dict, plus
    `rusage_children_peak_gb` (the peak over every child this process has waited for)."""
    cmd = [sys.executable, __file__, "--child", "--items", str(items), "--users", str(users),
           "--threads", str(threads), "--softmax", softmax, "--eval-users", str(eval_users)] + (
        ["--recommended"] if recommended else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rusage_children_peak_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)
    return out


def time_checkpoint(items: int, users: int) -> dict:
    """Seconds to build a whole-item tokenizer, the narrow model and a Catalog over `items` items, then to
    save them (`checkpoint.save`) and load them back (`checkpoint.load_parts`), with the parts of loading."""
    import dataclasses as dc
    import torch
    from genrec_fast import checkpoint
    from genrec_fast.data import Catalog
    from genrec_fast.model import GenRec
    from genrec_fast.tokenizer import GenRecTokenizer
    p, out = bench_preset(), {"items": items, "users": users}
    codes = (np.random.default_rng(0).permutation(items) + 1).astype(str).tolist()
    tok = _timed(out, "tokenizer_train", lambda: GenRecTokenizer.train([], codes, p.tokenizer.vocab_size, "whole"))
    cfg = dc.replace(p.model, vocab_size=tok.vocab_size, n_users=users, n_items=items)
    model = _timed(out, "model_init", lambda: GenRec(cfg))
    catalog = _timed(out, "catalog", lambda: Catalog(list(range(1, items + 1)), codes, list(range(1, users + 1))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        _timed(out, "save", lambda: checkpoint.save(path, model, tok, catalog, p.train))
        _timed(out, "tokenizer_load", lambda: GenRecTokenizer.load(path, codes))
        _timed(out, "catalog_json_load", lambda: Catalog(**json.loads((path / "catalog.json").read_text())))
        _timed(out, "weights_load", lambda: torch.load(path / "weights.pt", weights_only=True))
        again = _timed(out, "load_parts", lambda: checkpoint.load_parts(path))
        out["same_weights"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                     again[0].state_dict().values()))
        out["files_mb"] = {f.name: round(f.stat().st_size / 2**20, 1) for f in path.iterdir()}
    return out


# ---------------------------------------------------------------- step timing: full vs sampled softmax


def _step_setups(tr, mode: str):
    """(loss function, optimizers, clip) of one training mode on trainer `tr` (built with softmax="sampled")."""
    import torch
    from genrec_fast.train import IGNORE, clip_grad_norm
    tables = [tr.model.shared, tr.model.item_embed, tr.model.user_embed]
    sparse = mode == "sampled"
    for t in tables:
        t.sparse = sparse and t.weight.requires_grad
    params = [q for q in tr.model.parameters() if q.requires_grad]
    if sparse:
        opts = [tr.opt, tr.sparse_opt]
    else:  # every parameter in one fused AdamW, as the full-softmax trainer has it
        opts = [torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)]

    def loss_fn(kwargs, labels):
        if mode == "full":
            return tr.model.head_loss(tr.model.hidden(**kwargs), labels, tr.tcfg.label_smoothing, IGNORE)
        from genrec_fast.loss import sampled_cross_entropy
        hidden, y = tr.model.hidden(**kwargs)[:, 0], labels[:, 0]
        cands, log_q = tr.sampler.draw(y, tr.rng)
        return sampled_cross_entropy(hidden, tr.model.shared.weight, tr.model.final_logits_bias[0], y, cands,
                                     log_q, tr.tcfg.label_smoothing, IGNORE, sparse=sparse)

    clip = (lambda: clip_grad_norm(params, 1.0)) if sparse else (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
    return loss_fn, opts, clip


def time_steps(items: int, users: int, threads: int, steps: int, modes=("full", "sampled-dense", "sampled")) -> list:
    """Median ms per step of each mode: forward + backward, then clip + optimizer, on the same batches."""
    import torch
    from genrec_fast.train import Trainer, to_batch
    torch.set_num_threads(threads)
    data = synthetic_catalog(items, users)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(data, tmp, bench_preset("sampled", 100, threads), progress=False)
        parts = tr.epoch_batches(False)[:steps + 2]
        batches = [to_batch(part, tr.tokenizer, tr.model.cfg, "cpu") for part in parts]
        tr.model.train()
        for mode in modes:
            loss_fn, opts, clip = _step_setups(tr, mode)
            fwd_bwd, update = [], []
            for kwargs, labels in batches:
                t0 = time.perf_counter()
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss_fn(kwargs, labels).backward()
                t1 = time.perf_counter()
                clip()
                for o in opts:
                    o.step()
                fwd_bwd.append(t1 - t0)
                update.append(time.perf_counter() - t1)
            f, u = 1000 * statistics.median(fwd_bwd[2:]), 1000 * statistics.median(update[2:])  # 2 warm-up steps
            rows.append({"items": items, "mode": mode, "fwd_bwd_ms": round(f, 1), "update_ms": round(u, 1),
                         "step_ms": round(f + u, 1)})
    return rows


def time_recommended_steps(items: int, users: int, threads: int, steps: int, codes: bool = False) -> list:
    """Median ms per step of the recommended configuration (preset "recommended": history + transition bias,
    both directions) with the full and the sampled softmax, or (`codes`) of the codes preset (leaves of ~96
    items) with dense and with sparse tables (train.sparse_tables), through the trainer's own step (`_backward`,
    clip, optimizers), and each trainer's set-up (the codes and the neighbour table are built there)."""
    import torch
    from genrec_fast.collab_codes import branches_for
    from genrec_fast.config import preset, with_overrides
    from genrec_fast.train import Trainer, clip_grad_norm
    torch.set_num_threads(threads)
    data = synthetic_catalog(items, users)
    common = {"train.pretrain_epochs": 0, "train.finetune_epochs": 1, "train.eval_users": 100,
              "train.calibrate": False, "train.threads": threads}
    if codes:
        base = with_overrides(preset("codes"), {**common, "tokenizer.code_branches": branches_for(items, 1)})
        modes = {"codes, dense tables": {"train.sparse_tables": False}, "codes, sparse tables": {
            "train.sparse_tables": True}}
    else:
        base = with_overrides(preset("recommended"), {**common, "train.num_negatives": 1024})
        modes = {f"recommended, {s}": {"train.softmax": s} for s in ("full", "sampled")}
    rows = []
    for mode, overrides in modes.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            tr = Trainer(data, tmp, with_overrides(base, overrides), progress=False)
            init_s = time.perf_counter() - t0
            tr.model.train()
            times = []
            for part in tr.epoch_batches(False)[:steps + 2]:
                t0 = time.perf_counter()
                tr._backward(part)
                clip_grad_norm(tr.params, tr.tcfg.grad_clip)
                for o in tr.optimizers:
                    o.step()
                times.append(time.perf_counter() - t0)
            rows.append({"items": items, "mode": mode, "step_ms": round(1000 * statistics.median(times[2:]), 1),
                         "trainer_init_s": round(init_s, 1), "steps_per_epoch": tr.steps_per_epoch(False)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--softmax", default="sampled", choices=("full", "sampled"))
    ap.add_argument("--eval-users", type=int, default=500)
    ap.add_argument("--steps", type=int, default=0, help="time this many steps per mode instead of an epoch")
    ap.add_argument("--checkpoint", action="store_true", help="time checkpoint save/load instead of an epoch")
    ap.add_argument("--recommended", action="store_true",
                    help="the recommended configuration (both biases): with --steps full vs sampled softmax, else "
                         "its epoch and calibration's pass over --eval-users users")
    ap.add_argument("--codes", action="store_true",
                    help="with --steps: the codes preset (leaf head, both biases) with dense vs sparse tables")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_epoch(args.items[0], args.users, args.threads, args.softmax, args.eval_users,
                                   args.recommended)))
        return
    import platform
    import torch
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    if args.checkpoint:
        for n in args.items:
            print(json.dumps(time_checkpoint(n, args.users), indent=1))
        return
    if args.steps and (args.recommended or args.codes):
        print("| items | configuration, softmax | step ms | trainer set-up s | steps an epoch |\n|---|---|---|---|---|")
        for n in args.items:
            for r in time_recommended_steps(n, args.users, args.threads, args.steps, args.codes):
                print(f"| {r['items']:,} | {r['mode']} | {r['step_ms']} | {r['trainer_init_s']} | "
                      f"{r['steps_per_epoch']:,} |", flush=True)
        return
    if args.steps:
        print("| items | softmax | fwd+bwd ms | clip+optimizer ms | step ms |\n|---|---|---|---|---|")
        for n in args.items:
            for r in time_steps(n, args.users, args.threads, args.steps):
                print(f"| {r['items']:,} | {r['mode']} | {r['fwd_bwd_ms']} | {r['update_ms']} | {r['step_ms']} |",
                      flush=True)
        return
    for n in args.items:
        out = measure_train(n, args.users, args.threads, args.softmax, args.eval_users, args.recommended)
        print(json.dumps(out, indent=1))
        print(f"train_scale_bench items={n} users={args.users} epoch_s={out['epoch_s']} "
              f"train_rss_gb_1m={out['peak_rss_gb']}")


if __name__ == "__main__":
    main()
