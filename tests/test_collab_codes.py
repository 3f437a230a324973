"""Collaborative item codes: co-occurrence against a brute-force count, planted clusters recovered,
balanced unique codes, codes that only the training part shapes, and the "codes" tokenizer end to end
through recommend() (C++ trie search against the Python reference, seen items pruned)."""
import dataclasses
import logging
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import assert_beam_search_is_exhaustive

from genrec_fast import Recommender, SequenceData, preset
from genrec_fast.collab_codes import balanced_codes, branches_for, build_codes, cooccurrence
from genrec_fast.tokenizer import GenRecTokenizer
from genrec_fast.train import Trainer


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=8), min_size=0, max_size=6), st.integers(1, 4))
def test_cooccurrence_counts_pairs_within_the_window(seqs, window):
    adj = cooccurrence([np.array(s, dtype=np.int64) for s in seqs], 10, window).toarray()
    ref = np.zeros((10, 10))
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + window + 1)):
                if s[i] != s[j]:
                    ref[s[i], s[j]] += 1
                    ref[s[j], s[i]] += 1
    np.testing.assert_array_equal(adj, ref)


def planted(seed: int, clusters: int = 8, size: int = 40, users: int = 2000, noise: float = 0.1):
    """Sequences that stay inside one planted cluster of items (a share `noise` of random items)."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(clusters * size).reshape(clusters, size)
    train = []
    for _ in range(users):
        s = groups[rng.integers(clusters)][rng.integers(0, size, rng.integers(3, 10))]
        train.append(np.where(rng.random(len(s)) < noise, rng.integers(0, clusters * size, len(s)), s))
    truth = np.empty(clusters * size, dtype=np.int64)
    for k, g in enumerate(groups):
        truth[g] = k
    return train, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_clusters_are_the_first_level(seed):
    train, truth = planted(seed)
    codes = build_codes(train, len(truth), levels=1, branches=8, dim=16, seed=seed)
    purity = sum(Counter(truth[codes[:, 0] == v]).most_common(1)[0][1] for v in range(8)) / len(truth)
    assert purity == 1.0


def test_codes_are_balanced_and_unique():
    vectors = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
    codes = balanced_codes(vectors, levels=2, branches=4)
    assert codes.shape == (1000, 3)
    assert len({tuple(c) for c in codes.tolist()}) == 1000
    assert set(np.bincount(codes[:, 0]).tolist()) == {250}  # 1000 / 4 per first-level value
    leaf = np.bincount(codes[:, 0] * 4 + codes[:, 1])
    assert leaf.min() >= 62 and leaf.max() <= 63 and codes[:, 2].max() == leaf.max() - 1
    with pytest.raises(ValueError, match="branches"):
        balanced_codes(vectors, 2, 6)


def _data(rng, n_users=200, n_items=80):
    seqs = [rng.integers(0, n_items, int(rng.integers(4, 9))) for _ in range(n_users)]
    seqs[0] = np.arange(n_items)  # every item appears in some sequence
    return SequenceData(list(range(n_users)), list(range(n_items)), seqs, [str(i + 1) for i in range(n_items)])


def test_validation_and_test_items_never_shape_the_codes(tmp_path):
    rng = np.random.default_rng(0)
    a = _data(rng)
    b = dataclasses.replace(a, sequences=[np.r_[s[:-2], rng.integers(0, 80, 2)] for s in a.sequences])
    p = preset("tiny")
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8)
    ta = Trainer(a, tmp_path / "a", p, progress=False).tokenizer
    tb = Trainer(b, tmp_path / "b", p, progress=False).tokenizer
    np.testing.assert_array_equal(ta.code_table, tb.code_table)
    changed = dataclasses.replace(a, sequences=[np.r_[s[:-3][::-1], s[-3:]] for s in a.sequences])
    tc = Trainer(changed, tmp_path / "c", p, progress=False).tokenizer
    assert not np.array_equal(ta.code_table, tc.code_table)  # the training part does shape them


def test_codes_tokenizer_round_trip(tmp_path):
    table = balanced_codes(np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32), 1, 4)
    tok = GenRecTokenizer.train([], [str(i) for i in range(50)], 200, "codes", table)
    n_sp = tok.sp.get_piece_size()
    assert tok.vocab_size == n_sp + 4 + table[:, 1].max() + 1
    assert tok.item_pieces[7].tolist() == [n_sp + table[7, 0], n_sp + 4 + table[7, 1]]
    assert all(tok.decode_item(tok.item_pieces[i]) == i for i in range(50))
    tok.save(tmp_path)
    again = GenRecTokenizer.load(tmp_path, tok.item_codes)
    np.testing.assert_array_equal(again.item_flat, tok.item_flat)
    with pytest.raises(ValueError, match="code_table"):
        GenRecTokenizer(tok.model_proto, tok.item_codes, "codes", table[:10])
    with pytest.raises(ValueError, match="code_table"):
        GenRecTokenizer(tok.model_proto, tok.item_codes, "whole", table)


def test_recommend_with_codes_matches_the_reference_search():
    items = [f"item{i}" for i in range(300)]
    rec = Recommender.random(items, "tiny", vocab_size=200, item_tokens="codes", code_levels=2, code_branches=4)
    rng = np.random.default_rng(0)
    hists = [[items[j] for j in rng.integers(0, 300, int(rng.integers(1, 12)))] for _ in range(16)]
    fast = rec.recommend(hists, k=10, backend="cpp", exclude_seen=True)
    ref = rec.recommend(hists, k=10, backend="reference", exclude_seen=True)
    for f, r, h in zip(fast, ref, hists):
        assert f.items == r.items
        np.testing.assert_allclose(f.scores, r.scores, rtol=1e-4, atol=1e-5)
        assert not set(f.items) & set(h) and len(set(f.items)) == 10


def test_codes_without_eos_decode_every_level_and_rank_exactly(tmp_path):
    """model.item_eos=False with codes (all items of one length): the decoder learns only the code tokens,
    and the search scores an item by them alone, as brute-force teacher forcing does; the host and device
    searches agree; sub-word pieces (items of several lengths) are refused."""
    from genrec_fast.train import to_batch
    items = [f"item{i}" for i in range(64)]
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random(items, cfg, vocab_size=200, item_tokens="codes", code_levels=2, code_branches=4)
    rng = np.random.default_rng(1)
    hists = [[items[j] for j in rng.integers(0, 64, int(rng.integers(1, 9)))] for _ in range(6)]
    for h in hists[:3]:
        assert_beam_search_is_exhaustive(rec, [rec.catalog.item_index[i] for i in h], None, k=64)
    outs = {b: rec.recommend(hists, k=10, backend=b, exclude_seen=True) for b in ("cpp", "reference", "device")}
    for b in ("reference", "device"):
        assert [r.items for r in outs[b]] == [r.items for r in outs["cpp"]]
        np.testing.assert_allclose([r.scores for r in outs[b]], [r.scores for r in outs["cpp"]], atol=1e-4)

    data = _data(np.random.default_rng(2))
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8)
    p.train = dataclasses.replace(p.train, pretrain_epochs=0, finetune_epochs=1, eval_users=20)
    trainer = Trainer(data, tmp_path / "codes", p, progress=False)
    part = trainer.epoch_batches(pretrain=False)[0]
    _, labels = to_batch(part, trainer.tokenizer, trainer.model.cfg, "cpu")
    assert labels.shape[1] == 2 and (labels == 3).sum() == 0  # two code tokens per target, no EOS
    assert labels.tolist() == [trainer.tokenizer.item_pieces[e.target].tolist() for e in part]
    trainer.run()
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="pieces")
    with pytest.raises(ValueError, match="item_eos=False: needs items of one length"):
        Trainer(data, tmp_path / "pieces", p, progress=False)


def test_code_input_first_reads_one_position_per_item(tmp_path):
    """tokenizer.code_input="first": the encoder reads each item as its first code token (plus its ID), the
    decoder still generates every code token; the option survives save/load and training, and decoding is
    exact against brute force."""
    from genrec_fast.batching import encode_padded
    table = balanced_codes(np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32), 2, 4)
    tok = GenRecTokenizer.train([], [str(i) for i in range(50)], 200, "codes", table, code_input="first")
    enc = tok.encode([7, 11, 7], user=None)
    assert enc.tokens.tolist() == [tok.item_pieces[7][0], tok.item_pieces[11][0], tok.item_pieces[7][0],
                                   tok.mask_id, 3]
    assert enc.item_ids.tolist() == [8, 12, 8, 0, 0]
    padded = encode_padded(tok, [[7, 11, 7], [3]], [None, None], [None, None], 64, "cpu")
    assert padded["tokens"][0, :5].tolist() == enc.tokens.tolist()
    assert len(tok.target(7)) == 4 and tok.target(7)[:3].tolist() == tok.item_pieces[7].tolist()
    tok.save(tmp_path)
    assert GenRecTokenizer.load(tmp_path, tok.item_codes).code_input == "first"
    with pytest.raises(ValueError, match="code_input"):
        GenRecTokenizer(tok.model_proto, tok.item_codes, "codes", table, code_input="sum")

    items = [f"item{i}" for i in range(64)]
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random(items, cfg, vocab_size=200, item_tokens="codes", code_levels=2, code_branches=4,
                             code_input="first")
    assert_beam_search_is_exhaustive(rec, [3, 40, 3, 17], None, k=64)

    p = preset("tiny")
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8,
                                      code_input="first")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=20)
    trainer = Trainer(_data(np.random.default_rng(2)), tmp_path / "run", p, progress=False)
    trainer.run()
    from genrec_fast import load
    assert load(tmp_path / "run" / "best").tokenizer.code_input == "first"


def test_codes_from_a_one_token_checkpoint_recover_its_clusters(tmp_path):
    """tokenizer.code_vectors: the item token vectors of a one-token checkpoint are clustered instead of the
    co-occurrence embedding; planted clusters in those vectors are the first level; a checkpoint of another
    catalog or of sub-word pieces is refused."""
    import torch
    from genrec_fast.checkpoint import save
    data = _data(np.random.default_rng(3))
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random(data.item_ids, cfg, vocab_size=200, item_tokens="whole", seed=0)
    rng = np.random.default_rng(4)
    truth = rng.permutation(np.repeat(np.arange(8), 10))  # (80,) 8 planted groups of 10 items
    centers = rng.standard_normal((8, cfg.d_model)) * 3
    with torch.no_grad():
        rows = torch.as_tensor(rec.tokenizer.item_flat)
        rec.model.shared.weight[rows] = torch.as_tensor(centers[truth] + rng.standard_normal((80, cfg.d_model)),
                                                        dtype=torch.float32)
    path = save(tmp_path / "whole", rec.model, rec.tokenizer, rec.catalog)
    p = preset("tiny")
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8,
                                      code_vectors=str(path))
    table = Trainer(data, tmp_path / "codes", p, progress=False).tokenizer.code_table
    purity = sum(Counter(truth[table[:, 0] == v]).most_common(1)[0][1] for v in range(8)) / len(truth)
    assert purity == 1.0

    other = dataclasses.replace(data, item_ids=[i + 1000 for i in data.item_ids])
    with pytest.raises(ValueError, match="another catalog"):
        Trainer(other, tmp_path / "other", p, progress=False)
    pieces = Recommender.random(data.item_ids, "tiny", vocab_size=200, item_tokens="pieces", seed=0)
    p.tokenizer = dataclasses.replace(p.tokenizer, code_vectors=str(save(tmp_path / "pieces", pieces.model,
                                                                         pieces.tokenizer, pieces.catalog)))
    with pytest.raises(ValueError, match="not a one-token model"):
        Trainer(data, tmp_path / "p", p, progress=False)


def test_branches_for_gives_leaves_of_about_the_asked_size():
    assert branches_for(12_101, 1) == 128  # the codes preset's value on Beauty
    assert branches_for(1_000_000, 1) == 8192  # leaves of ~122: the catalog benchmark's shape
    assert branches_for(1_000_000, 2, 16) == 256
    assert branches_for(10, 1) == 2  # at least two clusters


def test_train_warns_when_leaves_are_large(caplog):
    from genrec_fast.train import warn_large_leaves
    big = balanced_codes(np.random.default_rng(0).standard_normal((4096, 4)), 1, 2)  # 2 leaves of 2,048
    with caplog.at_level(logging.WARNING, logger="genrec_fast"):
        warn_large_leaves(big, 1, 2)
    assert "leaves of up to 2048 items" in caplog.text and "tokenizer.code_branches=32" in caplog.text
    caplog.clear()
    small = balanced_codes(np.random.default_rng(0).standard_normal((4096, 4)), 1, 64)  # leaves of 64
    with caplog.at_level(logging.WARNING, logger="genrec_fast"):
        warn_large_leaves(small, 1, 64)
    assert caplog.text == ""
