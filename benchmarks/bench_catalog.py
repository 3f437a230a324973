"""Recommendation at catalog scale: the recommended one-token model against a SASRec-style full ranking.

Rows: the configuration the README recommends (items as one token each, no EOS step, d_model 64, 2+2
layers, 2 heads, FFN 256, 20-item window; random weights: speed does not depend on training) at 12,101 /
100,000 / 1,000,000 items: users/s of `recommend(k=20)` at batch 256, p50 latency of one-user calls, and
the peak RSS of the process (each catalog size runs in a fresh subprocess, so the peaks do not mix).

In each one-token form's process at the smallest size also (timed call by call in turn with ours, so the
ratio holds for the same minutes of this noisy VM): a SASRec-style reference of the same width written here
in plain PyTorch (2 causal self-attention blocks, d 64, 1 head, FFN 64, a 50-item window left-padded as
SASRec does, `h @ E.T` over the catalog, `topk`), fed the same histories. `ratio_vs_sasrec` = our users/s
over its users/s at batch 256 (column "x SASRec-style"; in the last line: the plain one-token form). Its
time covers the padded index tensor and the ranking; ours covers
`recommend()` from original item ids (id lookup, encoding, decoding, ids out).

Histories: seeded random item ids, 5-20 per user (Amazon Beauty's users have ~9 on average).
Optionally (`--train`, `--load`) one finetuning epoch of a 1M-item synthetic catalog and the columnar
CSV loader (benchmarks/bench_train_scale.py, benchmarks/bench_load.py) add their figures.

With `--codes`, the same model over collaborative codes (tokenizer.item_tokens="codes": `--code-levels`
levels (2) of `code_branches(n)` values, leaves of ~`--leaf-size` items (16), and a unique last token;
codes of random vectors: the shape of trained ones; one encoder position per item, no EOS step, as
configs/beauty-codes-first-noeos.json) at every size, decoded by the C++ trie search with 20 beams (top 20).
With `--leaf`, the same codes with the leaf head (model.leaf_head, as configs/beauty-codes-leaf*.json).
With `--history`, the one-token model with model.history_bias and, with `--leaf`, the leaf-head codes with it
(the offsets at every code step, as configs/beauty-codes-leaf-l1-history-bias.json). With `--transition`, the
one-token model with the history and the transition bias (a full neighbour table: 50 random successors of
every item, offsets on the 150 successors of each user's last three items) and, with `--leaf`, the leaf-head
codes with both (as configs/beauty-codes-leaf-l1-history-transition-bias.json). With `--both`, the one-token
model with the transition bias in both directions (50 successors and 50 predecessors a context item: 300 pairs a
user, as configs/whole-history-transition-both-calibrated.json) and, with `--leaf`, the leaf-head codes so (as
configs/beauty-codes-leaf-l1-history-transition-both-calibrated.json). With `--cascade NxB[,NxB]`, those leaf-head
codes with both biases both ways proposing N candidates from a B-beam search that the one-token model with both
biases both ways reranks (cascade.py, as `genrec-fast cascade` builds from the two configs above; weight 0.5).
With `--hybrid N[,N]`, the one-token model with both biases both ways and this package's SASRec (sasrec.py's
defaults: d 64, 2 blocks, 1 head, 50-item window), each proposing its top N, ranked by both (hybrid.py; weight 0.5).

Usage: python benchmarks/bench_catalog.py --threads 2 [--sizes 12101,100000,1000000] [--codes] [--leaf] [--history]
       [--transition] [--both] [--cascade 20x20,100x100] [--hybrid 50]
       [--code-levels 2 --leaf-size 16] [--train] [--load] [--quick]
Last line: catalog_bench ratio_vs_sasrec=<x> batch1_ms=<y> users_per_s_1m=<z> rss_gb_1m=<w> train_rss_gb_1m=<v> load_5m_s=<s> codes_users_per_s_1m=<c> leaf_users_per_s_1m=<l>
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TOP_K, BATCH, WINDOW = 20, 256, 50
MODEL = dict(d_model=64, encoder_layers=2, decoder_layers=2, n_heads=2, ffn_dim=256,
             encoder_positions="end", dropout=0.0)


def code_branches(n_items: int, levels: int = 2, leaf: int = 16) -> int:
    """Values per code level whose leaves hold ~`leaf` items (`collab_codes.branches_for`)."""
    from genrec_fast.collab_codes import branches_for
    return branches_for(n_items, levels, leaf)


# ---------------------------------------------------------------------------------------------
# The SASRec-style reference (plain PyTorch, written here)
# ---------------------------------------------------------------------------------------------


class SASRecBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)  # SASRec: the query is normalised, keys and values are not
        a = F.scaled_dot_product_attention(self.q(q)[:, None], self.k(x)[:, None], self.v(x)[:, None],
                                           is_causal=True)[:, 0]  # (B, T, d), one head
        x = (q + a) * keep
        h = self.ffn_norm(x)
        return (h + self.fc2(F.relu(self.fc1(h)))) * keep


SCORES_BYTES = 2 ** 30  # the reference's (users, n_items) score matrix at most: in user chunks beyond 1M items


class SASRec(nn.Module):
    """Kang & McAuley 2018 at inference: item + position embeddings, causal blocks, last position @ E.T."""

    def __init__(self, n_items: int, d: int = 64, blocks: int = 2, window: int = WINDOW):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(window, d)
        self.blocks = nn.ModuleList(SASRecBlock(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)

    @torch.inference_mode()
    def recommend(self, seq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """seq (B, window) item indices + 1, left-padded with 0 -> top-k item indices and scores (B, k)."""
        keep = (seq > 0).unsqueeze(-1).float()  # (B, T, 1)
        x = (self.item(seq) * self.item.embedding_dim ** 0.5 + self.pos.weight) * keep
        for b in self.blocks:
            x = b(x, keep)
        h = self.norm(x[:, -1])  # (B, d)
        rows = max(1, SCORES_BYTES // (4 * (self.item.num_embeddings - 1)))  # users a chunk: batch 256 whole to 1M
        top = [(c @ self.item.weight[1:].T).topk(k, dim=1) for c in h.split(rows)]  # (rows, n_items) scores each
        return torch.cat([v for v, _ in top]), torch.cat([i for _, i in top])


def sasrec_batch(histories: list) -> torch.Tensor:
    """Item-index histories -> (B, WINDOW) left-padded indices + 1 (SASRec's input)."""
    out = np.zeros((len(histories), WINDOW), dtype=np.int64)
    for b, h in enumerate(histories):
        h = h[-WINDOW:]
        out[b, WINDOW - len(h):] = np.asarray(h) + 1
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# One catalog size (runs in its own process)
# ---------------------------------------------------------------------------------------------


FORMS = ("whole", "codes", "leaf", "history", "leaf-history", "transition", "transition-both", "leaf-transition",
         "leaf-transition-both")
ONE_TOKEN = ("whole", "history", "transition", "transition-both")


def build(n_items: int, seed: int = 0, form: str = "whole", levels: int = 2, leaf: int = 16):
    if form.startswith("cascade"):  # "cascade-NxB": the codes retriever and the one-token ranker, both biases
        from genrec_fast.cascade import Cascade
        n, b = map(int, form.split("-")[1].split("x"))
        (retriever, s1), (ranker, s2) = (build(n_items, seed, f, levels, leaf)
                                         for f in ("leaf-transition-both", "transition-both"))
        return Cascade(retriever, ranker, n, 0.5, b), s1 + s2
    if form.startswith("hybrid"):  # "hybrid-N": the one-token model with both biases + the package's SASRec
        from genrec_fast.hybrid import Hybrid
        from genrec_fast.sasrec import SASRec as PackageSASRec, SASRecConfig
        genrec, s1 = _build(n_items, seed, "transition-both", levels, leaf)
        torch.manual_seed(seed)
        peer = PackageSASRec(SASRecConfig(n_items=n_items)).eval()  # d 64, 2 blocks, 1 head, 50-item window
        return Hybrid(genrec, peer, genrec.catalog, int(form.split("-")[1]), 0.5), s1
    return _build(n_items, seed, form, levels, leaf)


def _build(n_items: int, seed: int = 0, form: str = "whole", levels: int = 2, leaf: int = 16):
    """The one-token model, or (form "codes") the same model over collaborative codes: `levels` levels of
    code_branches(n) values (leaves of ~`leaf` items) and a unique last token, in the form of
    configs/beauty-codes-first-noeos.json (the encoder reads one position per item, no EOS step),
    decoded by the C++ trie search with 20 beams; form
    "leaf": those codes with the leaf head (model.leaf_head: the last token scored over its leaf's items);
    form "history": the one-token model with model.history_bias (offsets on the users' own items); form
    "leaf-history": the leaf-head codes with it; form "transition": the one-token model with the history and the
    transition bias (model.transition_bias, a full table of random neighbours); form "transition-both": that with
    the predecessor table too (model.transition_reverse: twice the pairs); form "leaf-transition": the
    leaf-head codes with both biases; "leaf-transition-both": and the predecessor table."""
    import dataclasses
    from genrec_fast import Recommender, preset
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} or cascade-NxB, got {form!r}")
    cfg = dataclasses.replace(preset("small").model, **MODEL, item_eos=False, leaf_head=form.startswith("leaf"),
                              history_bias=form not in ("whole", "codes", "leaf"),
                              transition_bias="transition" in form, transition_reverse=form.endswith("transition-both"))
    items = [f"item{i}" for i in range(n_items)]  # string ids, as real catalogs often have
    t0 = time.perf_counter()
    one_token = form in ONE_TOKEN
    rec = Recommender.random(items, cfg, item_tokens="whole" if one_token else "codes", seed=seed,
                             code_levels=levels, code_branches=code_branches(n_items, levels, leaf),
                             code_input="first")
    if "transition" in form:
        fill_transition(rec.model, n_items, seed)
    return rec, time.perf_counter() - t0


def fill_transition(model, n_items: int, seed: int = 0) -> None:
    """A random-weight model's transition table, full: every item with a whole row of random neighbours
    (the most pairs a user can bring), counts in [0, 10), weights 0.5."""
    t, g = model.transition, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.items[:-1] = torch.randint(0, n_items, t.items[:-1].shape, generator=g)
        t.counts[:-1] = torch.rand(t.counts[:-1].shape, generator=g) * 10
        t.weight.fill_(0.5)
        if t.reverse_weight is not None:
            t.reverse_weight.fill_(0.5)


def histories(n_items: int, users: int, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_items, int(rng.integers(5, 21))) for _ in range(users)]


def median_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each fn(i) (i = the call's index), the fns interleaved call by call so that a
    noisy machine slows them alike (this VM's speed drifts by ~20% between minutes)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_size(n_items: int, threads: int, batches: int, singles: int, sasrec: bool, device: str = "cpu",
                 form: str = "whole", levels: int = 2, leaf: int = 16) -> dict:
    torch.set_num_threads(threads)
    rec, build_s = build(n_items, form=form, levels=levels, leaf=leaf)
    for r in getattr(rec, "retriever", rec), getattr(rec, "ranker", rec):
        r.model.to(device)
    if hasattr(rec, "sasrec"):  # a hybrid's second model
        rec.sasrec.to(device)
    hist_idx = histories(n_items, BATCH * batches + singles)
    ids = rec.catalog.item_ids
    hist_ids = [[ids[i] for i in h] for h in hist_idx]
    calls, call_ids = ([h[b * BATCH:(b + 1) * BATCH] for b in range(batches)] for h in (hist_idx, hist_ids))
    one, one_ids = hist_idx[BATCH * batches:], hist_ids[BATCH * batches:]
    big = {"ours": lambda i: rec.recommend(call_ids[i % batches], k=TOP_K)}
    small = {"ours": lambda i: rec.recommend([one_ids[i % singles]], k=TOP_K)}
    if hasattr(rec, "genrec"):  # a hybrid: its GenRec model alone, timed in turn (the same minutes of the VM)
        big["alone"] = lambda i: rec.genrec.recommend(call_ids[i % batches], k=TOP_K)
        small["alone"] = lambda i: rec.genrec.recommend([one_ids[i % singles]], k=TOP_K)
    if sasrec:
        torch.manual_seed(0)
        ref = SASRec(n_items).eval().to(device)
        # the top-k back on the host, as recommend() returns it
        big["sasrec"] = lambda i: [t.cpu() for t in ref.recommend(sasrec_batch(calls[i % batches]).to(device), TOP_K)]
        small["sasrec"] = lambda i: [t.cpu() for t in ref.recommend(sasrec_batch([one[i % singles]]).to(device), TOP_K)]
    t_big, t_small = median_times(big, batches), median_times(small, singles, warmup=3)
    out = {"form": form, "items": n_items, "build_s": round(build_s, 2), "users_per_s": BATCH / t_big["ours"],
           "batch1_ms": 1e3 * t_small["ours"]}
    if "alone" in t_big:
        out.update(alone_users_per_s=BATCH / t_big["alone"], alone_batch1_ms=1e3 * t_small["alone"])
    if sasrec:
        out.update(sasrec_users_per_s=BATCH / t_big["sasrec"], sasrec_batch1_ms=1e3 * t_small["sasrec"])
    out["rss_gb"] = peak_rss_gb() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**30  # GPU: device GB
    return out


def run_size(n_items: int, args, form: str = "whole") -> dict:
    """measure_size in a fresh Python process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--one", str(n_items), "--threads", str(args.threads),
           "--batches", str(args.batches), "--singles", str(args.singles), "--device", args.device, "--form", form,
           "--code-levels", str(args.code_levels), "--leaf-size", str(args.leaf_size)]
    if n_items == min(args.sizes) and form in ONE_TOKEN:  # interleaved in the same process: a same-time ratio
        cmd.append("--sasrec")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"catalog size {n_items} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def optional_figures(args) -> dict:
    """Training and loading figures from their own benchmark scripts (nan when not asked for)."""
    out = {"train_rss_gb_1m": math.nan, "train_epoch_s": math.nan, "load_5m_s": math.nan}
    sys.path.insert(0, str(HERE))
    if args.train:
        from bench_train_scale import measure_train
        r = measure_train(items=1_000_000, users=200_000, threads=args.threads)
        out.update(train_rss_gb_1m=r["peak_rss_gb"], train_epoch_s=r.get("epoch_s", math.nan), train=r)
    if args.load:
        from bench_load import measure_load
        r = measure_load(5_000_000)
        out.update(load_5m_s=r["seconds"], load_rss_gb_5m=r["rss_gb"])
    return out


def print_report(rows: list, extra: dict, args) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.device != "cpu":
        cpu = f"{torch.cuda.get_device_name()} (host {cpu})"
    print(f"# one-token model d_model=64 2+2 layers, top-{TOP_K} | {cpu}, {args.threads} threads, torch "
          f"{torch.__version__} | {datetime.date.today()}")
    print(f"| items | item form | build s | users/s (batch {BATCH}) | batch-1 p50 ms | peak RSS GB | x SASRec-style |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b = code_branches(r["items"], args.code_levels, args.leaf_size)
        form = "one token" if r["form"] in ONE_TOKEN else \
            f"codes ({b} x {args.code_levels} + unique), 20 beams"
        form += {"leaf": ", leaf head", "history": ", history bias",
                 "leaf-history": ", leaf head, history bias",
                 "transition": ", history + transition bias",
                 "transition-both": ", history + transition bias, both directions",
                 "leaf-transition": ", leaf head, history + transition bias",
                 "leaf-transition-both": ", leaf head, history + transition bias, both directions",
                 }.get(r["form"], "")
        if r["form"].startswith("cascade"):
            n, b = r["form"].split("-")[1].split("x")
            form = (f"cascade: codes ({code_branches(r['items'], args.code_levels, args.leaf_size)} x "
                    f"{args.code_levels} + unique), leaf head, both biases both ways, {b} beams; its top {n} "
                    "reranked by the one-token model so")
        if r["form"].startswith("hybrid"):
            form = (f"hybrid: the one-token model with both biases both ways + this package's SASRec (d 64, 2 "
                    f"blocks, 50-item window), each model's top {r['form'].split('-')[1]} ranked by both (the "
                    f"one-token model alone, timed in turn: {r['alone_users_per_s']:,.0f} users/s, "
                    f"{r['alone_batch1_ms']:.2f} ms)")
        ratio = f"{r['users_per_s'] / r['sasrec_users_per_s']:.2f}" if "sasrec_users_per_s" in r else ""
        print(f"| {r['items']:,} | {form} | {r['build_s']:.1f} | {r['users_per_s']:,.0f} | {r['batch1_ms']:.2f} | "
              f"{r['rss_gb']:.2f} | {ratio} |")
    small = rows[0]
    print(f"| {small['items']:,} | SASRec-style reference (in the one-token process) | | "
          f"{small['sasrec_users_per_s']:,.0f} | {small['sasrec_batch1_ms']:.2f} | | |")
    if "train" in extra:
        print(f"one finetuning epoch, 1M-item synthetic catalog: {json.dumps(extra['train'])}")
    big = next((r for r in rows if r["items"] >= 1_000_000 and r["form"] == "whole"), None)
    codes = next((r for r in rows if r["items"] >= 1_000_000 and r["form"] == "codes"), None)
    leaf = next((r for r in rows if r["items"] >= 1_000_000 and r["form"] == "leaf"), None)
    line = {
        "ratio_vs_sasrec": small["users_per_s"] / small["sasrec_users_per_s"],
        "batch1_ms": small["batch1_ms"],
        "users_per_s_1m": big["users_per_s"] if big else math.nan,
        "rss_gb_1m": big["rss_gb"] if big else math.nan,
        "train_rss_gb_1m": extra["train_rss_gb_1m"],
        "load_5m_s": extra["load_5m_s"],
        "codes_users_per_s_1m": codes["users_per_s"] if codes else math.nan,
        "leaf_users_per_s_1m": leaf["users_per_s"] if leaf else math.nan,
    }
    print("catalog_bench " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--sizes", default="12101,100000,1000000", help="catalog sizes, comma-separated")
    p.add_argument("--batches", type=int, default=16, help="timed batch-256 calls per size (median)")
    p.add_argument("--singles", type=int, default=100, help="timed one-user calls per size (median)")
    p.add_argument("--train", action="store_true", help="also one training epoch at 1M items (minutes)")
    p.add_argument("--load", action="store_true", help="also the 5M-row CSV loader")
    p.add_argument("--quick", action="store_true", help="small sizes, few calls: a smoke test")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models run (cuda: the RSS column is "
                                                   "the GPU's peak allocated GB)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    p.add_argument("--sasrec", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--form", default="whole", help=argparse.SUPPRESS)  # FORMS, or cascade-NxB
    p.add_argument("--codes", action="store_true",
                   help="also the model over collaborative codes (trie search, 20 beams) at every size")
    p.add_argument("--leaf", action="store_true", help="also the codes model with the leaf head at every size")
    p.add_argument("--history", action="store_true",
                   help="also the one-token model (and with --leaf the leaf-head codes) with model.history_bias")
    p.add_argument("--transition", action="store_true",
                   help="also the one-token model with model.history_bias and model.transition_bias (with --leaf: "
                        "the leaf-head codes with both)")
    p.add_argument("--both", action="store_true",
                   help="also the one-token model with both biases, the transition bias in both directions "
                        "(model.transition_reverse: configs/whole-history-transition-both-calibrated.json; with "
                        "--leaf: the leaf-head codes so too)")
    p.add_argument("--cascade", metavar="NxB[,NxB]",
                   help="also cascades: the --both --leaf codes model's top N of B beams reranked by the --both "
                        "one-token model (cascade.py), e.g. 20x20,100x100")
    p.add_argument("--hybrid", metavar="N[,N]",
                   help="also hybrids: the --both one-token model and a SASRec (hybrid.py), each model's top N "
                        "ranked by both, e.g. 50")
    p.add_argument("--code-levels", type=int, default=2, help="codes: cluster levels before the last token")
    p.add_argument("--leaf-size", type=int, default=16, help="codes: items per leaf (sets the branching)")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_size(args.one, args.threads, args.batches, args.singles, args.sasrec, args.device,
                                      args.form, args.code_levels, args.leaf_size)))
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.sizes, args.batches, args.singles = [2000, 20000], 2, 5
    rows = [run_size(n, args) for n in sorted(args.sizes)]
    if args.codes:
        rows += [run_size(n, args, "codes") for n in sorted(args.sizes)]
    if args.leaf:
        rows += [run_size(n, args, "leaf") for n in sorted(args.sizes)]
    if args.history:
        rows += [run_size(n, args, "history") for n in sorted(args.sizes)]
    if args.history and args.leaf:
        rows += [run_size(n, args, "leaf-history") for n in sorted(args.sizes)]
    if args.transition:
        rows += [run_size(n, args, "transition") for n in sorted(args.sizes)]
    if args.both:
        rows += [run_size(n, args, "transition-both") for n in sorted(args.sizes)]
    if args.transition and args.leaf:
        rows += [run_size(n, args, "leaf-transition") for n in sorted(args.sizes)]
    if args.both and args.leaf:
        rows += [run_size(n, args, "leaf-transition-both") for n in sorted(args.sizes)]
    for spec in args.cascade.split(",") if args.cascade else []:
        rows += [run_size(n, args, f"cascade-{spec}") for n in sorted(args.sizes)]
    for spec in args.hybrid.split(",") if args.hybrid else []:
        rows += [run_size(n, args, f"hybrid-{spec}") for n in sorted(args.sizes)]
    print_report(rows, optional_figures(args), args)


if __name__ == "__main__":
    main()
