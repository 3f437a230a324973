import numpy as np
import pytest

import genrec_fast
from genrec_fast.data import leave_one_out
from genrec_fast.tokenizer import EOS_ID

from brute_force import assert_beam_search_is_exhaustive


def test_beam_search_equals_exhaustive_ranking(trained, small_synthetic):
    rec, _ = trained
    split = leave_one_out(small_synthetic)
    for u in (0, 7, 42):
        assert_beam_search_is_exhaustive(rec, split.test_history(u), u)


def test_recommend_returns_valid_distinct_sorted_items(trained, small_synthetic):
    rec, _ = trained
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s[:-1]] for s in d.sequences[:20]]
    out = genrec_fast.recommend(rec, hists, k=10, users=d.user_ids[:20])
    assert len(out) == 20
    for r in out:
        assert len(r.items) == 10 == len(set(r.items))
        assert set(r.items) <= set(d.item_ids)
        assert r.scores == sorted(r.scores, reverse=True)
    # batching does not change results
    again = rec.recommend(hists, k=10, users=d.user_ids[:20], batch_size=3)
    assert [r.items for r in again] == [r.items for r in out]
    np.testing.assert_allclose([r.scores for r in again], [r.scores for r in out], atol=1e-5)


def test_backends_agree_on_a_trained_model(trained, small_synthetic):
    rec, _ = trained
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s[:-1]] for s in d.sequences[:16]]
    a = rec.recommend(hists, k=20, backend="cpp", exclude_seen=True)
    b = rec.recommend(hists, k=20, backend="reference", exclude_seen=True)
    assert [r.items for r in a] == [r.items for r in b]
    np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], atol=1e-5)


def test_filters(trained, small_synthetic):
    rec, _ = trained
    d = small_synthetic
    hist = [d.item_ids[i] for i in d.sequences[0]]
    r = rec.recommend([hist], k=10, exclude_seen=True)[0]
    assert not set(r.items) & set(hist) and len(r.items) == 10
    allowed = d.item_ids[::7]
    r = rec.recommend([hist], k=5, allowed_items=allowed)[0]
    assert set(r.items) <= set(allowed) and len(r.items) == 5


def test_new_users_and_long_histories(trained, small_synthetic):
    rec, _ = trained
    d = small_synthetic
    assert rec.use_users  # the fixture trains with user tokens (dropped 20% of the time)
    long = [d.item_ids[i % d.n_items] for i in range(500)]
    out = rec.recommend([long, long[-3:]], k=5, users=["someone new", None])
    assert all(len(r.items) == 5 for r in out)
    # only the most recent items matter once the window is full
    tail = rec.recommend([long[-rec.max_items:]], k=5)[0]
    assert out[0].items == tail.items
    # an unknown user is served from the history alone; a known user's token changes the input
    h = long[-5:]
    new, anon, known = (rec.recommend([h], k=5, users=[u])[0] for u in ("someone new", None, d.user_ids[0]))
    assert new == anon and known.scores != anon.scores


def test_bad_requests(trained, small_synthetic):
    rec, _ = trained
    good = [small_synthetic.item_ids[0]]
    with pytest.raises(ValueError, match=r"histories\[1\]: empty history"):
        rec.recommend([good, []])
    with pytest.raises(ValueError, match=r"histories\[0\]: unknown item ids \[-5\]"):
        rec.recommend([good + [-5]])
    with pytest.warns(UserWarning, match="skipped 1 unknown item ids"):
        assert len(rec.recommend([good + [-5]], k=3, unknown_items="skip")[0].items) == 3
    with pytest.raises(ValueError, match="no known item left"):
        with pytest.warns(UserWarning):
            rec.recommend([[-5]], unknown_items="skip")
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        rec.recommend([good], k=0)
    with pytest.raises(ValueError, match=r"num_beams: expected an integer >= k \(10\), got 5"):
        rec.recommend([good], k=10, num_beams=5)
    with pytest.raises(ValueError, match="users: expected 1 entries"):
        rec.recommend([good], users=[1, 2])
    with pytest.raises(ValueError, match="unknown_items: expected one of"):
        rec.recommend([good], unknown_items="ignore")
    with pytest.raises(ValueError, match="allowed_items: unknown item ids"):
        rec.recommend([good], allowed_items=["nope"])
    with pytest.raises(TypeError, match="histories: expected a list"):
        rec.recommend("1 2 3")
    with pytest.raises(TypeError, match="model: expected a Recommender"):
        genrec_fast.recommend("path/to/model", [good])
    with pytest.raises(ValueError, match="backend"):
        rec.recommend([good], backend="gpu")


def test_trie_holds_exactly_the_catalog(trained):
    rec, _ = trained
    seqs = set()
    def walk(node, prefix):
        for e in range(rec.trie.child_ptr[node], rec.trie.child_ptr[node + 1]):
            tok, child = int(rec.trie.child_token[e]), int(rec.trie.child_node[e])
            if tok == EOS_ID:
                seqs.add(tuple(prefix))
                assert rec.tokenizer.decode_item(prefix) == rec.trie.leaf_item[child]
            else:
                walk(child, prefix + [tok])
    walk(0, [])
    assert seqs == {tuple(p.tolist()) for p in rec.tokenizer.item_pieces}


def test_random_model_from_a_catalog():
    from genrec_fast import Recommender
    items = [f"sku{i}" for i in range(300)]
    rec = Recommender.random(items, "tiny", vocab_size=200)
    out = rec.recommend([items[:5], items[10:12]], k=20, exclude_seen=True)
    for r, h in zip(out, (items[:5], items[10:12])):
        assert len(set(r.items)) == 20 and set(r.items) <= set(items) and not set(r.items) & set(h)


def test_whole_item_tokens_beam_search_equals_exhaustive_ranking():
    from genrec_fast import Recommender
    items = [f"sku{i}" for i in range(150)]
    rec = Recommender.random(items, "tiny", vocab_size=200, item_tokens="whole", seed=3)
    assert rec.tokenizer.vocab_size == rec.model.cfg.vocab_size == rec.tokenizer.sp.get_piece_size() + 150
    assert_beam_search_is_exhaustive(rec, [4, 9, 33, 120], None)


def one_token_model(n_items=150, seed=3):
    """A random model whose items are one token each, without EOS: served by one step + top-k."""
    import dataclasses
    from genrec_fast import Recommender, preset
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    return Recommender.random([f"sku{i}" for i in range(n_items)], cfg, vocab_size=200, item_tokens="whole",
                              seed=seed)


def test_one_step_path_equals_the_trie_search_and_brute_force():
    rec = one_token_model()
    assert rec.one_step
    rng = np.random.default_rng(0)
    ids = rec.catalog.item_ids
    hists = [[ids[i] for i in rng.choice(len(ids), int(rng.integers(1, 40)))] for _ in range(13)]
    for exclude_seen, allowed in ((False, None), (True, None), (True, ids[::3]), (False, [])):
        kw = dict(k=20, exclude_seen=exclude_seen, allowed_items=allowed)
        rec._trie = None
        fast = rec.recommend(hists, **kw)
        assert rec._trie is None  # the one-step path never builds the trie
        for backend in ("cpp", "reference"):
            slow = rec.recommend(hists, backend=backend, **kw)
            assert [r.items for r in fast] == [r.items for r in slow]
            np.testing.assert_allclose(np.concatenate([r.scores for r in fast]),
                                       np.concatenate([r.scores for r in slow]), atol=1e-5)
    assert all(r.items == [] for r in rec.recommend(hists, k=5, allowed_items=[]))
    assert_beam_search_is_exhaustive(rec, [4, 9, 33, 120], None, k=150)  # every item, in order


def test_one_step_path_k_beyond_the_catalog():
    rec = one_token_model(n_items=30)
    out = rec.recommend([["sku1", "sku2"]], k=50, exclude_seen=True)[0]
    assert sorted(out.items) == sorted(set(rec.catalog.item_ids) - {"sku1", "sku2"})
    assert out.scores == sorted(out.scores, reverse=True)


def test_one_step_path_keeps_a_trained_checkpoints_metrics(small_synthetic, tmp_path, monkeypatch):
    """Quality unchanged: test metrics through the serving path (packed encoder, first step without a
    cache, fused head + top-k) equal those of the previous path (padded encoder, cached step, trie search)."""
    import dataclasses
    from genrec_fast import preset, train
    from genrec_fast.evaluate import evaluate, model_ranker
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False)
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=50, lr=5e-3)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    rec = train(small_synthetic, tmp_path / "run", p, progress=False)
    split = leave_one_out(small_synthetic)
    from genrec_fast.model import GenRec
    encode = GenRec.encode
    for exclude_seen in (False, True):
        fast = evaluate(model_ranker(rec), split, "test", exclude_seen=exclude_seen, progress=False)
        with monkeypatch.context() as m:  # the previous path: padded encoder layers, trie search
            m.setattr(GenRec, "encode", lambda self, *a, **kw: encode(self, *a, **kw, packed=False))
            slow = evaluate(model_ranker(rec, backend="cpp"), split, "test", exclude_seen=exclude_seen, progress=False)
        fast.pop("seconds"), slow.pop("seconds")
        assert fast == slow and fast["NDCG@10"] > 0.1
    assert rec._trie is not None  # "cpp" did run the trie search


def test_edge_requests_do_not_crash_the_trie_search(trained, small_synthetic):
    """k beyond the catalog, an empty allow-list, a history longer than the window: answers, not errors."""
    rec, _ = trained
    ids = small_synthetic.item_ids
    out = rec.recommend([ids[:3]], k=len(ids) + 40, exclude_seen=True)[0]
    assert sorted(out.items) == sorted(set(ids) - set(ids[:3]))  # every other item, once
    assert rec.recommend([ids[:3]], k=5, allowed_items=[])[0].items == []
    long = [ids[i % len(ids)] for i in range(3 * rec.max_items)]
    assert rec.recommend([long], k=5)[0].items == rec.recommend([long[-rec.max_items:]], k=5)[0].items


@pytest.mark.parametrize("which", ["trie search", "one step"])
def test_concurrent_calls_from_threads_equal_serial_ones(trained, small_synthetic, which):
    """8 threads share one model (as a server's workers would): every answer equals the serial one.
    Each call owns its search / top-k state; the trie and weights are only read."""
    from concurrent.futures import ThreadPoolExecutor
    rec = trained[0] if which == "trie search" else one_token_model()
    ids = rec.catalog.item_ids
    rng = np.random.default_rng(5)
    requests = [([ids[i] for i in rng.choice(len(ids), int(rng.integers(1, 25)))], bool(rng.integers(2)))
                for _ in range(48)]
    serial = [rec.recommend([h], k=10, exclude_seen=ex)[0] for h, ex in requests]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            got = list(pool.map(lambda r: rec.recommend([r[0]], k=10, exclude_seen=r[1])[0], requests))
            assert [g.items for g in got] == [s.items for s in serial]
            assert [g.scores for g in got] == [s.scores for s in serial]


def test_loose_arguments_are_refused(trained):
    rec, _ = trained
    hist = [rec.catalog.item_ids[:3]]
    for kwargs, said in (({"k": True}, "k: expected a positive integer, got True"),
                         ({"k": 5, "num_beams": 4.0}, "num_beams: expected an integer >= k"),
                         ({"exclude_seen": "yes"}, "exclude_seen: expected True, False or None, got 'yes'"),
                         ({"batch_size": True}, "batch_size: expected a positive integer")):
        with pytest.raises(ValueError, match=said):
            rec.recommend(hist, **kwargs)
    assert rec.recommend(hist, k=3, exclude_seen=np.bool_(True))[0].items == rec.recommend(hist, k=3,
                                                                                           exclude_seen=True)[0].items


def test_a_huge_k_is_the_whole_catalog(trained, monkeypatch):
    """k (and the beams) beyond the catalog explore nothing more: the same answer as k = the catalog size, without
    (users x k) search arrays (k = 10**9 would need gigabytes: the decode is stopped before it if they reach it)."""
    rec, _ = trained
    hist, n = [rec.catalog.item_ids[:3]], len(rec.catalog.item_ids)
    decode = rec.decode

    def bounded(enc, k, num_beams, *args, **kwargs):
        assert k <= n and num_beams <= n, (k, num_beams)
        return decode(enc, k, num_beams, *args, **kwargs)

    monkeypatch.setattr(rec, "decode", bounded)
    whole, huge = rec.recommend(hist, k=n)[0], rec.recommend(hist, k=10 ** 9)[0]
    assert huge.items == whole.items and len(huge.items) == n
    np.testing.assert_allclose(huge.scores, whole.scores, rtol=1e-6)
    narrow = rec.recommend(hist, k=5, num_beams=10 ** 9)[0]
    assert narrow.items == rec.recommend(hist, k=5, num_beams=n)[0].items


def test_ids_match_as_the_cli_and_server_match_them(trained, small_synthetic):
    """recommend() finds "5" in a catalog of ints and 5 in one of strings (`data.resolve_id`), for histories,
    users and allowed_items alike, with the same results as the catalog's own spelling."""
    rec, _ = trained
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s[:-1]] for s in d.sequences[:4]]
    users, allowed = d.user_ids[:4], d.item_ids[::3]
    want = rec.recommend(hists, k=5, users=users, allowed_items=allowed)
    got = rec.recommend([[str(x) for x in h] for h in hists], k=5, users=[str(u) for u in users],
                        allowed_items=[str(x) for x in allowed])
    assert [r.items for r in got] == [r.items for r in want]
    assert [r.scores for r in got] == [r.scores for r in want]
    anonymous = rec.recommend(hists, k=5, allowed_items=allowed)
    assert [r.scores for r in got] != [r.scores for r in anonymous]  # the users were found, not dropped
    with pytest.raises(ValueError, match=r"unknown item ids \['05'\]"):  # canonical spellings only
        rec.recommend([["05"]], k=5)
    strings = genrec_fast.Recommender.random([str(i) for i in range(1, 40)], "tiny", vocab_size=300)
    a = strings.recommend([[3, 17]], k=5, allowed_items=range(1, 20))
    b = strings.recommend([["3", "17"]], k=5, allowed_items=[str(i) for i in range(1, 20)])
    assert a == b and set(a[0].items) <= {str(i) for i in range(1, 20)}


def test_numpy_integers_find_a_catalog_of_strings():
    rec = genrec_fast.Recommender.random([str(i) for i in range(20)], "tiny", item_tokens="whole")
    want = rec.recommend([["5", "7"]], k=3, allowed_items=["1", "2", "3"])
    assert rec.recommend([np.array([5, 7])], k=3, allowed_items=np.arange(1, 4)) == want


def test_allowed_items_and_bools_are_refused_by_name():
    rec = genrec_fast.Recommender.random(list(range(20)), "tiny", item_tokens="whole")
    for bad, shown in (("123", "str '123'"), (5, "int 5")):
        with pytest.raises(TypeError, match=f"allowed_items: expected a collection of item ids .*got {shown}"):
            rec.recommend([[1]], allowed_items=bad)
    with pytest.raises(TypeError, match=r"histories\[1\]: True is a bool, expected item ids"):
        rec.recommend([[1], [2, True]])
    with pytest.raises(TypeError, match="allowed_items: np.False_ is a bool|allowed_items: False is a bool"):
        rec.recommend([[1]], allowed_items=[2, np.bool_(False)])


def test_floats_are_no_ids():
    """79.0 == 79 finds the item 79 in a dict; the server's schema refuses it, and so does recommend()."""
    rec = genrec_fast.Recommender.random(list(range(20)), "tiny", item_tokens="whole")
    with pytest.raises(TypeError, match=r"histories\[0\]: 7.0 is a float, expected item ids"):
        rec.recommend([[1, 7.0]])
    with pytest.raises(TypeError, match=r"allowed_items: (np.float32\()?2.0\)? is a float"):
        rec.recommend([[1]], allowed_items=np.array([2.0, 3.0], dtype=np.float32))
    with pytest.raises(TypeError, match=r"users: 0.0 is a float, expected user ids"):
        rec.recommend([[1]], users=[0.0])
    assert rec.recommend([[1, 7]], k=3, allowed_items=np.array([2, 3, 4]))[0].items


def test_random_catalog_is_read_once_distinct_and_not_empty():
    rec = genrec_fast.Recommender.random((f"s{i}" for i in range(30)), "tiny", item_tokens="whole")
    assert rec.catalog.item_ids == [f"s{i}" for i in range(30)]
    assert len(set(rec.recommend([["s1"]], k=30)[0].items)) == 30
    with pytest.raises(ValueError, match="item_ids: expected distinct ids, got 's2' more than once"):
        genrec_fast.Recommender.random(["s1", "s2", "s3", "s2"], "tiny")
    with pytest.raises(ValueError, match="item_ids: expected at least one item id, got none"):
        genrec_fast.Recommender.random([], "tiny")


@pytest.mark.parametrize("name, tokens", [("tiny", "pieces"), ("recommended", "whole"), ("codes", "codes")])
def test_random_takes_the_presets_item_tokens(name, tokens):
    rec = genrec_fast.Recommender.random([f"s{i}" for i in range(50)], name)
    assert rec.tokenizer.item_tokens == tokens
    assert len(rec.recommend([["s1", "s2"]], k=3)[0].items) == 3


def test_skip_warning_names_the_callers_line():
    rec = genrec_fast.Recommender.random([str(i) for i in range(20)], "tiny", item_tokens="whole")
    for call in (lambda: rec.recommend([["1", "zz"]], unknown_items="skip"),
                 lambda: genrec_fast.recommend(rec, [["1", "zz"]], unknown_items="skip")):
        with pytest.warns(UserWarning, match=r"skipped 1 unknown item ids \['zz'\]") as record:
            call()
        assert [w.filename for w in record] == [__file__]


def test_unknown_ids_are_echoed_cut_short():
    rec = genrec_fast.Recommender.random([str(i) for i in range(1, 40)], "tiny", vocab_size=300)
    with pytest.raises(ValueError, match=r"unknown item ids \['" + "y" * 36 + r"\.\.\.'?\]") as e:
        rec.recommend([["y" * 100_000]], k=5)
    assert len(str(e.value)) < 200
