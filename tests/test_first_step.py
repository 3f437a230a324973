"""The C++ first step (csrc/first_step.cpp) against its PyTorch reference: encoder, first decoder step, bias pairs."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import genrec_fast.decoding as decoding
from genrec_fast import Recommender, preset
from genrec_fast.config import ModelConfig
from genrec_fast.first_step import (USERS_PER_THREAD, chosen, decoder_step, encode, first_step, first_step_reference,
                                   unusable)
from genrec_fast.history_bias import HistoryBias
from genrec_fast.model import GenRec

FIRST_ITEM = 10  # token of item 0; tokens below are specials and user pieces


def _model(d, heads, ffn, enc, dec, history, transition, reverse, positions, scale, n_items=40, n_users=6, seed=0):
    cfg = ModelConfig(vocab_size=FIRST_ITEM + n_items + 3, d_model=d, n_heads=heads, ffn_dim=ffn, encoder_layers=enc,
                      decoder_layers=dec, max_positions=32, item_eos=False, history_bias=history,
                      transition_bias=transition, transition_reverse=reverse, transition_neighbors=4,
                      transition_context=2, encoder_positions=positions, scale_embedding=scale, n_users=n_users,
                      n_items=n_items)
    torch.manual_seed(seed)
    m = GenRec(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # trained-like: every weight, bias and norm matters
            p.normal_(0.0, 0.3)
        m.user_embed.weight[0] = 0  # the padding rows stay zero, as nn.Embedding(padding_idx=0) keeps them
        m.item_embed.weight[0] = 0
        if m.transition is not None:
            g = torch.Generator().manual_seed(seed)
            t = m.transition
            t.items[:-1] = torch.randint(-1, n_items, t.items[:-1].shape, generator=g, dtype=torch.int32)
            t.counts[:-1] = torch.rand(t.counts[:-1].shape, generator=g) * 5
    return m


def _batch(rows, n_items=40):
    """rows: (user or None, item indices) -> the padded encoder batch [user piece] items <mask> EOS."""
    seqs = []
    for user, items in rows:
        tok, uid, iid = [], [], []
        if user is not None:
            tok, uid, iid = [4 + user % 3], [user + 1], [0]
        tok += [FIRST_ITEM + i for i in items] + [5, 3]  # <mask>, EOS
        uid += [0] * (len(items) + 2)
        iid += [i + 1 for i in items] + [0, 0]
        seqs.append((tok, uid, iid))
    S = max(len(s[0]) for s in seqs)
    out = {k: torch.zeros(len(rows), S, dtype=torch.long) for k in ("tokens", "user_ids", "item_ids")}
    out["mask"] = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, (tok, uid, iid) in enumerate(seqs):
        n = len(tok)
        for key, values in (("tokens", tok), ("user_ids", uid), ("item_ids", iid)):
            out[key][b, :n] = torch.tensor(values)
        out["mask"][b, :n] = True
    return out


def _assert_matches(model, enc, threads=None):
    x, pairs = first_step(model, enc, threads)
    want_x, want_pairs = first_step_reference(model, enc)
    torch.testing.assert_close(x, want_x, atol=1e-4, rtol=1e-4)
    if want_pairs is None:
        assert pairs is None
        return
    assert torch.equal(pairs[0], want_pairs[0])
    torch.testing.assert_close(pairs[1][0], want_pairs[1][0], atol=1e-4, rtol=1e-4)


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.sampled_from([2, 5, 8, 16]))  # 2 .. 64 wide, tails of the 16-lane loops included
    transition = draw(st.booleans())
    return dict(d=d, heads=heads, ffn=draw(st.sampled_from([3, 16, 40])), enc=draw(st.integers(1, 2)),
                dec=draw(st.integers(1, 2)), history=draw(st.booleans()), transition=transition,
                reverse=transition and draw(st.booleans()), positions=draw(st.sampled_from(["start", "end"])),
                scale=draw(st.booleans()), seed=draw(st.integers(0, 3)))


rows_st = st.lists(st.tuples(st.none() | st.integers(0, 5), st.lists(st.integers(0, 39), min_size=1, max_size=14)),
                   min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(cfg=configs(), rows=rows_st, threads=st.sampled_from([1, 2]))
def test_first_step_matches_reference(cfg, rows, threads):
    """Random widths, layers, biases, positions and batches (1-20 users: both of dense.cpp's kernels)."""
    _assert_matches(_model(**cfg), _batch(rows), threads)


def test_an_item_without_neighbours_and_repeats_match():
    m = _model(16, 2, 16, 1, 1, True, True, True, "end", False)
    with torch.no_grad():
        m.transition.items[7] = -1  # item 7 has no neighbour at all
    _assert_matches(m, _batch([(None, [7, 7, 7]), (2, [1, 7, 1, 7]), (None, [39])]))


def test_the_model_as_it_is_now_after_in_place_changes_and_replaced_modules():
    """Pointers are read on every call: training steps, calibration and replaced modules are seen."""
    m = _model(16, 2, 16, 2, 2, True, True, False, "end", False)
    enc = _batch([(None, [1, 2, 3]), (3, [4, 5, 6, 7, 8])])
    _assert_matches(m, enc)
    with torch.no_grad():
        m.encoder.layers[1].ffn.fc2.weight.mul_(2.0)  # in place, as an optimizer step or calibrate's scaling
        m.transition.weight.mul_(3.0)
    _assert_matches(m, enc)
    m.history = HistoryBias(16, m.cfg.max_positions)  # a new module
    with torch.no_grad():
        m.history.recency.normal_()
    _assert_matches(m, enc)
    m.decoder.layers[0].ffn.fc1 = torch.nn.Linear(16, 16)  # a new Linear of the right shape
    _assert_matches(m, enc)
    m.transition = None
    _assert_matches(m, enc)
    m.history = None
    _assert_matches(m, enc)  # no biases: no pairs


def test_bad_shapes_and_inputs_are_errors():
    m = _model(16, 2, 16, 1, 1, True, False, False, "end", False)
    enc = _batch([(None, [1, 2]), (None, [3])])
    bad = dict(enc, mask=enc["mask"].clone())
    bad["mask"][1, 0] = False  # a gap before the pieces
    with pytest.raises(ValueError, match="not right-padded"):
        first_step(m, bad)
    bad = dict(enc, tokens=enc["tokens"].clone())
    bad["tokens"][0, 0] = m.cfg.vocab_size
    with pytest.raises(ValueError, match="token id outside"):
        first_step(m, bad)
    long = _batch([(None, list(range(31)))])  # 33 pieces > max_positions = 32
    with pytest.raises(ValueError, match="exceeds max_positions=32"):
        first_step(m, long)
    with pytest.raises(ValueError, match="exceeds max_positions=32"):
        first_step_reference(m, long)
    m.decoder.layers[0].ffn.fc1 = torch.nn.Linear(16, 8)  # not the config's ffn_dim
    with pytest.raises(ValueError, match="fc1.weight has shape"):
        first_step(m, enc)


def test_unusable_models_fall_back_to_pytorch():
    m = _model(16, 2, 16, 1, 1, True, False, False, "end", False)
    enc = _batch([(None, [1, 2])])
    assert unusable(m, enc) is None
    assert "training" in unusable(m.train(), enc)
    assert "float32" in unusable(m.eval().double(), enc)


@pytest.mark.parametrize("users", [1, 9, 40])
def test_recommend_equals_the_pytorch_path(users, monkeypatch):
    """item_decode through the C++ first step returns the PyTorch path's items and scores."""
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=True, transition_bias=True,
                              transition_reverse=True, transition_neighbors=5, encoder_positions="end")
    rec = Recommender.random([f"i{n}" for n in range(300)], cfg, item_tokens="whole", n_users=5, seed=1)
    m = rec.model
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
        m.user_embed.weight[0] = 0
        m.item_embed.weight[0] = 0
        m.transition.items[:-1] = torch.randint(0, 300, m.transition.items[:-1].shape, dtype=torch.int32)
        m.transition.counts[:-1] = torch.rand(m.transition.counts[:-1].shape) * 5
    rng = np.random.default_rng(users)
    hist = [[f"i{n}" for n in rng.integers(0, 300, rng.integers(1, 25))] for _ in range(users)]
    got = rec.recommend(hist, k=15, users=[u % 7 for u in range(users)])
    monkeypatch.setattr(decoding, "use_first_step", lambda model, enc, encoder_only=False: False)
    want = rec.recommend(hist, k=15, users=[u % 7 for u in range(users)])
    for g, w in zip(got, want):
        assert g.items == w.items
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)


def test_item_decode_takes_the_cpp_step_up_to_users_per_thread():
    m = _model(16, 2, 16, 1, 1, True, False, False, "end", False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert chosen(m, _batch([(None, [1, 2])] * USERS_PER_THREAD))
        assert not chosen(m, _batch([(None, [1, 2])] * (USERS_PER_THREAD + 1)))
        assert not chosen(m.train(), _batch([(None, [1, 2])]))
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=30, deadline=None)
@given(cfg=configs(), rows=rows_st, eos=st.booleans(), threads=st.sampled_from([1, 2]))
def test_encode_matches_model_encode(cfg, rows, eos, threads):
    """The encoder alone, for any item form (here also models with an EOS step): zeros at the padding."""
    m = _model(**cfg)
    if eos and m.history is None and m.transition is None:  # the biases need items without EOS
        m.cfg = dataclasses.replace(m.cfg, item_eos=True)
    enc = _batch(rows)
    got = encode(m, enc, threads)
    with torch.inference_mode():
        want = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not got[~enc["mask"]].any()


@pytest.mark.parametrize("form", ["pieces", "codes-leaf"])
def test_beam_decode_with_the_cpp_encoder_equals_the_pytorch_path(form, monkeypatch):
    """The trie search's models (sub-word pieces with EOS; codes with the leaf head and both biases) take the C++
    encoder and return the PyTorch path's items and scores."""
    items = [f"i{n}" for n in range(120)]
    if form == "pieces":
        rec = Recommender.random(items, "tiny", vocab_size=200, seed=2)
    else:
        cfg = dataclasses.replace(preset("tiny").model, item_eos=False, leaf_head=True, history_bias=True,
                                  transition_bias=True, transition_neighbors=4, transition_reverse=True)
        rec = Recommender.random(items, cfg, vocab_size=200, item_tokens="codes", code_levels=1, code_branches=4,
                                 code_input="first", seed=2)
        rng = np.random.default_rng(2)
        rec.model.transition.fit([rng.integers(0, 120, 12) for _ in range(100)])
    with torch.no_grad():
        for p in rec.model.parameters():
            p.normal_(0.0, 0.3)
        rec.model.user_embed.weight[0] = 0
        rec.model.item_embed.weight[0] = 0
    rng = np.random.default_rng(5)
    hist = [[items[n] for n in rng.integers(0, 120, rng.integers(1, 15))] for _ in range(9)]
    calls = []
    monkeypatch.setattr(decoding, "native_encode", lambda *a, **kw: calls.append(1) or encode(*a, **kw))
    got = rec.recommend(hist, k=10)
    assert calls  # the C++ encoder ran
    monkeypatch.setattr(decoding, "use_first_step", lambda model, enc, encoder_only=False: False)
    want = rec.recommend(hist, k=10)
    for g, w in zip(got, want):
        assert g.items == w.items
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(cfg=configs(), rows=rows_st, width=st.integers(1, 5), steps=st.integers(1, 4), seed=st.integers(0, 99),
       threads=st.sampled_from([1, 2]))
def test_decoder_step_matches_the_pytorch_step(cfg, rows, width, steps, seed, threads):
    """Several steps of `width` beams a user, the beams reordered between steps as the search does: the same states
    and the same cached keys and values as `decode_step_hidden`'s PyTorch ops."""
    m = _model(**cfg)
    enc = _batch(rows)
    U, g = len(rows), torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        caches = [m.start_decoding(memory, enc["mask"], enc["item_ids"]) for _ in range(2)]
        caches[0].native_step = lambda model, tokens, cache: decoder_step(model, tokens, cache, threads)
        tokens = torch.full((U * width,), m.cfg.bos_id)
        for _ in range(steps):
            got, want = (m.decode_step_hidden(tokens, c) for c in caches)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            parents = (torch.arange(U)[:, None] * width + torch.randint(0, width, (U, width), generator=g)).reshape(-1)
            for c in caches:
                c.reorder(parents)
            tokens = torch.randint(0, m.cfg.vocab_size, (U * width,), generator=g)
        for a, b in zip(caches[0].self_k + caches[0].self_v, caches[1].self_k + caches[1].self_v):
            torch.testing.assert_close(a[:, :, :steps], b[:, :, :steps], atol=1e-4, rtol=1e-4)


def test_decoder_step_errors_name_the_problem():
    m = _model(16, 2, 16, 1, 1, False, False, False, "start", False)
    enc = _batch([(None, [1, 2])])
    with torch.inference_mode():
        memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        with pytest.raises(ValueError, match="token id outside"):
            decoder_step(m, torch.tensor([m.cfg.vocab_size]), m.start_decoding(memory, enc["mask"]))
        cache = m.start_decoding(memory, enc["mask"])
        cache.step = m.cfg.max_positions  # the next position is past the table
        with pytest.raises(ValueError, match="exceeds max_positions=32"):
            decoder_step(m, torch.tensor([2]), cache)
        with pytest.raises(ValueError, match="exceeds max_positions=32"):  # as the PyTorch step
            m.decode_step_hidden(torch.tensor([2]), cache)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_the_other_instruction_sets_kernels_match_too(isa):
    """The hand-blocked kernels are chosen by the CPU's instruction set (csrc/cpu_isa.h: AVX-512, AVX2 + FMA,
    baseline); GENREC_CPU_ISA=base|avx2 runs the kernels this machine would not pick through the comparisons with
    PyTorch (dense layers: first step, decoder step; the leaf-blocked scores; the fused head's tiles; the packed
    attention)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__)
    tests = [f"{here}::test_first_step_matches_reference", f"{here}::test_decoder_step_matches_the_pytorch_step",
             f"{here.with_name('test_leaf_head.py')}::test_leaf_ordered_scores_equal_the_scattered_ones",
             f"{here.with_name('test_item_topk.py')}::test_fused_head_with_filters_over_several_tiles",
             f"{here.with_name('test_packed_attention.py')}::test_equals_the_reference"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          env={**os.environ, "GENREC_CPU_ISA": isa}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{len(tests)} passed" in done.stdout
