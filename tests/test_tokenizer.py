import numpy as np
import pytest

from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.tokenizer import EOS_ID, GenRecTokenizer


@pytest.fixture(scope="module")
def tok_data():
    d = synthetic(n_users=200, n_items=120, seed=5)
    s = leave_one_out(d)
    return GenRecTokenizer.train(s.train, d.item_codes, vocab_size=200), d, s


def test_item_round_trip_and_uniqueness(tok_data):
    tok, d, _ = tok_data
    seqs = {tuple(p.tolist()) for p in tok.item_pieces}
    assert len(seqs) == d.n_items
    for i in range(d.n_items):
        assert tok.decode_item(tok.item_pieces[i]) == i
        assert tok.sp.decode(tok.item_pieces[i].tolist()) == f"item_{d.item_codes[i]}"


def test_text_round_trip(tok_data):
    tok, d, s = tok_data
    e = tok.encode(s.train[0], user=0)
    text = tok.sp.decode([t for t in e.tokens.tolist() if t != EOS_ID])
    # the mask piece follows the last item directly (no word boundary piece)
    assert text == "user_1 " + " ".join(f"item_{d.item_codes[i]}" for i in s.train[0]) + "<mask>"


def test_id_alignment(tok_data):
    tok, _, s = tok_data
    items = s.train[1]
    e = tok.encode(items, user=1)
    assert (e.user_ids[:len(tok.user_pieces(1))] == 2).all()
    for i in items:  # every piece of item i carries index i + 1
        assert (e.item_ids == i + 1).sum() == len(tok.item_pieces[i]) * (items == i).sum()
    assert e.tokens[-2] == tok.mask_id and e.tokens[-1] == EOS_ID and e.item_ids[-2] == 0


def test_pretrain_mask_in_place_and_truncation(tok_data):
    tok, _, s = tok_data
    items = np.array([0, 1, 2, 3, 4])
    e = tok.encode(items, mask_at=2)
    assert (e.tokens == tok.mask_id).sum() == 1 and 3 not in e.item_ids
    full = tok.encode(items)
    short = tok.encode(items, max_len=len(full.tokens) - 1)
    assert 1 not in short.item_ids and 5 in short.item_ids  # the oldest item went first
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(items, max_len=2)


def test_save_load(tmp_path, tok_data):
    tok, d, _ = tok_data
    tok.save(tmp_path)
    tok2 = GenRecTokenizer.load(tmp_path, d.item_codes)
    assert all(np.array_equal(a, b) for a, b in zip(tok.item_pieces, tok2.item_pieces))


def test_whole_item_tokens(tmp_path, tok_data):
    _, d, s = tok_data
    tok = GenRecTokenizer.train(s.train, d.item_codes, vocab_size=200, item_tokens="whole")
    n_sp = tok.sp.get_piece_size()
    assert tok.vocab_size == n_sp + d.n_items
    assert [p.tolist() for p in tok.item_pieces] == [[n_sp + i] for i in range(d.n_items)]
    e = tok.encode(s.train[0], user=0)
    body = e.tokens[e.item_ids > 0]
    assert body.tolist() == [n_sp + i for i in s.train[0]]  # one token per history item, in order
    assert tok.target(7).tolist() == [n_sp + 7, EOS_ID]
    tok.save(tmp_path)
    again = GenRecTokenizer.load(tmp_path, d.item_codes)
    assert again.item_tokens == "whole" and again.vocab_size == tok.vocab_size


def test_bad_item_tokens_named(tok_data):
    tok, d, _ = tok_data
    with pytest.raises(ValueError, match="item_tokens"):
        GenRecTokenizer(tok.model_proto, d.item_codes, item_tokens="words")
