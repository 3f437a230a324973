"""Loading interaction logs: wall time and peak RSS of `data.load_csv` (columnar, pyarrow) at 5M and 50M rows.

Writes synthetic interaction CSVs (`user,item,timestamp`: integer ids, ~10 rows per user, Zipf-like
item popularity, random integer timestamps so the file is not in time order) into a temp dir that is
deleted afterwards, loads each file in a fresh subprocess and reports the load call's wall time and
the process's peak RSS (imports included: `import genrec_fast` brings torch). The row-by-row
reference loader is timed on 1M rows beside the columnar one. Prints a markdown table, then as the
last line `load_bench load_5m_s=<x> rss_gb_5m=<y> rss_gb_50m=<z>` (nan without --big). GB = 1e9 bytes.

    PYTHONPATH=python python benchmarks/bench_load.py          # 1M (both loaders) and 5M rows, ~1.5 min
    PYTHONPATH=python python benchmarks/bench_load.py --big    # also 50M rows: ~1.3 GB in the temp dir, ~5 min

Other scripts can import `measure_load` (benchmarks/ is not a package):
    sys.path.insert(0, "benchmarks"); from bench_load import measure_load; measure_load(5_000_000)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

ROWS_PER_USER = 10  # users ~ Poisson(10) rows each; those with < 3 are dropped by the loader
ROWS_PER_ITEM = 50  # catalog size = rows / 50
ZIPF_EXPONENT = 0.8  # item popularity ~ 1 / rank^0.8
CHUNK_ROWS = 5_000_000  # rows generated and written at a time (bounds this process's memory)
BYTES_PER_ROW = 27  # ~7-digit user, ~6-digit item, 10-digit timestamp, separators
_SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("timestamp", pa.int64())])


def write_log(path: Path, rows: int, seed: int = 0) -> None:
    """A synthetic `user,item,timestamp` CSV of `rows` rows, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, rows // ROWS_PER_USER), max(1, rows // ROWS_PER_ITEM)
    popularity = 1.0 / np.arange(1, n_items + 1) ** ZIPF_EXPONENT
    cdf = np.cumsum(popularity / popularity.sum())
    item_of_rank = rng.permutation(n_items) + 1  # popular items get arbitrary ids
    path.write_text("user,item,timestamp\n")
    no_header = pa_csv.WriteOptions(include_header=False)
    with path.open("ab") as f, pa_csv.CSVWriter(f, _SCHEMA, write_options=no_header) as w:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            rank = np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)
            w.write_table(pa.table({"user": rng.integers(1, n_users + 1, n) * 7 + 1000,  # ids are not 1..U
                                    "item": item_of_rank[rank],
                                    "timestamp": 1_500_000_000 + rng.integers(0, 100_000_000, n)}, schema=_SCHEMA))


def measure_load(rows: int, *, reference: bool = False, tmp_dir: str | None = None, repeats: int = 1) -> dict:
    """Write a `rows`-row log to a temp dir, load it in fresh subprocesses, delete it.

    Returns dict(seconds=median load seconds, rss_gb=max peak RSS of the loading processes, plus
    runs, rss_import_gb (peak RSS after the imports) and users/items/interactions of the result).
    """
    with tempfile.TemporaryDirectory(prefix="bench_load_", dir=tmp_dir) as d:
        path = Path(d) / f"log_{rows}.csv"
        write_log(path, rows)
        return measure_file(path, reference=reference, repeats=repeats)


def measure_file(path: Path, *, reference: bool = False, repeats: int = 1) -> dict:
    """`repeats` loads of `path`, each in a fresh Python process (`--child`); median time, max RSS."""
    runs = [_run_child(path, reference) for _ in range(repeats)]
    return dict(runs[-1], seconds=statistics.median(r["seconds"] for r in runs),
                rss_gb=max(r["rss_gb"] for r in runs), runs=[r["seconds"] for r in runs])


def _run_child(path: Path, reference: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)] + (["--reference"] if reference else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(path: str, reference: bool) -> None:
    """Load `path` once and print one JSON line: load seconds, peak RSS, RSS after imports, sizes."""
    from genrec_fast import data

    rss_import = _peak_rss_gb()
    load = data._load_csv_reference if reference else data.load_csv
    t = time.perf_counter()
    d = load(path)
    seconds = time.perf_counter() - t
    print(json.dumps(dict(seconds=seconds, rss_gb=_peak_rss_gb(), rss_import_gb=rss_import, users=d.n_users,
                          items=d.n_items, interactions=d.n_interactions)))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else (platform.processor() or "unknown CPU")


def _enough_disk(tmp_dir: str | None, rows: int) -> bool:
    need = rows * BYTES_PER_ROW * 1.5  # the file plus headroom
    free = shutil.disk_usage(tmp_dir or tempfile.gettempdir()).free
    if free < need:
        print(f"skipping {rows:,} rows: {free / 1e9:.1f} GB free in the temp dir, need {need / 1e9:.1f} GB")
    return free >= need


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", action="store_true", help="also load 50M rows")
    ap.add_argument("--repeats", type=int, default=1, help="loads per size (median time reported)")
    ap.add_argument("--reference-rows", type=int, default=1_000_000,
                    help="rows for the reference comparison (0: none)")
    ap.add_argument("--tmp-dir", default=None, help="where the CSVs are written (default: the system temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.reference)

    print(f"# {time.strftime('%Y-%m-%d')}, {_cpu_name()}, {os.cpu_count()} CPUs, pyarrow {pa.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_load_", dir=args.tmp_dir) as d:
        if args.reference_rows > 0:
            small = Path(d) / "small.csv"
            write_log(small, args.reference_rows)
            results.append(("reference (csv module, a tuple per row)", args.reference_rows,
                            measure_file(small, reference=True, repeats=args.repeats)))
            results.append(("columnar (pyarrow + numpy)", args.reference_rows,
                            measure_file(small, repeats=args.repeats)))
            small.unlink()
    for rows in [5_000_000] + ([50_000_000] if args.big else []):
        if rows < 50_000_000 or _enough_disk(args.tmp_dir, rows):
            results.append(("columnar (pyarrow + numpy)", rows,
                            measure_load(rows, tmp_dir=args.tmp_dir, repeats=args.repeats)))
    print_table(results)
    print(f"load average {os.getloadavg()[0]:.2f} at the end (1 min)")
    by_rows = {rows: r for name, rows, r in results if name.startswith("columnar")}
    nan = float("nan")
    print(f"load_bench load_5m_s={by_rows[5_000_000]['seconds']:.2f} rss_gb_5m={by_rows[5_000_000]['rss_gb']:.2f} "
          f"rss_gb_50m={by_rows.get(50_000_000, {}).get('rss_gb', nan):.2f}")


def print_table(results: list) -> None:
    print("\n| loader | rows | users | items | load s | runs | peak RSS GB | RSS after imports GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows, r in results:
        runs = ", ".join(f"{s:.2f}" for s in r["runs"])
        print(f"| {name} | {rows:,} | {r['users']:,} | {r['items']:,} | {r['seconds']:.2f} | {runs} | "
              f"{r['rss_gb']:.2f} | {r['rss_import_gb']:.2f} |")
    print()


if __name__ == "__main__":
    main()
