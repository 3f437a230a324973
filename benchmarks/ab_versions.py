"""Two versions of genrec_fast in one process, calls alternating: the installed package against an older revision
built as `genrec_old` (this VM's speed drifts by ~20% within minutes and ~2x between days, so only alternating calls
compare two builds fairly).

  bash benchmarks/ab_build_old.sh REV /tmp/ab            # REV's package as /tmp/ab/genrec_old
  python benchmarks/ab_versions.py /tmp/ab --sizes 20000,1000000 --forms leaf-transition-both,cascade-20x20

Forms: bench_catalog.py's (random weights, its histories and shapes; codes: 1 level + unique, leaves of ~95
items) or cascade-NxB. Per size and form: users/s of recommend(k=20) at batch 256 (--batches calls each, medians),
batch-1 p50 (--singles calls each), and whether both versions return the same items (and the largest score
difference) on 8 users.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_catalog as bc  # noqa: E402


def build(pkg, n: int, form: str):
    """bench_catalog.build's model (random weights, seed 0) from package `pkg`."""
    if form.startswith("cascade"):
        k, beams = map(int, form.split("-")[1].split("x"))
        cascade = importlib.import_module(pkg.__name__ + ".cascade")
        return cascade.Cascade(build(pkg, n, "leaf-transition-both"), build(pkg, n, "transition-both"), k, 0.5, beams)
    cfg = dataclasses.replace(pkg.preset("small").model, **bc.MODEL, item_eos=False, leaf_head=form.startswith("leaf"),
                              history_bias=form not in ("whole", "codes", "leaf"),
                              transition_bias="transition" in form, transition_reverse=form.endswith("transition-both"))
    rec = pkg.Recommender.random([f"item{i}" for i in range(n)], cfg,
                                 item_tokens="whole" if form in bc.ONE_TOKEN else "codes", seed=0, code_levels=1,
                                 code_branches=bc.code_branches(n, 1, 95), code_input="first")
    if "transition" in form:
        bc.fill_transition(rec.model, n, 0)
    return rec


def compare(old_pkg, new_pkg, n: int, form: str, batches: int, singles: int) -> None:
    recs = {"old": build(old_pkg, n, form), "new": build(new_pkg, n, form)}
    fns = {"old": old_pkg.recommend, "new": new_pkg.recommend}
    hists = [[f"item{i}" for i in h] for h in bc.histories(n, bc.BATCH)]
    for v in recs:
        fns[v](recs[v], hists, k=bc.TOP_K)
    a, b = (fns[v](recs[v], hists[:8], k=bc.TOP_K) for v in ("old", "new"))
    same = all(x.items == y.items for x, y in zip(a, b))
    diff = max(float(np.max(np.abs(np.asarray(x.scores) - np.asarray(y.scores)))) for x, y in zip(a, b))
    batch, one = {"old": [], "new": []}, {"old": [], "new": []}
    for i in range(batches + singles):
        for v in (("old", "new") if i % 2 else ("new", "old")):
            h = hists if i < batches else hists[i % bc.BATCH:i % bc.BATCH + 1]
            t = time.perf_counter()
            fns[v](recs[v], h, k=bc.TOP_K)
            (batch if i < batches else one)[v].append(time.perf_counter() - t)
    b0, b1 = (float(np.median(batch[v])) for v in ("old", "new"))
    s0, s1 = (float(np.median(one[v])) for v in ("old", "new"))
    print(f"| {n:,} | {form} | {bc.BATCH / b0:,.0f} | {bc.BATCH / b1:,.0f} | {b0 / b1:.2f}x | {1e3 * s0:.2f} | "
          f"{1e3 * s1:.2f} | {s0 / s1:.2f}x | {same} ({diff:.1e}) |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old_dir", help="the directory holding genrec_old (benchmarks/ab_build_old.sh's OUT)")
    p.add_argument("--sizes", default="20000")
    p.add_argument("--forms", default="leaf-transition-both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--singles", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.old_dir) / "genrec_old" / "__init__.py").is_file():
        p.error(f"old_dir: {args.old_dir} holds no genrec_old package; build one with "
                f"`bash benchmarks/ab_build_old.sh REV {args.old_dir}`")
    sys.path.insert(0, args.old_dir)
    import genrec_fast
    import genrec_old
    print(f"# old: {genrec_old.__file__}, new: {genrec_fast.__file__}; {args.threads} threads, "
          f"batch {bc.BATCH}, top {bc.TOP_K}")
    print("| items | form | old users/s | new users/s | | old batch-1 ms | new batch-1 ms | | same items (max score diff) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for n in map(int, args.sizes.split(",")):
        for form in args.forms.split(","):
            compare(genrec_old, genrec_fast, n, form, args.batches, args.singles)


if __name__ == "__main__":
    main()
