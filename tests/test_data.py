import re
import sys
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from genrec_fast import data as D
from genrec_fast.data import (DataFormatError, leave_one_out, load, load_csv, load_movielens, load_p5,
                              synthetic)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_p5_original_ids_and_split(tmp_path):
    p = write(tmp_path, "sequential_data.txt", "1 10 11 12 13\n2 11 14 15\n3 10 16 11\n")
    d = load_p5(p, id_order="original")
    assert d.user_ids == [1, 2, 3] and d.item_ids == [10, 11, 12, 13, 14, 15, 16]
    assert d.item_codes == ["10", "11", "12", "13", "14", "15", "16"]
    s = leave_one_out(d)
    assert [d.item_ids[i] for i in s.train[0]] == [10, 11]
    assert d.item_ids[s.valid_target[0]] == 12 and d.item_ids[s.test_target[0]] == 13
    assert [d.item_ids[i] for i in s.test_history(1)] == [11, 14]


def test_split_never_leaks_targets():
    d = synthetic(n_users=200, n_items=50, seed=1)
    s = leave_one_out(d)
    for u, seq in enumerate(d.sequences):
        assert len(s.train[u]) == len(seq) - 2
        np.testing.assert_array_equal(s.train[u], seq[:-2])
        assert s.valid_target[u] == seq[-2] and s.test_target[u] == seq[-1]
        np.testing.assert_array_equal(s.valid_history(u), seq[:-2])
        np.testing.assert_array_equal(s.test_history(u), seq[:-1])


def test_random_id_order_is_a_seeded_permutation(tmp_path):
    p = write(tmp_path, "s.txt", "".join(f"{u} " + " ".join(str(x) for x in range(u, u + 5)) + "\n" for u in range(1, 30)))
    a, b, c = load_p5(p, seed=0), load_p5(p, seed=0), load_p5(p, seed=1)
    assert a.item_codes == b.item_codes != c.item_codes
    assert sorted(int(x) for x in a.item_codes) == list(range(1, a.n_items + 1))
    assert a.item_ids == load_p5(p, id_order="original").item_ids  # original ids kept in the API


def test_short_users_dropped_with_count(tmp_path, caplog):
    p = write(tmp_path, "s.txt", "1 1 2 3\n2 4 5\n3 6\n4 1 2 3 4\n")
    d = load_p5(p)
    assert d.user_ids == [1, 4] and d.dropped_users == 2
    assert "dropped 2 users" in caplog.text and "2 users with < 3 items dropped" in d.summary()


def test_no_usable_users_say_why(tmp_path):
    with pytest.raises(ValueError, match=r"s.txt: no users \(expected one line per user"):
        load_p5(write(tmp_path, "s.txt", ""))
    with pytest.raises(ValueError, match="none of the 2 users read has at least 3 items"):
        load_p5(write(tmp_path, "t.txt", "1 2\n2 3 4\n"))
    with pytest.raises(ValueError, match="none of the 2 users read has at least 3 items"):
        load_csv(write(tmp_path, "t.csv", "user,item,timestamp\n1,2,1\n2,3,1\n2,4,2\n"))


@pytest.mark.parametrize("text, problem", [
    ("1 2 3 4\n2 x 3 4\n", "s.txt:2: item id 'x' is not an integer"),
    ("u1 2 3 4\n", "s.txt:1: user id 'u1' is not an integer"),
    ("1 2 3 4\n1 5 6 7\n", "s.txt:2: user 1 appears on more than one line"),
])
def test_p5_bad_lines_name_file_and_line(tmp_path, text, problem):
    p = write(tmp_path, "s.txt", text)
    with pytest.raises(DataFormatError, match=problem.replace("(", r"\(")):
        load_p5(p)


def test_p5_empty_lines_warn_or_fail(tmp_path):
    p = write(tmp_path, "s.txt", "1 2 3 4\n\n2 3 4 5\n")
    with pytest.warns(UserWarning, match="skipped 1 empty lines"):
        assert load_p5(p).n_users == 2
    with pytest.raises(DataFormatError, match="s.txt:2: empty line"):
        load_p5(p, skip_empty=False)


@pytest.mark.parametrize("name, content, want", [
    ("r.csv", b"1 2 3\n", "csv"), ("r.TSV", b"", "tsv"), ("r.parquet", b"", "parquet"), ("u.data", b"", "movielens"),
    ("ratings.dat", b"", "movielens"), ("x.txt", b"PAR1\x15\x04", "parquet"), ("x.txt", b"1::2::5::9\n", "movielens"),
    ("x.txt", b"user,item,timestamp\n1,2,3\n", "csv"), ("x.txt", b"1,2,3,4\n", "csv"),
    ("x.txt", b"1\t2\t5\t88\n", "movielens"), ("x.txt", b"user\titem\tts\n", "tsv"),
    ("x.txt", b"1\t2\t5\n", None), ("x.txt", b"1 2 3\n", None), ("sequential_data.txt", b"u 1 2\n", None)])
def test_guess_format_from_suffix_or_first_line(tmp_path, name, content, want):
    (tmp_path / name).write_bytes(content)
    assert D.guess_format(tmp_path / name) == want
    assert D.guess_format(tmp_path / "missing.txt") is None


def test_movielens_orders_by_time_ties_in_file_order(tmp_path):
    udata = "1\t30\t5\t300\n1\t10\t4\t100\n1\t20\t3\t200\n1\t25\t3\t200\n2\t10\t1\t5\n2\t30\t1\t1\n2\t20\t1\t9\n"
    d = load_movielens(write(tmp_path, "u.data", udata), id_order="original")
    assert [d.item_ids[i] for i in d.sequences[0]] == [10, 20, 25, 30]
    assert [d.item_ids[i] for i in d.sequences[1]] == [30, 10, 20]
    dat = "1::10::5::3\n1::11::5::1\n1::12::5::2\n"
    d2 = load_movielens(write(tmp_path, "ratings.dat", dat), id_order="original")
    assert [d2.item_ids[i] for i in d2.sequences[0]] == [11, 12, 10]
    with pytest.raises(DataFormatError, match="u.data:1: expected 4 fields"):
        load_movielens(write(tmp_path, "u.data", "1\t2\n"))


def test_zero_padded_ids_stay_strings(tmp_path):
    """"007" and "7" are two items, spelled as in the file; ids become ints only when that loses nothing."""
    text = "user,item,timestamp\nu,007,1\nu,7,2\nu,000,3\nv,7,1\nv,007,2\nv,0,3\n"
    p = write(tmp_path, "z.csv", text)
    want = ["007", "7", "000", "0"]
    for loader in (load_csv, D._load_csv_reference):
        assert loader(p, id_order="original").item_ids == want
    pq.write_table(pa.table({"user": ["u"] * 3, "item": ["007", "7", "+7"], "timestamp": [1, 2, 3]}),
                   tmp_path / "z.parquet")
    assert load(tmp_path / "z.parquet", "parquet", id_order="original").item_ids == ["007", "7", "+7"]
    plain = write(tmp_path, "p.csv", "user,item,timestamp\nu,0,1\nu,-7,2\nu, 10 ,3\n")
    assert load_csv(plain, id_order="original").item_ids == [0, -7, 10]
    from genrec_fast import Recommender
    rec = Recommender.random(load_csv(p).item_ids, config="tiny", item_tokens="whole")
    assert len(rec.recommend([["007", "7"]], k=2)[0].items) == 2


def test_csv_and_tsv_with_string_ids(tmp_path):
    csv = "user,item,timestamp\nalice,B07,3\nalice,A01,1\nalice,C9,2\nbob,A01,1\nbob,B07,2\nbob,C9,2.5\n"
    d = load(write(tmp_path, "x.csv", csv), "csv", id_order="original")
    assert d.user_ids == ["alice", "bob"]
    assert [d.item_ids[i] for i in d.sequences[0]] == ["A01", "C9", "B07"]
    tsv = "u\ti\tt\n1\t5\t1\n1\t6\t2\n1\t7\t3\n"
    d2 = load_csv(write(tmp_path, "x.tsv", tsv), sep="\t", user_col="u", item_col="i", time_col="t")
    assert d2.user_ids == [1] and sorted(d2.item_ids) == [5, 6, 7]
    with pytest.raises(DataFormatError, match="x.csv:1: column 'timestamp' not in header"):
        load(write(tmp_path, "x.csv", "user,item,time\n1,2,3\n"), "csv")
    with pytest.raises(DataFormatError, match="x.csv:3: timestamp 'soon' is not a number"):
        load(write(tmp_path, "x.csv", "user,item,timestamp\n1,2,3\n1,3,soon\n"), "csv")


def test_bad_arguments():
    with pytest.raises(ValueError, match="format: expected one of"):
        load("x", "xlsx")
    with pytest.raises(ValueError, match="id_order: expected one of"):
        synthetic(id_order="sorted")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_p5("/nonexistent/file.txt")


def test_synthetic_is_deterministic_and_labelled():
    a, b = synthetic(n_users=50, seed=2), synthetic(n_users=50, seed=2)
    assert "synthetic" in a.name
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))


def test_beauty_stats(beauty_path):
    d = load_p5(beauty_path)
    assert (d.n_users, d.n_items, d.n_interactions) == (22363, 12101, 198502)


# ---------------------------------------------------------------- columnar loaders vs the row-by-row references

INT_IDS = ["1", "2", "3", "12", "05", "5", " 7", "-2", "0", "-0"]
STR_IDS = ["a", "B07", "c d", "x", "", "+4", "1.0", "é"]
ODD_INTS = ["1", "3", "\u0663", "04", " 4", "8\u3000"]  # all digits to str.isdigit(): '٣' is 3 to int()
ID_POOLS = [INT_IDS, STR_IDS, INT_IDS + STR_IDS, ODD_INTS, ["1", "2", "--1"]]  # '--1': int() raises
TIMES = ["1", "2", "3", "2.5", "-0", "1e1", " 2", "0.0", "-3"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def outcome(loader, *args, **kwargs):
    """Everything a loader returns (ids with their types), or the exception it raises."""
    try:
        d = loader(*args, **kwargs)
    except Exception as e:  # the columnar loader must fail exactly like the reference
        return ("error", type(e), str(e))
    assert all(s.dtype == np.int64 for s in d.sequences)
    return ([(type(x), x) for x in d.user_ids], [(type(x), x) for x in d.item_ids],
            [s.tolist() for s in d.sequences], d.item_codes, d.dropped_users, d.name)


def compare_with_reference(name, reference, loader, path, **kwargs):
    """Run `loader` with the reference `name` counted, compare with the reference; True when it ran."""
    calls = []
    with mock.patch.object(D, name, side_effect=lambda *a, **k: calls.append(1) or reference(*a, **k)):
        fast = outcome(loader, path, **kwargs)
    assert fast == outcome(reference, path, **kwargs)
    return bool(calls)


@st.composite
def csv_files(draw):
    """A small CSV/TSV text with its separator and whether the columnar reader must read it alone."""
    sep, eol = draw(st.sampled_from([",", "\t"])), draw(st.sampled_from(["\n", "\r\n"]))
    cols = draw(st.permutations(["user", "item", "timestamp"] + draw(st.sampled_from([[], ["rating"]]))))
    pools = {"user": draw(st.sampled_from(ID_POOLS)), "item": draw(st.sampled_from(ID_POOLS)),
             "timestamp": TIMES, "rating": ["5", "", "x"]}
    lines, clean = [sep.join(cols)], True
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["row"] * 12 + ["quoted", "empty", "blank", "separators", "short", "bad time"]))
        row = {c: draw(st.sampled_from(pools[c])) for c in cols}
        if kind == "quoted":
            row["item"] = draw(st.sampled_from(['"a,b"', '"x""y"', '"7"', '"q\nr"']))
        if kind == "bad time":
            row["timestamp"] = draw(st.sampled_from(["soon", "", "nan"]))
        clean &= kind in ("row", "quoted", "empty") and all(row[c].strip() for c in ("user", "item"))  # "": an error
        lines.append({"empty": "", "blank": "  ", "separators": sep * (len(cols) - 1),
                      "short": sep.join(list(row.values())[:-1])}.get(kind, sep.join(row.values())))
    text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    return text, sep, clean and eol in text  # pyarrow rejects a lone header without a line end


@SETTINGS
@given(csv_files())
def test_csv_columnar_equals_reference(tmp_path, case):
    text, sep, clean = case
    p = tmp_path / "log.csv"
    p.write_text(text, newline="")
    used_reference = compare_with_reference("_load_csv_reference", D._load_csv_reference, D.load_csv, p, sep=sep,
                                            id_order=("original", "random")[len(text) % 2])
    assert not (clean and used_reference)  # a clean file never needs the row-by-row parser


@st.composite
def movielens_files(draw):
    """A small u.data / ratings.dat text, its file name and whether the columnar reader must read it alone."""
    dat = draw(st.booleans())
    sep, ids, times = ("::" if dat else "\t"), ["1", "2", "3", "10", "05", " 7"], ["1", "2", "3", "100", "05"]
    lines, clean = [], True
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["row"] * 12 + ["empty", "blank", "short", "odd int", "extra field"]))
        fields = [draw(st.sampled_from(ids)), draw(st.sampled_from(ids)), "4", draw(st.sampled_from(times))]
        if kind == "odd int":
            fields[draw(st.sampled_from([0, 1, 3]))] = draw(st.sampled_from(["+4", "x", "1_0", ""]))
        clean &= kind in ("row", "empty")
        lines.append({"empty": "", "blank": " ", "short": sep.join(fields[:2]),
                      "extra field": sep.join(fields + ["x"])}.get(kind, sep.join(fields)))
    has_row = any(line.strip() for line in lines)  # pyarrow cannot count the columns of an empty file
    return "\n".join(lines) + "\n", ("ratings.dat" if dat else "u.data"), clean and has_row


@SETTINGS
@given(movielens_files())
def test_movielens_columnar_equals_reference(tmp_path, case):
    text, name, clean = case
    p = tmp_path / name
    p.write_text(text, encoding="latin-1")
    used_reference = compare_with_reference("_load_movielens_reference", D._load_movielens_reference,
                                            D.load_movielens, p, id_order="original")
    assert not (clean and used_reference)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(INT_IDS + ODD_INTS[2:]), st.sampled_from(STR_IDS + ["3"]),
                          st.sampled_from([1.0, 2.0, 3.0, -0.0, 0.5])), max_size=40),
       st.booleans(), st.booleans())
def test_parquet_equals_csv_reference(tmp_path, rows, int_users, int_times):
    """The same rows as Parquet (integer or string columns) and as CSV load to the same data."""
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    users, items, times = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    users = pa.array(users, pa.string())
    if int_users and all(D._is_canonical_int(u.strip()) for u in users.to_pylist()):
        users = pa.array([int(u) for u in users.to_pylist()], pa.int64())  # same ids as the integer strings
    times = pa.array(times, pa.float64())
    if int_times and all(t == int(t) for t in times.to_pylist()):
        times = times.cast(pa.int64())
    pq.write_table(pa.table({"user": users, "item": pa.array(items, pa.string()), "timestamp": times}),
                   tmp_path / "log.parquet")
    def same_place(result):  # an error names its own file and row (Parquet rows from 1, CSV lines after the header)
        return result[:2] + (re.sub(r"^\S+?:\d+: ", "", result[2]),) if result[0] == "error" else result
    assert same_place(outcome(load, tmp_path / "log.parquet", "parquet")) == \
        same_place(outcome(D._load_csv_reference, tmp_path / "log.csv"))


@pytest.mark.parametrize("text, by_reference", [
    ("user,item,timestamp\n1,2,nan\n1,3,1\n1,4,nan\n1,5,0\n", True),  # NaN times: the reference's own order
    ("user,item,timestamp\n99999999999999999999,2,1\n99999999999999999999,3,2\n99999999999999999999,2,3\n", False),
    ("user,item,user,timestamp\n1,2,3,1\n1,3,4,2\n1,4,5,3\n", True),  # a wanted column named twice
    ("\ufeffuser,item,timestamp\n1,2,1\n1,3,2\n1,4,3\n", False),  # the csv module keeps the byte-order mark
    ("id,user,item,timestamp\n9,1,2,1\n9,1,3,2\n,,,\n9,1,4,3\n", True),  # a blank line with separators
    ("user,item,timestamp\n1,2,1\n1,3\n", True),  # a short line
])
def test_csv_odd_files_match_reference(tmp_path, text, by_reference):
    p = write(tmp_path, "odd.csv", text)
    assert compare_with_reference("_load_csv_reference", D._load_csv_reference, D.load_csv, p) == by_reference


def test_csv_wrong_field_count_names_the_line(tmp_path):
    with pytest.raises(DataFormatError, match="x.csv:4: expected 3 fields, got 2"):
        load_csv(write(tmp_path, "x.csv", "user,item,timestamp\n1,2,1\n\n1,3\n"))
    with pytest.raises(DataFormatError, match="x.csv:1: empty file"):
        load_csv(write(tmp_path, "x.csv", ""))


def test_movielens_dat_with_a_tab_matches_reference(tmp_path):
    p = write(tmp_path, "ratings.dat", "1::2::5::1\n1::3\t4::5::2\n1::4::5::3\n")
    assert compare_with_reference("_load_movielens_reference", D._load_movielens_reference, D.load_movielens, p)


def test_parquet_types_and_errors(tmp_path):
    def parquet(name, **columns):
        pq.write_table(pa.table(columns), tmp_path / name)
        return tmp_path / name
    p = parquet("ok.parquet", user=pa.array(["a", "a", "a"]).dictionary_encode(), item=pa.array([3, 1, 2], pa.int16()),
                timestamp=pa.array([3, 1, 2], pa.timestamp("s")))
    d = D.load_parquet(p, id_order="original")
    assert d.user_ids == ["a"] and d.item_ids == [1, 2, 3] and d.name == "ok"
    bad = [(parquet("n.parquet", user=[1, None, 1], item=[1, 2, 3], timestamp=[1, 2, 3]),
            "n.parquet:2: column 'user' is null"),
           (parquet("t.parquet", user=[1, 1, 1], item=[1, 2, 3], timestamp=[1.0, float("nan"), 3.0]),
            "t.parquet:2: timestamp in column 'timestamp' is NaN"),
           (parquet("f.parquet", user=[1.5, 1.5, 1.5], item=[1, 2, 3], timestamp=[1, 2, 3]),
            "f.parquet:0: column 'user' has type double, expected integers or strings"),
           (parquet("s.parquet", user=[1, 1, 1], item=[1, 2, 3], timestamp=["a", "b", "c"]),
            "s.parquet:0: column 'timestamp' has type string, expected numbers or timestamps"),
           (parquet("m.parquet", user=[1, 1, 1], item=[1, 2, 3]), "m.parquet:0: column 'timestamp' not in columns"),
           (write(tmp_path, "x.parquet", "user,item\n"), "x.parquet:0: not a Parquet file")]
    for path, problem in bad:
        with pytest.raises(DataFormatError, match=problem):
            load(path, "parquet")
    assert "parquet" in D.FORMATS  # the CLI's --format choices


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(st.integers(-3, 30), st.sampled_from(["a", "b", "7", True, 1.0, 2.5])),
                         max_size=8), max_size=12))
def test_number_items_equals_reference(histories):
    ids, seqs = D._number_items(histories)
    ref_ids, ref_seqs = D._number_items_reference(histories)
    assert [(type(x), x) for x in ids] == [(type(x), x) for x in ref_ids]  # True and 1.0 merge into 1 in both
    assert [s.tolist() for s in seqs] == [s.tolist() for s in ref_seqs] and all(s.dtype == np.int64 for s in seqs)


def test_python_whitespace_is_what_strip_removes():
    assert D._PY_WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def test_encodings_and_empty_cells_are_named(tmp_path):
    bom = b"\xef\xbb\xbf"  # Excel's "CSV UTF-8", Notepad
    (tmp_path / "b.txt").write_bytes(bom + b"1 5 6 7\n2 6 7 5\n")
    assert load_p5(tmp_path / "b.txt", id_order="original").user_ids == [1, 2]
    (tmp_path / "b.csv").write_bytes(bom + b"user,item,timestamp\n1,a,1\n1,b,2\n1,c,3\n")
    assert load_csv(tmp_path / "b.csv").item_ids == ["a", "b", "c"]
    (tmp_path / "l.txt").write_bytes(b"1 5 6 7\n2 6 \xe9 5\n")
    with pytest.raises(DataFormatError, match=r"l.txt:2: byte b'\\xe9' is not UTF-8 text"):
        load_p5(tmp_path / "l.txt")
    (tmp_path / "l.csv").write_bytes(b"user,item,timestamp\n1,a,1\n1,caf\xe9,3\n")
    with pytest.raises(DataFormatError, match=r"l.csv:3: byte b'\\xe9' is not UTF-8 text"):
        load_csv(tmp_path / "l.csv")
    for body, said in (("1,4,3\n1,,2\n1,5,1\n", "e.csv:3: column 'item' is empty"),
                       ("1,4,3\n1,5,NaN\n1,6,1\n", "e.csv:3: timestamp 'NaN' is not a finite number"),
                       ("1,4,3\n1,5,inf\n", "e.csv:3: timestamp 'inf' is not a finite number")):
        with pytest.raises(DataFormatError, match=said):
            load_csv(write(tmp_path, "e.csv", "user,item,timestamp\n" + body))
    spaced = write(tmp_path, "s.csv", "user, item, timestamp\n1,a,1\n1,b,2\n1,c,3\n")
    assert load_csv(spaced).item_ids == ["a", "b", "c"]
    renamed = write(tmp_path, "r.csv", "userId,movieId,timestamp\n1,10,1\n1,11,2\n1,12,3\n")
    with pytest.raises(DataFormatError, match="column 'user' not in header .* --columns USER,ITEM,TIME"):
        load_csv(renamed)
    assert load_csv(renamed, user_col="userId", item_col="movieId").item_ids == [10, 11, 12]


def test_p5_ids_are_plain_integers(tmp_path):
    """int() would read '1_0' as 10, '+3' as 3 and '٣' as 3, merging distinct ids without a word."""
    for token in ("1_0", "+3", "\u0663", "--3"):
        with pytest.raises(DataFormatError, match=re.escape(f"p.txt:2: item id {token!r} is not an integer")):
            load_p5(write(tmp_path, "p.txt", f"1 5 6 7\n2 6 {token} 5\n"))
    assert load_p5(write(tmp_path, "p.txt", "1 5 6 -7\n2 6 -7 5\n"), id_order="original").item_ids == [5, 6, -7]


def test_resolve_id_takes_any_integer_but_no_bool():
    strs, ints = {"5": 0, "x": 1}, {5: 0, 1: 1}
    assert [D.resolve_id(strs, x) for x in (5, np.int64(5), np.uint8(5), np.int32(6), "05")] == ["5"] * 3 + [None] * 2
    assert [D.resolve_id(ints, x) for x in (np.int64(5), "5", True, np.True_)] == [5, 5, None, None]
    assert [D.resolve_id(ints, x) for x in (5.0, np.float64(5), np.float32(1))] == [None] * 3


def test_movielens_csv_form_says_how_to_read_it(tmp_path):
    """ml-latest-small and ml-25m ship ratings.csv; the errors name load_csv's and the CLI's arguments."""
    p = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    how = r"CSV form of MovieLens.*load_csv\(path, user_col='userId', item_col='movieId'\).*--format csv " \
          r"--columns userId,movieId,timestamp"
    with pytest.raises(FileNotFoundError, match="no ratings.dat or u.data in .*: its ratings.csv is the " + how):
        load_movielens(tmp_path)
    with pytest.raises(DataFormatError, match="ratings.csv:1: load_movielens reads u.data or ratings.dat; this is "
                                              "the " + how):
        load(p, "movielens")
