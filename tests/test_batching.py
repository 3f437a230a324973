"""The training batch encoder against its reference: `pad_encoder` over per-example `tokenizer.encode`."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from genrec_fast import batching
from genrec_fast.batching import encode_histories, encode_padded, pad_encoder
from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.tokenizer import GenRecTokenizer

N_ITEMS = 90


@pytest.fixture(scope="module", params=["whole", "pieces"])
def tokenizer(request):
    d = synthetic(n_users=150, n_items=N_ITEMS, seed=2)
    return GenRecTokenizer.train(leave_one_out(d).train, d.item_codes, vocab_size=200, item_tokens=request.param)


@st.composite
def examples(draw):
    n = draw(st.integers(0, 12))
    items = np.array(draw(st.lists(st.integers(0, N_ITEMS - 1), min_size=n, max_size=n)), dtype=np.int64)
    user = draw(st.none() | st.integers(0, 149))
    mask_at = draw(st.none() | st.integers(0, n - 1)) if n else None
    return items, user, mask_at


def _reference(tok, batch, max_len):
    """The reference's arrays, or the ValueError it raises."""
    try:
        enc = pad_encoder([tok.encode(h, u, m, max_len) for h, u, m in batch])
    except ValueError as e:
        return e
    return {k: v.numpy() for k, v in enc.items()}


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(examples(), min_size=1, max_size=6), max_len=st.none() | st.integers(1, 16))
def test_encode_padded_matches_reference(tokenizer, batch, max_len):
    for row in batch:  # alone, so that each row's own error (or none) is compared
        _check(tokenizer, [row], max_len)
    _check(tokenizer, batch, max_len)


def _check(tokenizer, batch, max_len):
    want = _reference(tokenizer, batch, max_len)
    if isinstance(want, ValueError):
        with pytest.raises(ValueError, match="max_len"):
            encode_padded(tokenizer, *zip(*batch), max_len)
        return
    got = encode_padded(tokenizer, *zip(*batch), max_len)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k].numpy(), want[k], err_msg=k)


def test_mask_position_outside_history_is_an_error(tokenizer):
    h = np.array([3, 4, 5])
    with pytest.raises(ValueError, match="mask_at"):
        tokenizer.encode(h, None, 3)
    with pytest.raises(ValueError, match="mask_at"):
        encode_padded(tokenizer, [h], [None], [-1])


@st.composite
def serving_rows(draw):
    n = draw(st.integers(1, 30))
    items = np.array(draw(st.lists(st.integers(0, N_ITEMS - 1), min_size=n, max_size=n)), dtype=np.int64)
    return items, draw(st.none() | st.integers(0, 149))


def _serving_reference(tok, rows, max_items, max_len):
    try:
        enc = pad_encoder([tok.encode(h[-max_items:], u, max_len=max_len) for h, u in rows])
    except ValueError as e:
        return e
    return {k: v.numpy() for k, v in enc.items()}


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(serving_rows(), min_size=1, max_size=6), max_items=st.integers(1, 25),
       max_len=st.integers(3, 60))
def test_encode_histories_matches_reference(tokenizer, rows, max_items, max_len):
    for loop_max in (0, batching.ROW_LOOP_MAX):  # the array operations, then (whole items) the row loop
        old, batching.ROW_LOOP_MAX = batching.ROW_LOOP_MAX, loop_max
        try:
            _check_serving(tokenizer, rows, max_items, max_len)
        finally:
            batching.ROW_LOOP_MAX = old


def _check_serving(tokenizer, rows, max_items, max_len):
    for batch in [[r] for r in rows] + [rows]:  # each row alone (its own error or none), then together
        want = _serving_reference(tokenizer, batch, max_items, max_len)
        hists, users = [h for h, _ in batch], [u for _, u in batch]
        if isinstance(want, ValueError):
            with pytest.raises(ValueError, match="max_len: .* pieces cannot hold the mask and the most recent item"):
                encode_histories(tokenizer, hists, users, max_items, max_len)
            continue
        got = encode_histories(tokenizer, hists, users, max_items, max_len)
        for key in want:
            np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
