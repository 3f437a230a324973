import numpy as np
import pytest

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
        load("x", "parquet")
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
