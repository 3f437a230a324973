"""Fetch MovieLens 100K (shipped inside RecBole's wheel on PyPI, recbole/dataset_example/ml-100k) as a P5-format file.

    python scripts/fetch_ml100k.py [OUT_DIR]     # default: $GENREC_DATA_DIR or ../shared/data

downloads the recbole 1.2.1 wheel (no dependencies, nothing installed), reads ml-100k.inter out of it and writes
OUT_DIR/ml-100k/sequential_data.txt: one line per user, `user item1 item2 ...`, items in time order (ties keep
the source's row order). Every rating counts as an interaction; 943 users, 1,682 movies, 100,000 ratings.
A held-out dataset: no configuration of this project was chosen on it. The data is never committed.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else os.environ.get("GENREC_DATA_DIR", "../shared/data"))
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
                            "-q", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if r.returncode or not wheels:
            print(f"fetch_ml100k: pip download {WHEEL} failed:\n{r.stderr}", file=sys.stderr)
            return 2
        with zipfile.ZipFile(wheels[0]) as z:
            text = z.read(MEMBER).decode()
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    header, rows = rows[0], rows[1:]
    u, i, t = (header.index(c) for c in ("user_id:token", "item_id:token", "timestamp:float"))
    by_user = defaultdict(list)
    for n, row in enumerate(rows):
        by_user[int(row[u])].append((float(row[t]), n, int(row[i])))
    out = root / "ml-100k" / "sequential_data.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for user in sorted(by_user):
            f.write(" ".join(map(str, [user, *(item for _, _, item in sorted(by_user[user]))])) + "\n")
    items = {int(row[i]) for row in rows}
    print(f"{out}: {len(by_user)} users, {len(items)} items, {len(rows)} interactions")
    return 0


if __name__ == "__main__":
    if any(a.startswith("-") for a in sys.argv[1:]):  # --help (or any option): the usage, never a directory named so
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    sys.exit(main(sys.argv[1:]))
