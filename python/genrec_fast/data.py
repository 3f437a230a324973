"""Interaction data: loaders (P5, MovieLens, CSV/TSV, Parquet), id order, leave-one-out split, synthetic default.

Items and users keep their original ids in the API. Internally a user is an index `u` in
`0..n_users-1` and an item an index `i` in `0..n_items-1`; the text of item `i` is `item_<code>`
where the code is a seeded random permutation (`id_order="random"`, default) or the original id
(`id_order="original"`: P5 numbers items by first appearance, which leaks the answer).

Interaction logs (CSV/TSV, MovieLens, Parquet) load column by column with pyarrow and numpy
(`_from_columns`); the row-by-row loaders they replaced stay as plain references
(`_load_csv_reference`, `_load_movielens_reference`, `_from_rows`) and the tests compare the two.
A CSV the fast parser cannot read exactly like the reference (a malformed line, a blank line with
separators, a non-numeric, NaN or infinite timestamp, an empty id, bytes that are not UTF-8) is re-read by
the reference, which names the bad line.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

log = logging.getLogger(__name__)

ID_ORDERS = ("random", "original")
FORMATS = ("p5", "movielens", "csv", "tsv", "parquet")
MIN_ITEMS = 3  # leave-one-out needs a train item, a validation target and a test target
# what str.strip() removes: every character c with c.isspace() (tests check it against Python)
_PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                  "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_INT = r"-?[0-9]+"  # a plain integer id: the reference, int() and pyarrow's cast all agree on it
_INT_PATTERN = rf"^{_INT}$"
# an id string that is the canonical spelling of its int (str(int(s)) == s): no leading zero, '+', '-0' or spaces, so
# reading it as an int loses nothing ("007" and "7" stay two ids)
_CANONICAL_INT_PATTERN = r"^(0|-?[1-9][0-9]*)$"


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
    """Each user's last item is the test target, the second-to-last the validation target (`Split`)."""
    train = [s[:-2] for s in data.sequences]
    valid = np.array([s[-2] for s in data.sequences], dtype=np.int64)
    test = np.array([s[-1] for s in data.sequences], dtype=np.int64)
    return Split(train, valid, test)


def from_user_sequences(histories: Iterable[tuple[Hashable, Sequence[Hashable]]], *, id_order: str = "random",
                        seed: int = 0, name: str = "data", min_items: int = MIN_ITEMS,
                        dropped_before: int = 0) -> SequenceData:
    """Build a dataset from (user id, [item ids in time order]) pairs; users with < min_items are dropped."""
    _check_id_order(id_order)
    user_ids, raw, dropped = [], [], dropped_before
    for uid, items in histories:
        if len(items) < min_items:
            dropped += 1
            continue
        user_ids.append(uid)
        raw.append(items)
    if not user_ids:
        raise ValueError(f"{name}: none of the {dropped - dropped_before} users read has at least {min_items} items "
                         "(leave-one-out takes a training, a validation and a test item from each)")
    item_ids, sequences = _number_items(raw)
    return _dataset(user_ids, item_ids, sequences, id_order=id_order, seed=seed, name=name, dropped=dropped,
                    min_items=min_items)


def _check_id_order(id_order: str) -> None:
    if id_order not in ID_ORDERS:
        raise ValueError(f"id_order: expected one of {ID_ORDERS}, got {id_order!r}")


def _dataset(user_ids: list, item_ids: list, sequences: list, *, id_order: str, seed: int, name: str,
             dropped: int, min_items: int) -> SequenceData:
    """The SequenceData of the kept users, with item codes; logs how many users were dropped."""
    codes = item_codes(item_ids, id_order, seed)
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d items", name, dropped, min_items)
    return SequenceData(user_ids, item_ids, sequences, codes, name=name, dropped_users=dropped)


def _number_items(raw: list) -> tuple[list, list]:
    """Item ids by first appearance over the histories, and each history as an int64 array of item indices.

    Same result as `_number_items_reference`; dict.fromkeys and map run the per-item loops in C.
    """
    index = dict(zip(dict.fromkeys(itertools.chain.from_iterable(raw)), itertools.count()))
    flat = np.fromiter(map(index.__getitem__, itertools.chain.from_iterable(raw)), dtype=np.int64,
                       count=sum(map(len, raw)))
    return list(index), _split(flat, np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)))


def _number_items_reference(raw: list) -> tuple[list, list]:
    """Plain reference of `_number_items`."""
    item_ids = _first_appearance(raw)
    index = {iid: i for i, iid in enumerate(item_ids)}
    return item_ids, [np.array([index[x] for x in items], dtype=np.int64) for items in raw]


def _split(flat: np.ndarray, lengths: np.ndarray) -> list:
    """`flat` cut into consecutive pieces of the given lengths (views of `flat`, no copies, like np.split)."""
    ends = np.cumsum(lengths).tolist()
    return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]  # one slice per user (np.split is 20x slower)


def _first_appearance(raw: list) -> list:
    seen: dict = {}
    for items in raw:
        for x in items:
            if x not in seen:
                seen[x] = len(seen)
    return list(seen)


def item_codes(item_ids: list, id_order: str = "random", seed: int = 0) -> list:
    """The text code of each item: a seeded random permutation of 1..N, or the original id."""
    _check_id_order(id_order)
    if id_order == "original":
        return list(map(str, item_ids))
    perm = np.random.default_rng(seed).permutation(len(item_ids)) + 1  # codes 1..N in random order
    return list(map(str, perm.tolist()))


# ---------------------------------------------------------------- loaders


def load(path: str | Path, format: str = "p5", **kwargs) -> SequenceData:
    """Load interactions from `path` in `format` ('p5', 'movielens', 'csv', 'tsv', 'parquet')."""
    if format == "p5":
        return load_p5(path, **kwargs)
    if format == "movielens":
        return load_movielens(path, **kwargs)
    if format in ("csv", "tsv"):
        return load_csv(path, sep="," if format == "csv" else "\t", **kwargs)
    if format == "parquet":
        return load_parquet(path, **kwargs)
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


_P5_LINE = re.compile(rf"[ \t]*{_INT}(?:[ \t]+{_INT})*[ \t\r\n]*").fullmatch  # ids as `_plain_int` takes them


def _plain_int(token: str, path: Path, line: int, what: str) -> int:
    """A P5 id: ASCII digits with an optional '-' (not '1_0', '+3' or other scripts' digits, which int() takes:
    P5's ids are plain integers, and those spellings would merge distinct ids silently)."""
    if re.fullmatch(_INT_PATTERN, token):
        return int(token)
    raise DataFormatError(path, line, f"{what} {token!r} is not an integer")


NAME_COLUMNS = ("name other columns with user_col=, item_col=, time_col=, or --columns USER,ITEM,TIME on the "
                "command line")


def _not_utf8(p: Path, e: UnicodeDecodeError) -> DataFormatError:
    """A DataFormatError naming the line of the first byte that is not UTF-8 (read again as bytes to find it)."""
    raw = p.read_bytes()
    try:
        raw.decode("utf-8")
        at = e.start  # (not reached: the file did not decode)
    except UnicodeDecodeError as whole:  # e.start counts from the decoder's last buffer, this from the file's start
        at = whole.start
    return DataFormatError(p, raw[:at].count(b"\n") + 1, f"byte {raw[at:at + 1]!r} is not UTF-8 text "
                                                          "(save the file as UTF-8)")


def load_p5(path: str | Path, *, id_order: str = "random", seed: int = 0, skip_empty: bool = True) -> SequenceData:
    """P5's `sequential_data.txt`: one line per user, `user item1 item2 ...`, time order (UTF-8, a BOM allowed)."""
    p = _resolve(path, "sequential_data.txt")
    try:
        return _load_p5(p, id_order, seed, skip_empty)
    except UnicodeDecodeError as e:
        raise _not_utf8(p, e) from None


def _load_p5(p: Path, id_order: str, seed: int, skip_empty: bool) -> SequenceData:
    histories, empty, seen_users = [], 0, set()
    with p.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                if not skip_empty:
                    raise DataFormatError(p, n, "empty line")
                empty += 1
                continue
            if _P5_LINE(line) is None:  # one match a line; the token at fault named by `_plain_int`
                for what, t in zip(itertools.chain(["user id"], itertools.repeat("item id")), tokens):
                    _plain_int(t, p, n, what)
            uid = int(tokens[0])
            if uid in seen_users:
                raise DataFormatError(p, n, f"user {uid} appears on more than one line")
            seen_users.add(uid)
            histories.append((uid, [int(t) for t in tokens[1:]]))
    if empty:
        warnings.warn(f"{p}: skipped {empty} empty lines", stacklevel=3)
    if not histories:
        raise ValueError(f"{p}: no users (expected one line per user: `user item1 item2 ...`)")
    return from_user_sequences(histories, id_order=id_order, seed=seed, name=p.parent.name or p.name)


FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".data": "movielens",
                    ".dat": "movielens"}  # (u.data, ratings.dat: MovieLens's names)


def guess_format(path: str | Path) -> str | None:
    """The format (one of FORMATS other than 'p5') that a file looks written in, from its suffix (.csv, .tsv,
    .parquet, .data, .dat) or else its first bytes (Parquet's magic PAR1; a first line with '::' or commas; with
    tabs, four integer fields as MovieLens's u.data or a header as a TSV); None when it may well be P5. For the
    hint beside a P5 parse error."""
    p = Path(path)
    if p.suffix.lower() in FORMAT_BY_SUFFIX:
        return FORMAT_BY_SUFFIX[p.suffix.lower()]
    try:
        with p.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    first = head.split(b"\n", 1)[0]
    if head.startswith(b"PAR1"):
        return "parquet"
    if b"::" in first:
        return "movielens"
    if b"," in first:
        return "csv"
    if b"\t" in first:
        fields = first.strip().split(b"\t")
        if len(fields) == 4 and all(re.fullmatch(rb"-?[0-9]+", x.strip()) for x in fields):
            return "movielens"
        return "tsv" if not re.fullmatch(rb"-?[0-9]+", fields[0].strip()) else None
    return None


def load_movielens(path: str | Path, *, id_order: str = "random", seed: int = 0) -> SequenceData:
    """MovieLens `u.data` (tab: user item rating time) or `ratings.dat` (user::item::rating::time).

    Each user's items are ordered by timestamp; ties keep the order of the file (stable sort).
    Read into columns by pyarrow; a file it cannot read exactly like `_load_movielens_reference`
    (a short line, a non-integer field) is read by the reference, which names the bad line.
    """
    p = _movielens_file(path)
    columns = _read_movielens_columns(p)
    if columns is None:
        log.info("%s: reading row by row (the columnar reader cannot read it exactly)", p)
        return _load_movielens_reference(p, id_order=id_order, seed=seed)
    return _from_columns(*columns, id_order=id_order, seed=seed, name=p.parent.name or p.name)


MOVIELENS_CSV = ("the CSV form of MovieLens (ml-latest-small, ml-25m: userId,movieId,rating,timestamp); read it with "
                 "load_csv(path, user_col='userId', item_col='movieId') or on the command line with --format csv "
                 "--columns userId,movieId,timestamp")


def _movielens_file(path: str | Path) -> Path:
    """The u.data / ratings.dat file at path (a file or a directory holding one); the CSV form is an error saying
    how to read it (`MOVIELENS_CSV`)."""
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in ("ratings.dat", "u.data") if (p / n).is_file()), None)
        if found is None and (p / "ratings.csv").is_file():
            raise FileNotFoundError(f"no ratings.dat or u.data in {p}: its ratings.csv is {MOVIELENS_CSV}")
        p = found or p / "ratings.dat"
    p = _resolve(p)
    if p.suffix.lower() == ".csv":
        raise DataFormatError(p, 1, f"load_movielens reads u.data or ratings.dat; this is {MOVIELENS_CSV}")
    return p


def _movielens_sep(p: Path) -> str:
    return "::" if p.name.endswith(".dat") else "\t"


def _load_movielens_reference(path: str | Path, *, id_order: str = "random", seed: int = 0) -> SequenceData:
    """Plain reference of `load_movielens`: one Python tuple per line."""
    p = _movielens_file(path)
    sep = _movielens_sep(p)
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


def _read_movielens_columns(p: Path) -> tuple | None:
    """Encoded user and item columns and the int64 times of a MovieLens file, or None (use the reference)."""
    source = str(p)
    if _movielens_sep(p) == "::":
        data = p.read_bytes()
        if b"\t" in data:
            return None
        source = pa.BufferReader(data.replace(b"::", b"\t"))  # the fields of str.split("::"); .dat files are small
    fields = ["f0", "f1", "f3"]  # user, item, timestamp
    try:
        table = pa_csv.read_csv(source, read_options=pa_csv.ReadOptions(autogenerate_column_names=True),
                                parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
                                convert_options=_convert_options(dict.fromkeys(fields, pa.string())))
    except pa.ArrowException:  # a short or ragged line
        return None
    users, items, times = (_int_values(table.column(f)) for f in fields)
    if users is None or items is None or times is None:
        return None
    return _first_appearance_codes(users), _first_appearance_codes(items), times.to_numpy()


def load_csv(path: str | Path, *, sep: str = ",", user_col: str = "user", item_col: str = "item",
             time_col: str = "timestamp", id_order: str = "random", seed: int = 0) -> SequenceData:
    """A CSV/TSV with a header naming user, item and timestamp columns (ties keep file order).

    Ids are stripped of surrounding whitespace; a column's ids are ints when every one is the canonical spelling of
    its int (str(int(s)) == s: "7", "-3", not "007", "+7" or "-0"), so the conversion loses nothing, and strings
    otherwise ("007" and "7" stay two items, and "007" is spelled as in the file). Read into columns
    by pyarrow (multithreaded); a file it cannot read exactly like `_load_csv_reference` (a malformed
    line, a blank line with separators, a non-numeric, NaN or infinite timestamp, an empty id, bytes that
    are not UTF-8) is read by the reference, which raises the DataFormatError naming the line. A UTF-8 BOM
    is dropped.
    """
    p = _resolve(path)
    header = _csv_header(p, sep)
    cols = _header_columns(p, header, (user_col, item_col, time_col))
    names = [header[c] for c in cols]
    columns = _read_csv_columns(p, sep, names) if _distinct_in_header(header, names) else None
    if columns is None:
        log.info("%s: reading row by row (the columnar reader cannot read it exactly)", p)
        return _load_csv_reference(p, sep=sep, user_col=user_col, item_col=item_col, time_col=time_col,
                                   id_order=id_order, seed=seed)
    return _from_columns(*columns, id_order=id_order, seed=seed, name=p.stem)


def _csv_header(p: Path, sep: str) -> list | None:
    """The first record of the file as the csv module reads it (None for an empty file; a UTF-8 BOM dropped)."""
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter=sep), None)
    except UnicodeDecodeError as e:
        raise _not_utf8(p, e) from None


def _header_columns(p: Path, header: list | None, names: Sequence[str]) -> list:
    """The header position of each wanted column; DataFormatError at line 1 when one is missing."""
    if header is None:
        raise DataFormatError(p, 1, "empty file, expected a header line")
    stripped = [h.strip() for h in header]  # ("user, item, timestamp" names its columns too)
    for c in names:
        if c not in stripped:
            raise DataFormatError(p, 1, f"column {c!r} not in header {header} ({NAME_COLUMNS})")
    return [stripped.index(c) for c in names]


def _distinct_in_header(header: list, names: list) -> bool:
    """Whether the wanted columns are distinct and each named once (pyarrow selects columns by name)."""
    return len(set(names)) == len(names) and all(header.count(c) == 1 for c in names)


def _load_csv_reference(path: str | Path, *, sep: str = ",", user_col: str = "user", item_col: str = "item",
                        time_col: str = "timestamp", id_order: str = "random", seed: int = 0) -> SequenceData:
    """Plain reference of `load_csv`: the csv module, one Python tuple per row."""
    p = _resolve(path)
    try:
        return _read_csv_reference(p, sep, user_col, item_col, time_col, id_order, seed)
    except UnicodeDecodeError as e:
        raise _not_utf8(p, e) from None


def _read_csv_reference(p: Path, sep: str, user_col: str, item_col: str, time_col: str, id_order: str,
                        seed: int) -> SequenceData:
    with p.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, None)
        cols = _header_columns(p, header, (user_col, item_col, time_col))
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
            if not math.isfinite(t):
                raise DataFormatError(p, n, f"timestamp {ts!r} is not a finite number")
            user, item = rec[cols[0]].strip(), rec[cols[1]].strip()
            for name, value in ((user_col, user), (item_col, item)):
                if not value:
                    raise DataFormatError(p, n, f"column {name!r} is empty")
            rows.append((user, item, t))
    rows = _intify(rows)
    return _from_rows(rows, id_order, seed, p.stem)


def _read_csv_columns(p: Path, sep: str, names: list) -> tuple | None:
    """Encoded user and item columns and float64 times, or None when pyarrow cannot read the file exactly.

    None sends the file to the reference, which reads it or raises the DataFormatError of its bad line.
    """
    types = {names[0]: pa.string(), names[1]: pa.string(), names[2]: pa.float64()}
    try:
        table = pa_csv.read_csv(p, parse_options=pa_csv.ParseOptions(delimiter=sep, newlines_in_values=True),
                                convert_options=_convert_options(types))
    except pa.ArrowException:  # a ragged line, a blank or non-numeric timestamp, not UTF-8
        return None
    times = table.column(names[2]).to_numpy()
    if not np.isfinite(times).all():  # the reference names the line of a NaN or infinite time
        return None
    users, items = _encode_ids(table.column(names[0])), _encode_ids(table.column(names[1]))
    if _empty_id_row(*users) is not None or _empty_id_row(*items) is not None:
        return None  # an empty id: the reference names its line
    return users, items, times


def _convert_options(types: dict) -> pa_csv.ConvertOptions:
    """Read only the typed columns, and no value as null: a field is its text, as for the csv module."""
    return pa_csv.ConvertOptions(include_columns=list(types), column_types=types, null_values=[],
                                 strings_can_be_null=False, quoted_strings_can_be_null=False)


def load_parquet(path: str | Path, *, user_col: str = "user", item_col: str = "item", time_col: str = "timestamp",
                 id_order: str = "random", seed: int = 0) -> SequenceData:
    """A Parquet file with user, item and timestamp columns; each user's items by (timestamp, row order).

    Integer id columns give int ids; string id columns follow `load_csv`'s rule (stripped; ints when
    every id is the canonical spelling of its int, strings otherwise). Timestamps are any integer, float or
    timestamp column, compared exactly.
    A DataFormatError gives as its line the 1-based row, or 0 for a problem with the file or schema.
    """
    import pyarrow.parquet as pq  # only Parquet users pay for its import

    p = _resolve(path)
    try:
        available = pq.read_schema(p).names
    except pa.ArrowException as e:
        raise DataFormatError(p, 0, f"not a Parquet file ({e})") from None
    for c in (user_col, item_col, time_col):
        if c not in available:
            raise DataFormatError(p, 0, f"column {c!r} not in columns {available} ({NAME_COLUMNS})")
    table = pq.read_table(p, columns=list(dict.fromkeys((user_col, item_col, time_col))))
    users, items = (_parquet_ids(p, table.column(c), c) for c in (user_col, item_col))
    times = _parquet_times(p, table.column(time_col), time_col)
    return _from_columns(users, items, times, id_order=id_order, seed=seed, name=p.stem)


def _parquet_ids(p: Path, col: pa.ChunkedArray, name: str) -> tuple:
    """`_encode_ids` of a Parquet column of integers or strings (dictionary-encoded or not)."""
    _check_no_nulls(p, col, name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_integer(col.type):
        return _first_appearance_codes(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        codes, ids = _encode_ids(col)
        row = _empty_id_row(codes, ids)
        if row is not None:
            raise DataFormatError(p, row + 1, f"column {name!r} is empty")
        return codes, ids
    raise DataFormatError(p, 0, f"column {name!r} has type {col.type}, expected integers or strings")


def _parquet_times(p: Path, col: pa.ChunkedArray, name: str) -> np.ndarray:
    """A Parquet timestamp column as numbers: integers and floats as they are, timestamps as int64."""
    _check_no_nulls(p, col, name)
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataFormatError(p, 0, f"column {name!r} has type {col.type}, expected numbers or timestamps")
    times = col.to_numpy()
    if pa.types.is_floating(col.type) and np.isnan(times).any():
        raise DataFormatError(p, int(np.flatnonzero(np.isnan(times))[0]) + 1, f"timestamp in column {name!r} is NaN")
    return times


def _check_no_nulls(p: Path, col: pa.ChunkedArray, name: str) -> None:
    if col.null_count:
        row = pc.index(pc.is_null(col), True).as_py()
        raise DataFormatError(p, row + 1, f"column {name!r} is null")


def _is_canonical_int(s: str) -> bool:
    """Whether s is the canonical spelling of an int (str(int(s)) == s), so int(s) loses nothing."""
    return re.fullmatch(_CANONICAL_INT_PATTERN, s) is not None


def _intify(rows: list) -> list:
    """(user, item, time) rows with each id column as ints when every id in it is canonical (`_is_canonical_int`)."""
    def all_int(col):
        return all(_is_canonical_int(r[col]) for r in rows)
    cu, ci = all_int(0), all_int(1)
    return [(int(u) if cu else u, int(i) if ci else i, t) for u, i, t in rows]


def _from_rows(rows: list, id_order: str, seed: int, name: str) -> SequenceData:
    """Group (user, item, time) rows per user, by time with ties in file order; reference of `_from_columns`."""
    per_user: dict = {}
    for pos, (u, i, t) in enumerate(rows):
        per_user.setdefault(u, []).append((t, pos, i))
    histories = [(u, [i for _, _, i in sorted(evts)]) for u, evts in per_user.items()]
    return from_user_sequences(histories, id_order=id_order, seed=seed, name=name)


# ---------------------------------------------------------------- columnar core (numpy + pyarrow, no per-row Python)


def _from_columns(users: tuple, items: tuple, times: np.ndarray, *, id_order: str, seed: int, name: str,
                  min_items: int = MIN_ITEMS) -> SequenceData:
    """Columnar twin of `_from_rows`: the rows as columns in file order, the same SequenceData.

    users, items: (per-row code, id of each code), codes numbered by first appearance (`_encode_ids`);
    times: (N,) numbers. Users keep their first-appearance order, each user's rows are ordered by
    (time, file order), users with < min_items rows are dropped, and items are numbered by first
    appearance in the grouped order of the kept users.
    """
    _check_id_order(id_order)
    (u, user_ids), (i, item_ids) = users, items
    counts = np.bincount(u, minlength=len(user_ids))  # (U,) rows per user
    keep = counts >= min_items
    if not keep.any():
        raise ValueError(f"{name}: none of the {len(user_ids)} users read has at least {min_items} items "
                         "(leave-one-out takes a training, a validation and a test item from each)")
    rows = _grouped_rows(u, times, keep)  # (M,) row numbers, user by user, in time order
    item_index, first = _first_appearance_codes(i[rows])  # items renumbered in the grouped order
    sequences = _split(item_index.astype(np.int64), counts[keep])
    return _dataset(user_ids[keep].tolist(), item_ids[first].tolist(), sequences, id_order=id_order, seed=seed,
                    name=name, dropped=int(np.count_nonzero(~keep)), min_items=min_items)


def _grouped_rows(u: np.ndarray, times: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Row numbers of the kept users' rows sorted by (user code, time), ties in file order."""
    order = pc.sort_indices(pa.table({"u": u, "t": times}),  # a stable sort: ties keep file order
                            sort_keys=[("u", "ascending"), ("t", "ascending")]).to_numpy()
    return order if keep.all() else order[keep[u[order]]]


def _first_appearance_codes(values) -> tuple[np.ndarray, np.ndarray]:
    """Values numbered by first appearance: ((N,) int32 codes 0, 1, ..., the distinct values in that order)."""
    encoded = pc.dictionary_encode(pa.array(values) if isinstance(values, np.ndarray) else values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()  # the chunks share one dictionary (one hash table for the column)
    return encoded.indices.to_numpy(), encoded.dictionary.to_numpy(zero_copy_only=False)


def _encode_ids(col) -> tuple[np.ndarray, np.ndarray]:
    """`_first_appearance_codes` of a string id column under the reference's rule (`_intify`).

    The stripped ids are ints when every one is the canonical spelling of its int, strings otherwise.
    Distinct canonical spellings are distinct ints, so no two ids ever merge.
    """
    ints = _int_values(col, _CANONICAL_INT_PATTERN)
    if ints is not None:
        return _first_appearance_codes(ints)
    codes, ids = _first_appearance_codes(pc.utf8_trim(col, _PY_WHITESPACE))
    if not all(_is_canonical_int(v) for v in ids):  # stops at the first other id, usually ids[0]
        return codes, ids
    out = np.empty(len(ids), dtype=object)  # rare: canonical ids past int64, as Python ints
    out[:] = [int(v) for v in ids]
    return codes, out


def _empty_id_row(codes: np.ndarray, ids: np.ndarray) -> int | None:
    """`_encode_ids`' output -> the first row whose (stripped) id is empty, else None (a look at the distinct ids;
    the rows only when one is empty)."""
    empty = np.flatnonzero(ids == "") if ids.dtype == object else ()
    return None if not len(empty) else int(np.argmax(codes == empty[0]))


def _int_values(col, pattern: str = _INT_PATTERN):
    """The string column as int64 (pyarrow) when every stripped value matches `pattern` (`_INT_PATTERN`: a plain
    ASCII integer; `_CANONICAL_INT_PATTERN`: also its int's canonical spelling) and fits int64, else None."""
    decimal = pc.ascii_is_decimal(col)  # the common case: only digits, no sign, no spaces
    if not _all_true(decimal):
        first_other = col[pc.index(decimal, False).as_py()].as_py()
        if re.fullmatch(pattern, first_other.strip()) is None:
            return None  # a string id: skip the whole-column checks below
        col = pc.utf8_trim(col, _PY_WHITESPACE)
        if not _all_true(pc.match_substring_regex(col, pattern)):
            return None
    elif pattern == _CANONICAL_INT_PATTERN and _has_leading_zero(col):
        return None
    try:
        return pc.cast(col, pa.int64())
    except pa.ArrowInvalid:  # beyond int64
        return None


def _has_leading_zero(digits) -> bool:
    """Whether a column of ASCII digit strings holds one with a leading zero ("007"; "0" itself is canonical)."""
    zero_first = pc.starts_with(digits, "0")
    if not pc.any(zero_first).as_py():  # the common case: one cheap pass
        return False
    return pc.any(pc.and_(zero_first, pc.greater(pc.utf8_length(digits), 1))).as_py()


def _all_true(mask) -> bool:
    return pc.all(mask).as_py() is not False  # None (no values) counts as true, like Python's all([])


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


ID_CHARS = 40  # an unknown id echoed in an error at most this long (its repr): a 1 MB id is not a 1 MB error


def short_ids(ids: Sequence) -> str:
    """The first five of `ids` as a list for an error message, each repr cut to ID_CHARS characters ("...")."""
    shown = [repr(x) if len(repr(x)) <= ID_CHARS else repr(x)[:ID_CHARS - 3] + "..." for x in ids[:5]]
    return "[" + ", ".join(shown) + ("" if len(ids) <= 5 else f", ... ({len(ids)} in all)") + "]"


# True == 1 and 79.0 == 79 as dict keys: a bool or a float is never read as an id (the name each type is refused by)
NOT_ID_TYPES = {bool: "a bool", np.bool_: "a bool", float: "a float", np.float16: "a float", np.float32: "a float",
                np.float64: "a float"}
_NOT_ID_CLASSES = (bool, np.bool_, float, np.floating)  # isinstance: subclasses and every numpy float too


def resolve_id(index: dict, x):
    """An id as the catalog spells it: x itself, else 5 <-> "5" (canonical spellings only: not "05", " 5");
    None when the catalog has neither (`Catalog.item_index` / `user_index`). Any integer (numbers.Integral:
    int, np.int64, ...) counts as its int; a bool or a float is no id (None), though True == 1 and 79.0 == 79."""
    if isinstance(x, _NOT_ID_CLASSES):
        return None
    if x in index:
        return x
    try:
        other = str(int(x)) if isinstance(x, numbers.Integral) else int(x)
    except (TypeError, ValueError, OverflowError):  # (None, NaN, inf, a tuple, "sku1": no int spelling)
        return None
    return other if other in index and str(other) == str(x) else None


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
