import numpy as np
import pytest

import genrec_fast
from genrec_fast.data import from_user_sequences, leave_one_out
from genrec_fast.evaluate import (_first_unseen, evaluate, histories_for, id_leak_ranker, metrics_from_ranks,
                                  model_ranker, popularity_ranker, target_ranks)


def test_metrics_by_hand():
    m = metrics_from_ranks(np.array([0, 4, 9, -1]))
    assert m["HR@5"] == 0.5 and m["HR@10"] == 0.75 and m["HR@20"] == 0.75
    assert m["NDCG@5"] == pytest.approx((1 + 1 / np.log2(6)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(6) + 1 / np.log2(11)) / 4)
    np.testing.assert_array_equal(target_ranks(np.array([[3, 1, 2], [5, 6, 7]]), np.array([2, 9])), [2, -1])
    m = metrics_from_ranks(np.array([5, 10, 20, 19]))  # 0-based: rank k is the (k+1)-th place, outside the top k
    assert (m["HR@5"], m["HR@10"], m["HR@20"]) == (0.0, 0.25, 0.75)
    assert m["NDCG@20"] == pytest.approx((1 / np.log2(7) + 1 / np.log2(12) + 1 / np.log2(21)) / 4)


def test_histories_are_the_training_part_for_validation_and_add_the_validation_item_for_test():
    d = from_user_sequences([(1, [1, 2, 3, 4, 5]), (2, [6, 7, 8])], id_order="original")
    s = leave_one_out(d)
    ids = lambda xs: [d.item_ids[i] for i in xs]  # noqa: E731
    hists, targets = histories_for(s, "valid", [0, 1])
    assert [ids(h) for h in hists] == [[1, 2, 3], [6]] and ids(targets) == [4, 7]
    hists, targets = histories_for(s, "test", [0, 1])
    assert [ids(h) for h in hists] == [[1, 2, 3, 4], [6, 7]] and ids(targets) == [5, 8]


def test_popularity_uses_training_items_only():
    d = from_user_sequences([(1, [1, 1, 2, 9]), (2, [1, 3, 2, 9]), (3, [3, 4, 5, 9])], id_order="original")
    s = leave_one_out(d)
    top = popularity_ranker(s, d.n_items)([s.train[0]], [0], False)[0]
    assert d.item_ids[top[0]] == 1  # 9 is every test target but never in training
    assert 9 not in [d.item_ids[i] for i in top[:4]]
    # 8 is every validation target: not counted either, so it ranks after every item of the training parts
    d = from_user_sequences([(1, [1, 2, 8, 9]), (2, [1, 3, 8, 9]), (3, [4, 5, 8, 9])], id_order="original")
    s = leave_one_out(d)
    top = [d.item_ids[i] for i in popularity_ranker(s, d.n_items)([s.train[0]], [0], False)[0] if i >= 0]
    assert top[0] == 1 and set(top[:5]) == {1, 2, 3, 4, 5}


def test_popularity_excluding_seen_fills_the_list_past_the_seen_items():
    """A history holding 15 of the 20 most popular items: the list is the 5 others and the next 15, no gap."""
    order = np.arange(40)
    seen = np.arange(0, 30, 2)  # 15 items
    np.testing.assert_array_equal(_first_unseen(order, seen), np.r_[np.arange(1, 30, 2), np.arange(30, 35)])


def test_id_leak_rule_exploits_first_appearance_ids():
    # ids numbered by first appearance: the next new item is often max id + 1
    rng = np.random.default_rng(0)
    hist, next_id = [], 1
    for u in range(300):
        seq = []
        for _ in range(6):
            if rng.random() < 0.6:
                seq.append(next_id)
                next_id += 1
            else:
                seq.append(int(rng.integers(1, next_id + 1)))
                next_id = max(next_id, seq[-1] + 1)
        hist.append((u, seq))
    orig = leave_one_out(d := from_user_sequences(hist, id_order="original"))
    leak = evaluate(id_leak_ranker(d.item_codes), orig, "test", progress=False)
    rand = from_user_sequences(hist, id_order="random")
    no_leak = evaluate(id_leak_ranker(rand.item_codes), leave_one_out(rand), "test", progress=False)
    assert leak["HR@20"] > 5 * max(no_leak["HR@20"], 0.01)


def test_trained_model_clearly_beats_popularity(trained, small_synthetic):
    rec, _ = trained
    s = leave_one_out(small_synthetic)
    pop = evaluate(popularity_ranker(s, small_synthetic.n_items), s, "valid", progress=False)
    model = evaluate(model_ranker(rec), s, "valid", progress=False)
    assert model["NDCG@10"] > 2 * pop["NDCG@10"]


def test_bad_part():
    d = from_user_sequences([(1, [1, 2, 3])])
    with pytest.raises(ValueError, match="part: expected one of"):
        evaluate(popularity_ranker(leave_one_out(d), 3), leave_one_out(d), "train")


def test_report_of_a_history_only_model_reuses_the_numbers_it_would_measure(trained, small_synthetic):
    from genrec_fast.evaluate import report
    from genrec_fast.recommend import Recommender
    rec, _ = trained
    history_only = Recommender(rec.model, rec.tokenizer, rec.catalog, rec.max_items, use_users=False)
    s = leave_one_out(small_synthetic)
    rep = report(history_only, s, small_synthetic.item_codes, progress=False)
    measured = evaluate(model_ranker(history_only, use_user=False), s, "test", progress=False)
    drop = ("seconds",)
    want = {k: v for k, v in measured.items() if k not in drop}
    assert {k: v for k, v in rep["test"]["genrec(no user token)"].items() if k not in drop} == want
    with_user = evaluate(model_ranker(rec), s, "test", progress=False)["NDCG@10"]
    assert with_user != want["NDCG@10"]  # the user token matters for this model, so the check can fail


def test_progress_bars_only_on_a_terminal(capsys):
    """Output that is not a terminal (logs, CI) gets no carriage-return bars, even with progress on."""
    from genrec_fast.data import leave_one_out, synthetic
    from genrec_fast.evaluate import evaluate, popularity_ranker
    d = synthetic(n_users=300, n_items=40, seed=0)
    split = leave_one_out(d)
    evaluate(popularity_ranker(split, d.n_items), split, "test", batch_size=10, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "eval test" not in err


def test_baselines_on_a_catalog_smaller_than_the_list():
    """3 items, a history holding all of them: the rows stay (U, 20) with -1 past the catalog, nothing to rank
    is a miss, not a crash."""
    d = from_user_sequences([(1, [1, 2, 3, 1, 2]), (2, [2, 3, 1, 2]), (3, [3, 1, 2, 3])], id_order="original")
    s = leave_one_out(d)
    top = popularity_ranker(s, d.n_items)([s.test_history(u) for u in range(3)], [0, 1, 2], True)
    assert top.shape == (3, 20) and (top[:, 0] == -1).all()  # every item seen: none left
    np.testing.assert_array_equal(target_ranks(np.zeros((2, 0), dtype=np.int64), np.array([1, 2])), [-1, -1])
    m = evaluate(popularity_ranker(s, d.n_items), s, "test", exclude_seen=True, progress=False)
    assert m["HR@20"] == 0.0


@pytest.mark.parametrize("item_tokens", ["whole", "pieces"])
def test_model_ranker_excluding_seen_never_ranks_a_history_item(item_tokens):
    """25 of 30 items in each history, longer than the model's 5-item window: excluding seen items leaves the
    other 5 (every history item excluded, not only the window's), and without exclusion the top 20 holds history
    items."""
    rec = genrec_fast.Recommender.random(range(30), "tiny", item_tokens=item_tokens, max_items=5, n_users=2)
    rng = np.random.default_rng(0)
    hists = [list(rng.permutation(30)[:25]) for _ in range(2)]
    ranker = model_ranker(rec, num_beams=30)
    for top, h in zip(ranker(hists, np.arange(2), True), hists):
        assert set(top[top >= 0].tolist()) == set(range(30)) - set(h)
    assert all(set(top.tolist()) & set(h) for top, h in zip(ranker(hists, np.arange(2), False), hists))
    recs = rec.recommend([[rec.catalog.item_ids[i] for i in h] for h in hists], k=30, exclude_seen=True)
    assert [set(r.items) for r in recs] == [set(range(30)) - set(h) for h in hists]
