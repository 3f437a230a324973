"""The device-resident trie search (device_search.py) against the C++ search, on CPU and, if present, a GPU.

Sizes of benchmarks/bench_recommend.py: a sentencepiece tokenizer (vocabulary 1000) trained on a synthetic
catalog of 12,000 items, the trie of all items, 20 beams, top 20, length_penalty 0; a random GenRec of
d_model 256, 2+2 layers, 4 heads, FFN 1024 (the speed does not depend on the weights); histories of 20
random items. Batches of 1 and 32 users; median of --repeats calls after warm-up (GPU synchronized).

  search only   every step of one search with random log_softmax rows (fixed per step, drawn once):
                cpp          CppBeamSearch.step on host float32 arrays (what beam_decode runs per step)
                cpp+copy     logprobs on the GPU: .cpu() each step, the C++ step, rows/tokens back (GPU only)
                device       DeviceBeamSearch.step on tensors of that device
  decode        encoder + decoder + search from a padded encoder batch:
                cpp          decoding.beam_decode(backend="cpp") (the model on that device, the search on the host)
                device       device_search.device_beam_decode (stop_early=False: no host sync per step)
                device stop_early   the same, one sync per step (a bool) to skip steps once every user stopped
                device graph the device decode with its steps and search replayed as a CUDA graph (GPU only)

On CPU the device search is expected to be slower than the C++ one (tens of small torch ops per step
instead of one parallel C++ loop); it exists for GPUs, where it removes the per-step copy and wait.

Usage: python benchmarks/bench_device_search.py [--threads 2] [--repeats 10] [--items 12000] [--quick]
       [--devices cuda] [--dtype bfloat16] [--batches 1 32 256]
"""
from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

from bench_recommend import median_seconds  # noqa: I001  (benchmarks/ is the script's directory)
from genrec_fast.beam_search import CppBeamSearch, Trie
from genrec_fast.config import ModelConfig
from genrec_fast.data import Catalog, synthetic
from genrec_fast.decoding import beam_decode
from genrec_fast.device_search import DeviceBeamSearch, DeviceTrie, device_beam_decode
from genrec_fast.model import GenRec
from genrec_fast.recommend import Recommender
from genrec_fast.tokenizer import GenRecTokenizer

HISTORY, BEAMS, TOP_K = 20, 20, 20  # as bench_recommend.py
DIMS = dict(d_model=256, encoder_layers=2, decoder_layers=2, n_heads=4, ffn_dim=1024)
QUICK_DIMS = dict(d_model=64, encoder_layers=1, decoder_layers=1, n_heads=2, ffn_dim=128)


def build(n_items: int, vocab: int, dims: dict, seed: int = 0) -> Recommender:
    """bench_recommend.py's catalog and tokenizer, a random GenRec of `dims` (CPU)."""
    data = synthetic(n_users=max(200, n_items * 5 // 2), n_items=n_items, seed=seed)  # 2.5 users/item: all seen
    tok = GenRecTokenizer.train(data.sequences, data.item_codes, vocab)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dropout=0.0, n_users=data.n_users, n_items=data.n_items, **dims)
    return Recommender(GenRec(cfg).eval(), tok, Catalog.from_data(data), max_items=HISTORY)


def encoder_batch(rec: Recommender, users: int, device: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    histories = [rng.choice(len(rec.catalog.item_ids), HISTORY, replace=False) for _ in range(users)]
    return {name: x.to(device) for name, x in rec.encode_batch(histories, [None] * users).items()}


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """bench_recommend.median_seconds in ms (the GPU, if any, synchronized around each call)."""
    return 1e3 * median_seconds(fn, repeats, warmup)


# ---------------------------------------------------------------------------------------------
# Search only
# ---------------------------------------------------------------------------------------------


def step_tables(trie: Trie, users: int, vocab: int, seed: int = 0) -> list:
    """Per step, random log_softmax rows (users * BEAMS, V) float32; each search reads its first rows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(users * BEAMS, vocab, generator=g).log_softmax(-1) for _ in range(trie.max_depth)]


def run_cpp(trie: Trie, users: int, tables: list) -> None:
    search = CppBeamSearch(trie, users, BEAMS, TOP_K, threads=torch.get_num_threads())
    t = 0
    while not search.done():
        search.step(tables[t][:len(search.active_users()) * search.width])
        t += 1


def run_cpp_copy(trie: Trie, users: int, tables: list) -> None:
    """The production round trip: GPU logprobs to the host, the C++ step, rows and tokens back."""
    search = CppBeamSearch(trie, users, BEAMS, TOP_K, threads=torch.get_num_threads())
    t = 0
    while not search.done():
        lp = tables[t][:len(search.active_users()) * search.width].cpu().numpy()
        parent, tokens = search.step(lp)
        torch.as_tensor(parent, device=tables[t].device), torch.as_tensor(tokens, device=tables[t].device)
        t += 1


def run_device(dtrie: DeviceTrie, users: int, tables: list) -> None:
    search = DeviceBeamSearch(dtrie, users, BEAMS, TOP_K)
    t = 0
    while not search.exhausted:
        search.step(tables[t][:users * search.width])
        t += 1
    search.results()  # the one copy to the host


def search_rows(trie: Trie, devices: list, batches: list, repeats: int) -> list:
    rows = []
    for device in devices:
        dtrie = DeviceTrie.from_trie(trie, device)
        for name, run in (("cpp", run_cpp), ("cpp+copy", run_cpp_copy), ("device", run_device)):
            if device == "cpu" and name == "cpp+copy" or device != "cpu" and name == "cpp":
                continue
            ms = []
            for users in batches:
                tables = [x.to(device) for x in step_tables(trie, users, trie.min_vocab)]
                target = dtrie if run is run_device else trie
                ms.append(median_ms(lambda: run(target, users, tables), repeats))
            rows.append(("search only", name, device, ms))
    return rows


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


def decode_rows(rec: Recommender, devices: list, batches: list, repeats: int,
                dtype: torch.dtype = torch.float32) -> tuple[list, list]:
    """On a GPU also "device graph": the decoder steps and the search replayed as one CUDA graph per batch
    shape (cuda_graphs.py; captured in the warm-up calls)."""
    rows, checks = [], []
    for device in devices:
        rec.model.to(device, dtype if device != "cpu" else torch.float32)
        encs = {users: encoder_batch(rec, users, device) for users in batches}
        paths = {"cpp": lambda enc: beam_decode(rec.model, rec.trie, enc, TOP_K, BEAMS, backend="cpp"),
                 "device": lambda enc: device_beam_decode(rec.model, rec.trie, enc, TOP_K, BEAMS, graphs=False),
                 "device stop_early": lambda enc: device_beam_decode(rec.model, rec.trie, enc, TOP_K, BEAMS,
                                                                     stop_early=True, graphs=False)}
        if device != "cpu":
            paths["device graph"] = lambda enc: device_beam_decode(rec.model, rec.trie, enc, TOP_K, BEAMS, graphs=True)
        for name, fn in paths.items():
            rows.append(("decode", name, device, [median_ms(lambda: fn(encs[u]), repeats) for u in batches]))
        want, got = paths["cpp"](encs[batches[-1]]), paths["device"](encs[batches[-1]])
        checks.append(f"{device}: device items == cpp items: {np.array_equal(want[0], got[0])}, "
                      f"max |score diff| {np.nanmax(np.abs(want[1] - got[1]), initial=0.0):.2e}")
        if "device graph" in paths:
            from genrec_fast.cuda_graphs import captured_count
            graph = paths["device graph"](encs[batches[-1]])
            checks.append(f"{device}: graph items == eager device items: {np.array_equal(graph[0], got[0])}, "
                          f"graphs captured: {captured_count(rec.model)} (one per batch size; 0 = capture failed)")
    rec.model.to("cpu", torch.float32)
    return rows, checks


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def print_report(rec: Recommender, args, rows: list, checks: list) -> None:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    gpu = f" | {torch.cuda.get_device_name()}" if torch.cuda.is_available() else " | no GPU"
    cfg, trie = rec.model.cfg, rec.trie
    dtrie = DeviceTrie.from_trie(trie)
    print(f"# device trie search vs C++, top-{TOP_K}, {BEAMS} beams | {cpu}{gpu}, torch {torch.__version__} | "
          f"{datetime.date.today()}")
    print(f"# model d_model={cfg.d_model} layers={cfg.encoder_layers}+{cfg.decoder_layers} heads={cfg.n_heads} "
          f"ffn={cfg.ffn_dim} vocab={cfg.vocab_size}; {trie.num_items} items, {trie.num_nodes} nodes, "
          f"max {trie.max_depth - 1} pieces; widths per step {dtrie.widths(BEAMS)[:-1]}, "
          f"children padded to {dtrie.branch[:trie.max_depth]}")
    heads = [f"batch {b} ms" for b in args.batches]
    print("| part | search | device | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---:|" * len(heads))
    for part, name, device, ms in rows:
        print(f"| {part} | {name} | {device} | " + " | ".join(f"{m:.2f}" for m in ms) + " |")
    for line in checks:
        print(line)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads, also the C++ search's (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per cell (default 10)")
    p.add_argument("--items", type=int, default=12000, help="catalog size (default 12000)")
    p.add_argument("--vocab", type=int, default=1000, help="sentencepiece vocabulary (default 1000)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="users per call (default 1 32)")
    p.add_argument("--no-decode", action="store_true", help="time the search only")
    p.add_argument("--devices", nargs="+", help="cpu and/or cuda (default: cpu, and cuda when present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the model's dtype on a GPU (the CPU runs float32)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (seconds)")
    args = p.parse_args(argv)
    dims = DIMS
    if args.quick:
        args.items, args.vocab, args.repeats, dims = min(args.items, 600), 300, 3, QUICK_DIMS
        args.batches = [min(b, 4) for b in args.batches]
    torch.set_num_threads(args.threads)
    rec = build(args.items, args.vocab, dims)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = search_rows(rec.trie, devices, args.batches, args.repeats)
    checks: list = []
    if not args.no_decode:
        more, checks = decode_rows(rec, devices, args.batches, args.repeats, getattr(torch, args.dtype))
        rows += more
    print_report(rec, args, rows, checks)


if __name__ == "__main__":
    main()
