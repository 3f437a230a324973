import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.tokenizer import EOS_ID, UNK_ID, GenRecTokenizer


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


@pytest.mark.parametrize("mode", ["pieces", "whole"])
def test_items_are_stored_flat(tok_data, mode):
    _, d, s = tok_data
    tok = GenRecTokenizer.train(s.train, d.item_codes, vocab_size=200, item_tokens=mode)
    assert tok.item_offsets.shape == (d.n_items + 1,) and tok.item_offsets.dtype == np.int64
    assert tok.item_flat.shape == (tok.item_offsets[-1],) and tok.item_flat.dtype == np.int64
    assert len(tok.item_pieces) == d.n_items
    for i in (0, 7, d.n_items - 1, -1):
        want = tok.item_flat[tok.item_offsets[i % d.n_items]:tok.item_offsets[i % d.n_items + 1]]
        np.testing.assert_array_equal(tok.item_pieces[i], want)
    assert [p.tolist() for p in tok.item_pieces] == [p.tolist() for p in tok.item_pieces[:]]
    with pytest.raises(IndexError):
        tok.item_pieces[d.n_items]
    if mode == "pieces":  # the pieces are sentencepiece's encoding of each item's text
        assert [p.tolist() for p in tok.item_pieces] == tok.sp.encode([f"item_{c}" for c in d.item_codes])


def test_whole_items_need_no_item_text_and_no_histories():
    """The issue's failure: one line listing a million items passed sentencepiece's max_sentence_length and
    training died on an empty corpus. Whole items train sentencepiece on the users' text alone."""
    codes = [str(c) for c in np.random.default_rng(0).permutation(1_000_000) + 1]
    tok = GenRecTokenizer.train([], codes, vocab_size=1000, item_tokens="whole")
    n_sp = tok.sp.get_piece_size()
    assert tok.vocab_size == n_sp + len(codes) and tok.item_flat[-1] == n_sp + len(codes) - 1
    assert tok.decode_item([n_sp + 123_456]) == 123_456
    for u in (0, 9, 123_456_788):  # every user's text encodes without unknown pieces
        assert 1 not in tok.user_pieces(u).tolist() and tok.sp.decode(tok.user_pieces(u).tolist()) == f"user_{u + 1}"
    other = GenRecTokenizer.train([], codes[:10], vocab_size=1000, item_tokens="whole")
    assert other.model_proto == tok.model_proto  # item codes no longer shape the BPE model


def test_pieces_training_text_is_cut_into_bounded_lines(monkeypatch):
    from genrec_fast import tokenizer
    d = synthetic(n_users=50, n_items=3000, seed=1)
    s = leave_one_out(d)
    lines = tokenizer.training_lines(s.train, d.item_codes, "pieces")
    assert max(len(x.split()) for x in lines) <= max(tokenizer.WORDS_PER_LINE, 65)  # 65: user + 64 items
    assert sorted(w for x in lines[50:] for w in x.split() if w.startswith("item_")) == \
        sorted(f"item_{c}" for c in d.item_codes)  # every item's text, once
    tok = GenRecTokenizer.train(s.train, d.item_codes, vocab_size=300)
    monkeypatch.setattr(tokenizer, "WORDS_PER_LINE", 10**7)  # the old form: one line listing every item
    assert GenRecTokenizer.train(s.train, d.item_codes, vocab_size=300).model_proto == tok.model_proto


def test_pieces_without_histories_encode_items_and_users():
    codes = [str(c) for c in range(1, 2001)]
    tok = GenRecTokenizer.train([], codes, vocab_size=300)
    assert UNK_ID not in tok.item_flat and UNK_ID not in tok.user_pieces(1234).tolist()


def test_unknown_and_duplicate_items_are_refused(tok_data):
    tok, d, _ = tok_data
    with pytest.raises(ValueError, match="'7Q' has unknown pieces"):
        GenRecTokenizer(tok.model_proto, ["1", "2", "7Q"])
    with pytest.raises(ValueError, match="items 0 and 2 share the piece sequence"):
        GenRecTokenizer(tok.model_proto, ["12", "3", "12"])
    with pytest.raises(KeyError):
        tok.decode_item([EOS_ID])
    whole = GenRecTokenizer(tok.model_proto, d.item_codes, item_tokens="whole")
    for not_an_item in ([EOS_ID], [whole.vocab_size], [whole.vocab_size - 1, EOS_ID], []):
        with pytest.raises(KeyError):
            whole.decode_item(not_an_item)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=4), max_size=30))
def test_first_duplicate_finds_a_repeated_piece_sequence(seqs):
    _assert_first_duplicate(seqs)


def _assert_first_duplicate(seqs):
    from genrec_fast.tokenizer import _flatten, first_duplicate
    offsets, flat = _flatten(seqs)
    got = first_duplicate(offsets, flat)
    if len({tuple(x) for x in seqs}) == len(seqs):
        assert got is None
    else:
        i, j = got
        assert i != j and seqs[i] == seqs[j]


def test_a_vocabulary_below_the_texts_characters_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="tokenizer.vocab_size: 5 is below the"):
        GenRecTokenizer.train([np.array([1, 2])], ["item_1", "item_2", "item_3"], 5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 7, 2 ** 20, 2 ** 31 - 1]), max_size=4), max_size=30))
def test_first_duplicate_with_ids_whose_bits_do_not_pack(seqs):
    """Pieces of up to 31 bits: 3-4 of them no longer fit one int64 key, the byte-string keys take over."""
    _assert_first_duplicate(seqs)
