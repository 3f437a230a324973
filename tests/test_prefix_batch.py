"""Packed all-prefix batches must give each target the logits of its own single-prefix input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from genrec_fast.batching import pad_encoder, pad_targets
from genrec_fast.config import ModelConfig
from genrec_fast.model import GenRec
from genrec_fast.prefix_batch import pack, pad_packed
from genrec_fast.tokenizer import BOS_ID, GenRecTokenizer

N_ITEMS = 30


@pytest.fixture(scope="module", params=["whole", "pieces"])
def tokenizer(request):
    codes = [str(c) for c in np.random.default_rng(0).permutation(N_ITEMS) + 1]
    return GenRecTokenizer.train([], codes, vocab_size=120, item_tokens=request.param)


def _model(tok, positions):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, ffn_dim=64, n_users=5, n_items=N_ITEMS,
                      encoder_positions=positions, encoder_causal=True, dropout=0.0)
    torch.manual_seed(0)
    m = GenRec(cfg).eval()
    with torch.no_grad():  # non-zero position/ID tables so that a wrong position or id shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _single(model, tok, items, user, target):
    """Logits of one prefix through the ordinary path (causal encoder, teacher-forced target)."""
    enc = pad_encoder([tok.encode(items, user)])
    dec_in, _ = pad_targets([tok.target(target)], BOS_ID)
    return model(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"], dec_in)[0]  # (G, V)


@settings(max_examples=15, deadline=None)
@given(windows=st.lists(st.lists(st.integers(0, N_ITEMS - 1), min_size=2, max_size=7), min_size=1, max_size=3),
       with_user=st.booleans())
def test_every_target_matches_its_own_input_with_start_positions(tokenizer, windows, with_user):
    model = _model(tokenizer, "start")
    users = [(b % 5) if with_user else None for b in range(len(windows))]
    kwargs, labels = pad_packed([pack(tokenizer, w, u, "start") for w, u in zip(windows, users)])
    with torch.no_grad():
        logits = model(**kwargs)  # (B, D, V)
        for b, (w, u) in enumerate(zip(windows, users)):
            at = 0
            for t in range(1, len(w)):
                want = _single(model, tokenizer, w[:t], u, w[t])
                g = len(want)
                torch.testing.assert_close(logits[b, at:at + g], want, atol=1e-4, rtol=1e-4)
                assert labels[b, at:at + g].tolist() == tokenizer.target(w[t]).tolist()
                at += g
            assert (labels[b, at:] == -100).all()


def test_last_target_matches_its_own_input_with_end_positions(tokenizer):
    model = _model(tokenizer, "end")
    windows = [[3, 7, 1, 9], [4, 2], [5, 6, 8, 10, 11, 12]]
    kwargs, _ = pad_packed([pack(tokenizer, w, None, "end") for w in windows])
    with torch.no_grad():
        logits = model(**kwargs)
        for b, w in enumerate(windows):
            want = _single(model, tokenizer, w[:-1], None, w[-1])
            end = sum(len(tokenizer.target(i)) for i in w[1:])
            torch.testing.assert_close(logits[b, end - len(want):end], want, atol=1e-4, rtol=1e-4)


def test_causal_encoder_ignores_later_items(tokenizer):
    """A causal encoder's state of a piece does not change when items are appended after it."""
    model = _model(tokenizer, "start")
    a, b = pad_encoder([tokenizer.encode([1, 2, 3])]), pad_encoder([tokenizer.encode([1, 2, 3, 4, 5])])
    with torch.no_grad():
        ma = model.encode(a["tokens"], a["user_ids"], a["item_ids"], a["mask"])
        mb = model.encode(b["tokens"], b["user_ids"], b["item_ids"], b["mask"])
    n = sum(len(tokenizer.item_pieces[i]) for i in (1, 2, 3))
    torch.testing.assert_close(ma[0, :n], mb[0, :n], atol=1e-5, rtol=1e-5)


def test_pack_rejects_a_window_without_target(tokenizer):
    with pytest.raises(ValueError, match="at least 2 items"):
        pack(tokenizer, [3])
    with pytest.raises(ValueError, match="positions"):
        pack(tokenizer, [3, 4], positions="middle")
