"""Top-20 recommendation on CPU or GPU: genrec_fast (C++ and reference trie search) against Hugging Face generate.

Every path runs the SAME weights: a random `BartForConditionalGeneration` (d_model 256, 2+2 layers, 4 heads,
FFN 1024) whose vocabulary is a sentencepiece tokenizer trained on a synthetic catalog of 12,000 items,
converted with `from_hf_bart`. Histories of 20 random items, the trie holds every item, 20 beams, top 20,
length_penalty 0 in both (GenRec's default).

  genrec_fast cpp        Recommender.recommend(backend="cpp"): encoder once, cached decoder, C++ trie step
  genrec_fast reference  the same with the pure Python/numpy trie step (backend="reference")
  hf generate            generate(num_beams=20, num_return_sequences=20, prefix_allowed_tokens_fn=...) with the
                         usual nested-dict trie: the callback walks each beam's prefix at every step
  genrec_fast device     (GPU only) backend="device": the trie search as device tensors, no host copy per step
  genrec_fast device graphs  the same with its decode loop replayed as CUDA graphs (GENREC_CUDA_GRAPHS=1)

Batch 1: median latency over --repeats calls after warm-up. Batch 32: users/s (median call time).
Also printed: the FLOP floor of the search (matmul FLOPs / the measured fp32 matmul rate, same threads) and
the share of recommend() time spent in the trie step. The last line is machine-readable:
  speedup_vs_hf batch1=<x> batch32=<y> floor_fraction=<z>

With --device cuda both models run on the GPU in fp32 (the FLOP floor then uses the GPU's fp32 matmul
rate; the trie step stays on the CPU, as in production).

Usage: python benchmarks/bench_recommend.py [--threads 2] [--repeats 20] [--items 12000] [--device cpu] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from genrec_fast.batching import pad_encoder
from genrec_fast.convert import from_hf_bart
from genrec_fast.data import Catalog, synthetic
from genrec_fast.decoding import beam_decode
from genrec_fast.recommend import Recommender
from genrec_fast.tokenizer import BOS_ID, EOS_ID, PAD_ID, GenRecTokenizer

HISTORY, BEAMS, TOP_K = 20, 20, 20  # items per history, beam width, items returned
DIMS = dict(d_model=256, layers=2, heads=4, ffn=1024)
QUICK_DIMS = dict(d_model=64, layers=1, heads=2, ffn=128)


@dataclass
class Setup:
    hf: "object"  # transformers.BartForConditionalGeneration
    rec: Recommender  # the converted model with its tokenizer, catalog and trie
    histories: list  # original item ids, HISTORY per user
    hf_trie: dict  # nested {token: child} dicts; EOS leads to {}


def bart_config(vocab_size: int, dims: dict):
    from transformers import BartConfig
    return BartConfig(
        vocab_size=vocab_size, d_model=dims["d_model"], encoder_layers=dims["layers"], decoder_layers=dims["layers"],
        encoder_attention_heads=dims["heads"], decoder_attention_heads=dims["heads"],
        encoder_ffn_dim=dims["ffn"], decoder_ffn_dim=dims["ffn"], max_position_embeddings=256,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID,
        forced_bos_token_id=None, forced_eos_token_id=None, dropout=0.0)


def build(n_items: int, vocab: int, n_users: int, dims: dict, seed: int = 0, device: str = "cpu") -> Setup:
    """Synthetic catalog -> tokenizer -> random BART -> GenRec with the same weights; n_users histories."""
    from transformers import BartForConditionalGeneration
    data = synthetic(n_users=max(200, n_items * 5 // 2), n_items=n_items, seed=seed)  # 2.5 users/item: all items seen
    tok = GenRecTokenizer.train(data.sequences, data.item_codes, vocab)
    torch.manual_seed(seed)
    hf = BartForConditionalGeneration(bart_config(tok.vocab_size, dims)).eval()
    model = from_hf_bart(hf, n_users=data.n_users, n_items=data.n_items).eval()  # ID tables are zero
    hf.to(device)
    model.to(device)
    rec = Recommender(model, tok, Catalog.from_data(data), max_items=HISTORY)
    rng = np.random.default_rng(seed)
    picks = (rng.choice(data.n_items, HISTORY, replace=False) for _ in range(n_users))
    histories = [[data.item_ids[i] for i in p] for p in picks]
    return Setup(hf, rec, histories, dict_trie(tok.item_pieces))


def dict_trie(item_pieces) -> dict:
    root: dict = {}
    for pieces in item_pieces:
        node = root
        for t in [*pieces.tolist(), EOS_ID]:
            node = node.setdefault(t, {})
    return root


def prefix_fn(root: dict):
    """The usual `prefix_allowed_tokens_fn`: walk the beam's prefix (after the start token) from the root."""
    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        node = root
        for t in ids.tolist()[1:]:
            node = node.get(t)
            if node is None:  # a padded or junk beam: let it end
                return [EOS_ID]
        return list(node) or [EOS_ID]
    return allowed


# ---------------------------------------------------------------------------------------------
# The three paths: histories of original ids in, top-k original item ids out
# ---------------------------------------------------------------------------------------------


def ours(s: Setup, histories: list, backend: str) -> list:
    return s.rec.recommend(histories, k=TOP_K, num_beams=BEAMS, backend=backend)


def encoder_batch(s: Setup, histories: list) -> dict:
    idx = [[s.rec.catalog.item_index[x] for x in h] for h in histories]
    return pad_encoder([s.rec.encode(h, None) for h in idx], s.rec.device)


def hf_generate(s: Setup, histories: list) -> list:
    from transformers import GenerationConfig
    enc = encoder_batch(s, histories)
    gc = GenerationConfig(num_beams=BEAMS, num_return_sequences=TOP_K, max_new_tokens=s.rec.trie.max_depth,
                          length_penalty=0.0, early_stopping=False, do_sample=False, bos_token_id=BOS_ID,
                          decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with torch.inference_mode():
        out = s.hf.generate(input_ids=enc["tokens"], attention_mask=enc["mask"].long(), generation_config=gc,
                            prefix_allowed_tokens_fn=prefix_fn(s.hf_trie))  # (B * k, 1 + T)
    return [[_hf_item(s, row) for row in out[b * TOP_K:(b + 1) * TOP_K, 1:].tolist()] for b in range(len(histories))]


def _hf_item(s: Setup, row: list):
    if EOS_ID not in row:
        return None
    try:
        return s.rec.catalog.item_ids[s.rec.tokenizer.decode_item(row[:row.index(EOS_ID)])]
    except KeyError:  # a junk beam (fewer than k items reachable)
        return None


# ---------------------------------------------------------------------------------------------
# Timing, the FLOP floor and the trie-step share
# ---------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() (the GPU, if any, synchronized before and after each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_s(device: str = "cpu", n: int = 1024, repeats: int = 10) -> float:
    """fp32 torch.mm rate on this device (CPU: at this thread count; GPU: n = 4096, no TF32)."""
    n = 4096 if device != "cpu" else n
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), repeats, warmup=3)


def search_flops(s: Setup, histories: list) -> float:
    """Matmul FLOPs of one recommend() per user (mean over `histories`), without padding.

    Encoder over the S input pieces; cross-attention K/V once per user; per decode step t and beam
    (1 beam at step 0, BEAMS after): self-attention q/k/v/o, attention over t + 1 cached keys, cross
    q/o, attention over S keys, FFN, and the LM head over the whole vocabulary; steps = max item length + 1.
    """
    cfg = s.rec.model.cfg
    d, f, V, steps = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, s.rec.trie.max_depth
    lengths = encoder_batch(s, histories)["mask"].sum(1).tolist()
    total = 0.0
    for S in lengths:
        total += cfg.encoder_layers * (8 * S * d * d + 4 * S * S * d + 4 * S * d * f)
        total += cfg.decoder_layers * 4 * S * d * d
        for t in range(steps):
            layer = 8 * d * d + 4 * (t + 1) * d + 4 * d * d + 4 * S * d + 4 * d * f
            total += (1 if t == 0 else BEAMS) * (cfg.decoder_layers * layer + 2 * d * V)
    return total / len(lengths)


def trie_step_share(s: Setup, histories: list, repeats: int) -> float:
    """Fraction of beam_decode time spent in `search.step` (C++ backend), median over repeats."""
    shares = []
    for _ in range(repeats):
        enc = encoder_batch(s, histories)
        timings: dict = {}
        t0 = time.perf_counter()
        beam_decode(s.rec.model, s.rec.trie, enc, TOP_K, BEAMS, backend="cpp", timings=timings)
        shares.append(timings["search_step"] / (time.perf_counter() - t0))
    return statistics.median(shares)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def with_graphs(fn):
    """fn() with `device_beam_decode`'s CUDA graphs on (GENREC_CUDA_GRAPHS=1 for the call)."""
    import os
    before = os.environ.get("GENREC_CUDA_GRAPHS")
    os.environ["GENREC_CUDA_GRAPHS"] = "1"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["GENREC_CUDA_GRAPHS"]
        else:
            os.environ["GENREC_CUDA_GRAPHS"] = before


def measure(s: Setup, args) -> dict:
    """Seconds per call: {(path, batch): seconds}."""
    paths = {"genrec_fast cpp": lambda h: ours(s, h, "cpp"),
             "genrec_fast reference": lambda h: ours(s, h, "reference"),
             "hf generate": lambda h: hf_generate(s, h)}
    if args.device != "cpu":  # the trie search as device tensors, eager and replayed as CUDA graphs
        paths["genrec_fast device"] = lambda h: ours(s, h, "device")
        paths["genrec_fast device graphs"] = lambda h: with_graphs(lambda: ours(s, h, "device"))
    res = {}
    for name, fn in paths.items():
        one, batch = s.histories[:1], s.histories[:args.batch]
        res[name, 1] = median_seconds(lambda: fn(one), args.repeats)
        res[name, args.batch] = median_seconds(lambda: fn(batch), max(3, args.repeats // 4), warmup=1)
    return res


def print_report(s: Setup, args, res: dict, floor_s: float, rate: float, share: float) -> None:
    B, cfg = args.batch, s.rec.model.cfg
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    where = cpu if args.device == "cpu" else f"{torch.cuda.get_device_name()} fp32 (host {cpu})"
    print(f"# recommend top-{TOP_K}, {BEAMS} beams | {where}, torch {torch.__version__} | {datetime.date.today()}")
    print(f"# model d_model={cfg.d_model} layers={cfg.encoder_layers}+{cfg.decoder_layers} heads={cfg.n_heads} "
          f"ffn={cfg.ffn_dim} vocab={cfg.vocab_size}; {s.rec.trie.num_items} items, max {s.rec.trie.max_depth - 1} "
          f"pieces; histories of {HISTORY} items")
    col = f"batch {B} users/s"
    print(f"| {'path':<22} | {'batch 1 p50 ms':>14} | {col:>16} |")
    print(f"|{'-' * 24}|{'-' * 16}|{'-' * 18}|")
    for name in [p for p, b in res if b == 1]:
        print(f"| {name:<22} | {res[name, 1] * 1e3:>14.2f} | {B / res[name, B]:>16.1f} |")
    ours_user = res["genrec_fast cpp", B] / B
    print(f"FLOP floor: {floor_s * 1e3:.3f} ms/user at {rate / 1e9:.1f} GFLOP/s (fp32 mm, {args.device}); "
          f"genrec_fast cpp batch {B}: {ours_user * 1e3:.3f} ms/user")
    print(f"  (dense floor: {BEAMS} beams at every step after the first; genrec_fast runs only the slots that hold "
          f"live beams and may stop early, so it can come close to or beat it)")
    print(f"  best possible speedup at the floor: batch1={res['hf generate', 1] / floor_s:.1f} "
          f"batch{B}={res['hf generate', B] / B / floor_s:.1f}")
    print(f"trie step share of recommend() time (cpp, batch {B}): {share * 100:.1f}%")
    print(f"speedup_vs_hf batch1={res['hf generate', 1] / res['genrec_fast cpp', 1]:.1f} "
          f"batch{B}={res['hf generate', B] / res['genrec_fast cpp', B]:.1f} floor_fraction={floor_s / ours_user:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls at batch 1 (batch 32: a quarter)")
    p.add_argument("--items", type=int, default=12000, help="catalog size (default 12000)")
    p.add_argument("--vocab", type=int, default=1000, help="sentencepiece vocabulary (default 1000)")
    p.add_argument("--batch", type=int, default=32, help="users per call for throughput (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models run (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no GPU")
    dims = DIMS
    if args.quick:
        args.items, args.vocab, args.repeats, args.batch, dims = min(args.items, 600), 300, 3, 4, QUICK_DIMS
    torch.set_num_threads(args.threads)
    s = build(args.items, args.vocab, args.batch, dims, device=args.device)
    res = measure(s, args)
    rate = matmul_flops_per_s(args.device)
    floor_s = search_flops(s, s.histories[:args.batch]) / rate
    share = trie_step_share(s, s.histories[:args.batch], max(3, args.repeats // 4))
    print_report(s, args, res, floor_s, rate, share)


if __name__ == "__main__":
    main()
