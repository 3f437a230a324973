"""Interaction data: loaders (P5, MovieLens, CSV/TSV), id order, leave-one-out split, synthetic default.

Items and users keep their original ids in the API. Internally a user is an index `u` in
`0..n_users-1` and an item an index `i` in `0..n_items-1`; the text of item `i` is `item_<code>`
where the code is a seeded random permutation (`id_order="random"`, default) or the original id
(`id_order="original"`: P5 numbers items by first appearance, which leaks the answer).
"""
from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

ID_ORDERS = ("random", "original")
FORMATS = ("p5", "movielens", "csv", "tsv")
MIN_ITEMS = 3  # leave-one-out needs a train item, a validation target and a test target


class DataFormatError(ValueError):
    """A data file line that cannot be parsed; names the file, the line and the problem."""

    def __init__(self, path: Path | str, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass
class SequenceData:
    """User histories in time order, as item indices, with the id maps."""

    user_ids: list  # original id of user index u
    item_ids: list  # original id of item index i
    sequences: list  # per user: np.ndarray int64 of item indices, oldest first
    item_codes: list  # per item index: the string after `item_` in the text form
    name: str = "data"
    dropped_users: int = 0

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def summary(self) -> str:
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, {self.n_interactions} interactions"
                + (f", {self.dropped_users} users with < {MIN_ITEMS} items dropped" if self.dropped_users else ""))


@dataclass
class Split:
    """Leave-one-out: last item = test target, second-to-last = validation target, the rest = train."""

    train: list  # per user: item indices, the only part training ever sees
    valid_target: np.ndarray  # (U,) int64
    test_target: np.ndarray  # (U,) int64

    def valid_history(self, u: int) -> np.ndarray:
        return self.train[u]

    def test_history(self, u: int) -> np.ndarray:
        return np.append(self.train[u], self.valid_target[u])


def leave_one_out(data: SequenceData) -> Split:
    train = [s[:-2] for s in data.sequences]
    valid = np.array([s[-2] for s in data.sequences], dtype=np.int64)
    test = np.array([s[-1] for s in data.sequences], dtype=np.int64)
    return Split(train, valid, test)


def from_user_sequences(histories: Iterable[tuple[Hashable, Sequence[Hashable]]], *, id_order: str = "random",
                        seed: int = 0, name: str = "data", min_items: int = MIN_ITEMS,
                        dropped_before: int = 0) -> SequenceData:
    """Build a dataset from (user id, [item ids in time order]) pairs; users with < min_items are dropped."""
    if id_order not in ID_ORDERS:
        raise ValueError(f"id_order: expected one of {ID_ORDERS}, got {id_order!r}")
    user_ids, raw, dropped = [], [], dropped_before
    for uid, items in histories:
        if len(items) < min_items:
            dropped += 1
            continue
        user_ids.append(uid)
        raw.append(items)
    if not user_ids:
        raise ValueError(f"{name}: no user has at least {min_items} items")
    item_ids = _first_appearance(raw)
    index = {iid: i for i, iid in enumerate(item_ids)}
    sequences = [np.array([index[x] for x in items], dtype=np.int64) for items in raw]
    codes = item_codes(item_ids, id_order, seed)
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d items", name, dropped, min_items)
    return SequenceData(user_ids, item_ids, sequences, codes, name=name, dropped_users=dropped)


def _first_appearance(raw: list) -> list:
    seen: dict = {}
    for items in raw:
        for x in items:
            if x not in seen:
                seen[x] = len(seen)
    return list(seen)


def item_codes(item_ids: list, id_order: str = "random", seed: int = 0) -> list:
    """The text code of each item: a seeded random permutation of 1..N, or the original id."""
    if id_order not in ID_ORDERS:
        raise ValueError(f"id_order: expected one of {ID_ORDERS}, got {id_order!r}")
    if id_order == "original":
        return [str(x) for x in item_ids]
    perm = np.random.default_rng(seed).permutation(len(item_ids)) + 1  # codes 1..N in random order
    return [str(int(c)) for c in perm]


# ---------------------------------------------------------------- loaders


def load(path: str | Path, format: str = "p5", **kwargs) -> SequenceData:
    """Load interactions from `path` in `format` ('p5', 'movielens', 'csv', 'tsv')."""
    if format == "p5":
        return load_p5(path, **kwargs)
    if format == "movielens":
        return load_movielens(path, **kwargs)
    if format in ("csv", "tsv"):
        return load_csv(path, sep="," if format == "csv" else "\t", **kwargs)
    raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")


def _resolve(path: str | Path, default_name: str | None = None) -> Path:
    p = Path(path)
    if p.is_dir() and default_name:
        p = p / default_name
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    return p


def _int(token: str, path: Path, line: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(path, line, f"{what} {token!r} is not an integer") from None


def load_p5(path: str | Path, *, id_order: str = "random", seed: int = 0, skip_empty: bool = True) -> SequenceData:
    """P5's `sequential_data.txt`: one line per user, `user item1 item2 ...`, time order."""
    p = _resolve(path, "sequential_data.txt")
    histories, empty, seen_users = [], 0, set()
    with p.open() as f:
        for n, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                if not skip_empty:
                    raise DataFormatError(p, n, "empty line")
                empty += 1
                continue
            uid = _int(tokens[0], p, n, "user id")
            if uid in seen_users:
                raise DataFormatError(p, n, f"user {uid} appears on more than one line")
            seen_users.add(uid)
            histories.append((uid, [_int(t, p, n, "item id") for t in tokens[1:]]))
    if empty:
        warnings.warn(f"{p}: skipped {empty} empty lines", stacklevel=2)
    return from_user_sequences(histories, id_order=id_order, seed=seed, name=p.parent.name or p.name)


def load_movielens(path: str | Path, *, id_order: str = "random", seed: int = 0) -> SequenceData:
    """MovieLens `u.data` (tab: user item rating time) or `ratings.dat` (user::item::rating::time).

    Each user's items are ordered by timestamp; ties keep the order of the file (stable sort).
    """
    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("ratings.dat", "u.data") if (p / n).is_file()), p / "ratings.dat")
    p = _resolve(p)
    sep = "::" if p.name.endswith(".dat") else "\t"
    rows = []
    with p.open(encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(sep)
            if len(parts) < 4:
                raise DataFormatError(p, n, f"expected 4 fields separated by {sep!r}, got {len(parts)}")
            rows.append((_int(parts[0], p, n, "user id"), _int(parts[1], p, n, "item id"),
                         _int(parts[3], p, n, "timestamp")))
    return _from_rows(rows, id_order, seed, p.parent.name or p.name)


def load_csv(path: str | Path, *, sep: str = ",", user_col: str = "user", item_col: str = "item",
             time_col: str = "timestamp", id_order: str = "random", seed: int = 0) -> SequenceData:
    """A CSV/TSV with a header naming user, item and timestamp columns (ties keep file order).

    Ids are integers when every id in the column is an integer, strings otherwise.
    """
    p = _resolve(path)
    with p.open(newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(p, 1, "empty file, expected a header line")
        cols = []
        for c in (user_col, item_col, time_col):
            if c not in header:
                raise DataFormatError(p, 1, f"column {c!r} not in header {header}")
            cols.append(header.index(c))
        rows = []
        for n, rec in enumerate(reader, 2):
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) != len(header):
                raise DataFormatError(p, n, f"expected {len(header)} fields, got {len(rec)}")
            ts = rec[cols[2]].strip()
            try:
                t = float(ts)
            except ValueError:
                raise DataFormatError(p, n, f"timestamp {ts!r} is not a number") from None
            rows.append((rec[cols[0]].strip(), rec[cols[1]].strip(), t))
    rows = _intify(rows)
    return _from_rows(rows, id_order, seed, p.stem)


def _intify(rows: list) -> list:
    def all_int(col):
        return all(r[col].lstrip("-").isdigit() for r in rows)
    cu, ci = all_int(0), all_int(1)
    return [(int(u) if cu else u, int(i) if ci else i, t) for u, i, t in rows]


def _from_rows(rows: list, id_order: str, seed: int, name: str) -> SequenceData:
    """Group (user, item, time) rows per user, ordered by time with ties in file order."""
    per_user: dict = {}
    for pos, (u, i, t) in enumerate(rows):
        per_user.setdefault(u, []).append((t, pos, i))
    histories = [(u, [i for _, _, i in sorted(evts)]) for u, evts in per_user.items()]
    return from_user_sequences(histories, id_order=id_order, seed=seed, name=name)


# ---------------------------------------------------------------- synthetic default


def synthetic(n_users: int = 2000, n_items: int = 300, seed: int = 0, follow_prob: float = 0.75,
              id_order: str = "random") -> SequenceData:
    """SYNTHETIC data with planted sequential structure (not real interactions).

    Every item i has a fixed successor succ[i]; a user's next item is succ[current] with probability
    `follow_prob`, else a draw from a Zipf-like popularity. A sequential model can learn the
    successor map and clearly beats popularity; lengths are 5..15.
    """
    rng = np.random.default_rng(seed)
    succ = rng.permutation(n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop = rng.permutation(pop / pop.sum())
    histories = []
    for u in range(n_users):
        length = int(rng.integers(5, 16))
        cur = int(rng.choice(n_items, p=pop))
        items = [cur]
        for _ in range(length - 1):
            cur = int(succ[cur]) if rng.random() < follow_prob else int(rng.choice(n_items, p=pop))
            items.append(cur)
        histories.append((u + 1, [x + 1 for x in items]))
    return from_user_sequences(histories, id_order=id_order, seed=seed, name="synthetic (planted successor chains)")


@dataclass
class Catalog:
    """The id maps a model needs at inference: original item/user ids and the item text codes."""

    item_ids: list
    item_codes: list
    user_ids: list

    def __post_init__(self) -> None:
        self.item_index = {iid: i for i, iid in enumerate(self.item_ids)}
        self.user_index = {uid: u for u, uid in enumerate(self.user_ids)}

    @classmethod
    def from_data(cls, data: SequenceData) -> "Catalog":
        return cls(list(data.item_ids), list(data.item_codes), list(data.user_ids))

    def to_dict(self) -> dict:
        return {"item_ids": self.item_ids, "item_codes": self.item_codes, "user_ids": self.user_ids}
