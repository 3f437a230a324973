"""Starting to serve a large catalog: `genrec_fast.load()` of a saved checkpoint, its first request (which
builds the trie and the leaf-ordered table), later requests, and the process's peak RSS.

Builds a random-weight model of `bench_catalog.build`'s shapes (speed does not depend on training), saves it
as a checkpoint into a temp dir (deleted afterwards), then loads it in a fresh subprocess, as a server
starting would. Prints a markdown table; GB = 2**30 bytes (ru_maxrss).

    PYTHONPATH=python python benchmarks/bench_checkpoint.py --items 1000000 --form leaf --levels 1
    PYTHONPATH=python python benchmarks/bench_checkpoint.py --items 10000000 --form leaf --levels 2   # ~5 min, 10 GB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def save(n_items: int, form: str, levels: int, leaf: int, out: Path) -> float:
    """Build the model and write its checkpoint -> seconds to build."""
    from bench_catalog import build
    from genrec_fast import checkpoint
    rec, seconds = build(n_items, 0, form, levels, leaf)
    checkpoint.save(out, rec.model, rec.tokenizer, rec.catalog)
    return seconds


def measure(path: str, threads: int, requests: int) -> dict:
    """In this process: load, the first request, then the median of `requests` one-user requests."""
    import resource
    import statistics
    import torch
    torch.set_num_threads(threads)
    import genrec_fast
    t0 = time.perf_counter()
    rec = genrec_fast.load(path)
    load_s = time.perf_counter() - t0
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ids = rec.catalog.item_ids
    t0 = time.perf_counter()
    rec.recommend([[ids[1], ids[5], ids[7]]], k=10)
    first_s = time.perf_counter() - t0
    times = []
    for i in range(requests):
        t0 = time.perf_counter()
        rec.recommend([[ids[i], ids[i + 5], ids[i + 7]]], k=10)
        times.append(time.perf_counter() - t0)
    return {"load_s": load_s, "rss_after_load_gb": load_rss, "first_s": first_s,
            "request_ms": 1e3 * statistics.median(times),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size (default %(default)s)")
    p.add_argument("--form", default="leaf", help="a bench_catalog.py form: whole, leaf, transition-both, "
                                                  "leaf-transition-both, ... (default %(default)s)")
    p.add_argument("--levels", type=int, default=1, help="code levels of a codes form (default %(default)s)")
    p.add_argument("--leaf-size", type=int, default=95, help="items a leaf of a codes form (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--requests", type=int, default=20, help="timed one-user requests (default %(default)s)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this checkpoint, print JSON
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.requests)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        build_s = save(args.items, args.form, args.levels, args.leaf_size, ckpt)
        out = subprocess.run([sys.executable, __file__, "--measure", str(ckpt), "--threads", str(args.threads),
                              "--requests", str(args.requests)], check=True, capture_output=True, text=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| items | form | build s | load() s | RSS after load | first request s | request p50 | peak RSS |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    codes = args.form.startswith(("leaf", "codes"))
    form = f"{args.form} ({args.levels} code level{'s' if args.levels > 1 else ''})" if codes else args.form
    print(f"| {args.items:,} | {form} | {build_s:.0f} | "
          f"{m['load_s']:.1f} | {m['rss_after_load_gb']:.1f} GB | {m['first_s']:.1f} | {m['request_ms']:.1f} ms | "
          f"{m['peak_rss_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
