"""History bias (history_bias.py): offsets, the exact top-k with offsets, the loss, training and reloading."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from repeat_data import repeat_data

import genrec_fast.item_topk as item_topk_module
from genrec_fast import Recommender, load, preset
from genrec_fast.decoding import beam_decode, item_decode
from genrec_fast.ensemble import Ensemble
from genrec_fast.history_bias import HistoryBias, biased_logits, history_items
from genrec_fast.item_topk import Head, _item_topk_torch, _scores, item_topk, item_topk_reference
from genrec_fast.train import Trainer

ITEMS = [f"item{i}" for i in range(60)]


def test_offsets_follow_the_definition():
    torch.manual_seed(0)
    hb = HistoryBias(8, 5)
    with torch.no_grad():
        hb.recency.normal_()
    hidden, memory = torch.randn(2, 8), torch.randn(2, 6, 8)
    item_ids = torch.tensor([[0, 4, 7, 4, 0, 0], [3, 1, 2, 5, 6, 9]])  # 0 = user piece / mask / EOS / padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = hb.offsets(hidden, memory, item_ids, mask)
    q, key = hb.query(hidden), hb.key(memory)
    for b in range(2):
        pos = [j for j in range(6) if item_ids[b, j] > 0 and mask[b, j]]
        for j in range(6):
            if j not in pos:
                assert got[b, j] == 0
                continue
            after = sum(1 for i in pos if i > j)
            want = hb.recency[min(after, 4)] + q[b] @ key[b, j] / 8 ** 0.5
            torch.testing.assert_close(got[b, j], want)
    assert history_items(item_ids, mask).tolist() == [[-1, 3, 6, 3, -1, -1], [2, 0, 1, 4, 5, 8]]


def test_biased_logits_sum_over_repeats():
    z = torch.zeros(1, 10)
    out = biased_logits(z, torch.tensor([[4, 4, 7, 0]]), torch.tensor([[1.0, 0.5, -2.0, 0.0]]))
    assert out[0].tolist() == [0, 0, 0, 0, 1.5, 0, 0, -2.0, 0, 0]


def _heads(rng, users, vocab, members, dim=6, bias=True):
    return [Head(torch.from_numpy(rng.standard_normal((users, dim)).astype(np.float32)),
                 torch.from_numpy(rng.standard_normal((vocab, dim)).astype(np.float32)),
                 torch.from_numpy(rng.standard_normal(vocab).astype(np.float32)) if bias else None)
            for _ in range(members)]


def _reference(heads, first, n, k, hist, offsets, exclude, allow):
    """The definition: full logits plus the offsets on their tokens, then `item_topk_reference`."""
    tokens = torch.where(hist >= 0, hist + first, 0)  # token 0 gets offset 0
    logits = [biased_logits(h.x @ h.weight.T + (0 if h.bias is None else h.bias), tokens, o.masked_fill(hist < 0, 0))
              for h, o in zip(heads, offsets)]
    return item_topk_reference(logits, first, n, k, exclude, allow)


def _history_case(rng, users, n, members, slots, scale=3.0):
    hist = torch.from_numpy(rng.integers(-1, n, (users, slots)))  # -1 = no item; repeats on purpose
    offsets = [torch.from_numpy((scale * rng.standard_normal((users, slots))).astype(np.float32))
               for _ in range(members)]
    return hist, offsets


def _torch_loop(h, first, n, k, exclude, allow, chunk, history):
    """The torch loop (GPUs; ensembles with a bias on a CPU) for any number of heads, here on CPU tensors."""
    import genrec_fast.item_topk as it
    U = h[0].x.shape[0]
    ptr, ex_items, allow = it.check_filters(exclude, allow, U, n)
    offsets = it._check_offsets(*history, U, len(h))
    items, values, norms = _item_topk_torch(it._drop_zero_bias(h), first, n, k, ptr, ex_items, allow, chunk, offsets)
    return items, _scores(items, values, norms.mean(0))


def _chunked(fn, *args, **kwargs):
    """fn with item_topk's matmuls in chunks whatever the size (WHOLE_MATMUL_MAX = 0)."""
    old, item_topk_module.WHOLE_MATMUL_MAX = item_topk_module.WHOLE_MATMUL_MAX, 0
    try:
        return fn(*args, **kwargs)
    finally:
        item_topk_module.WHOLE_MATMUL_MAX = old


PATHS = {  # one model on a CPU: the pairs go into the C++ top-k before the scan (StreamingTopK.add_offsets);
    # an ensemble: into each chunk's member logits (_ChunkOffsets) of the C++ scan, or of the torch loop
    "fused": lambda h, *a, **kw: item_topk(h, *a, fused=len(h) == 1, **kw),
    "scan": lambda h, *a, **kw: _chunked(item_topk, h, *a, fused=False, **kw),
    "whole": lambda h, *a, **kw: item_topk(h, *a, fused=False, **kw),  # a few users: one matmul
    "torch-loop": _torch_loop,
}


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(1, 20), members=st.integers(1, 2),
       k=st.integers(1, 12), filters=st.sampled_from(["none", "exclude", "allow", "both"]),
       scale=st.sampled_from([3.0, 60.0]))
def test_item_topk_with_history_equals_the_reference(path, seed, users, members, k, filters, scale):
    """Offsets of learned size (3) and ones that swamp the logits (60: the pairs hold nearly all of a user's
    softmax, or nearly none, so the normaliser's correction must not cancel badly)."""
    rng = np.random.default_rng(seed)
    first, n = 3, 25
    heads = _heads(rng, users, first + n + 2, members, bias=bool(seed % 2))
    hist, offsets = _history_case(rng, users, n, members, 7, scale)
    exclude = [rng.choice(n, int(rng.integers(0, 6)), replace=False) for _ in range(users)] \
        if filters in ("exclude", "both") else None
    allow = rng.random(n) < 0.7 if filters in ("allow", "both") else None
    want_i, want_s = _reference(heads, first, n, k, hist, offsets, exclude, allow)
    got_i, got_s = PATHS[path](heads, first, n, k, exclude, allow, chunk=8, history=(hist, offsets))
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-4)


def test_native_offsets_come_once_before_the_scan_and_inside_the_catalog():
    from genrec_fast.native import core
    x, w = torch.randn(2, 4), torch.randn(10, 4)
    items, off = torch.tensor([[1, -1], [3, 3]]), torch.ones(2, 2)

    def offsets(top, it=items):
        top.add_offsets(it.data_ptr(), off.data_ptr(), 2, 2, x.data_ptr(), w.data_ptr(), 0, 4, 1)

    top = core().StreamingTopK(2, 3, 10)
    offsets(top)
    with pytest.raises(ValueError, match="once, before any add"):
        offsets(top)
    top = core().StreamingTopK(2, 3, 10)
    top.add_head(x.data_ptr(), w.data_ptr(), 0, 2, 4, 10, 0, True, True, 1)
    with pytest.raises(ValueError, match="once, before any add"):
        offsets(top)
    with pytest.raises(ValueError, match=r"item 10 outside the catalog \[0, 10\)"):
        offsets(core().StreamingTopK(2, 3, 10), torch.tensor([[1, 10], [0, 0]]))
    # thrown inside a worker's chunk (users 20-39 of 40 on the second of 2 threads): rethrown here, once
    bad, x40 = torch.zeros(40, 2, dtype=torch.long), torch.randn(40, 4)
    bad[35, 1] = 12
    with pytest.raises(ValueError, match="item 12 outside the catalog"):
        core().StreamingTopK(40, 3, 10).add_offsets(bad.data_ptr(), torch.ones(40, 2).data_ptr(), 40, 2,
                                                    x40.data_ptr(), w.data_ptr(), 0, 4, 2)
    top = core().StreamingTopK(2, 3, 10)  # one item per user offset by +1 (user 1's twice: +2), then the scan
    offsets(top)
    top.add_head(x.data_ptr(), w.data_ptr(), 0, 2, 4, 10, 0, True, True, 1)
    got_i, got_v, got_lse = top.results()
    z = x @ w.T
    z[0, 1] += 1
    z[1, 3] += 2
    want_v, want_i = z.topk(3)
    np.testing.assert_array_equal(got_i, want_i.numpy())
    np.testing.assert_allclose(got_v, want_v.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got_lse, z.logsumexp(1).numpy(), rtol=1e-5)


def _rec(history_bias=True, seed=0):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=history_bias)
    rec = Recommender.random(ITEMS, cfg, vocab_size=200, item_tokens="whole", seed=seed)
    if history_bias:
        with torch.no_grad():  # offsets as large as learned ones
            rec.model.history.recency.normal_(0, 2.0)
            rec.model.history.query.weight.normal_(0, 0.5)
    return rec


@pytest.mark.parametrize("users", [1, 16])
@pytest.mark.parametrize("fused", [None, False])
def test_an_offset_item_tied_with_a_scanned_one_loses_to_the_smaller_index(users, fused):
    """Item 200's logit 0 + history offset 1 enters the top-k before the scan; the scan's item 5 (logit 1) ties it
    and, as the smaller item, takes the one place: the scan offers a block whose max equals the k-th score."""
    n = 256
    x, w, b = torch.ones(users, 1), torch.zeros(n, 1), torch.zeros(n)
    b[5] = 1.0
    history = (torch.full((users, 1), 200, dtype=torch.long), [torch.ones(users, 1)])
    items, _ = item_topk([Head(x, w, b)], 0, n, 1, history=history, fused=fused)
    assert items[:, 0].tolist() == [5] * users
    items, _ = item_topk([Head(x, w, b)], 0, n, 2, history=history, fused=fused)
    assert items.tolist() == [[5, 200]] * users


@pytest.mark.parametrize("ensemble", [False, True])
def test_item_decode_with_history_bias_is_exact(ensemble):
    """recommend's one-step path equals the full-logit definition, with filters and repeated items."""
    rec = _rec()
    model = Ensemble([rec.model, _rec(seed=1).model]) if ensemble else rec.model
    rng = np.random.default_rng(0)
    hists = [rng.integers(0, 60, int(rng.integers(1, 12))) for _ in range(24)]
    hists[0] = np.array([5, 5, 5, 9])
    enc = rec.encode_batch(hists, [None] * 24)
    first = int(rec.tokenizer.item_flat[0])
    exclude = [h[:2] for h in hists]
    allow = rng.random(60) < 0.8
    got_i, got_s = item_decode(model, enc, first, 60, 15, exclude, allow)
    with torch.no_grad():
        members = model.members if ensemble else [model]
        logits = []
        for m in members:
            memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
            h = m.first_heads(memory, enc["mask"])[0]
            z = h.x @ h.weight.T + h.bias
            logits.append(biased_logits(z, enc["tokens"], m.history.offsets(h.x, memory, enc["item_ids"], enc["mask"])))
    want_i, want_s = item_topk_reference(logits, first, 60, 15, exclude, allow)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    assert (got_i[0][:3] != -1).all()


def test_history_bias_moves_repeats():
    """A large positive recency term puts the most recent items first; a large negative one removes them."""
    rec = _rec()
    hist = [["item3", "item17", "item42"]]
    with torch.no_grad():
        rec.model.history.recency.fill_(50.0)
        rec.model.history.query.weight.zero_()
    assert sorted(rec.recommend(hist, k=3, exclude_seen=False)[0].items) == ["item17", "item3", "item42"]
    with torch.no_grad():
        rec.model.history.recency.fill_(-50.0)
    assert not set(rec.recommend(hist, k=10, exclude_seen=False)[0].items) & {"item3", "item17", "item42"}


def test_history_loss_is_the_cross_entropy_of_the_biased_logits():
    rec = _rec()
    m = rec.model.train()
    enc = rec.encode_batch([np.array([1, 2, 2]), np.array([7, 8])], [None, None])
    labels = torch.tensor([[int(rec.tokenizer.item_flat[2])], [int(rec.tokenizer.item_flat[40])]])
    dec = torch.full((2, 1), m.cfg.bos_id)
    torch.manual_seed(3)
    got = m.history_loss(**enc, decoder_tokens=dec, labels=labels, smoothing=0.2, ignore_index=-100)
    torch.manual_seed(3)  # the same dropout masks
    memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    hidden = m.decode_hidden(dec, memory, enc["mask"])[:, 0]
    z = biased_logits(m.lm_head(hidden), enc["tokens"], m.history.offsets(hidden, memory, enc["item_ids"], enc["mask"]))
    torch.testing.assert_close(got, F.cross_entropy(z, labels[:, 0], label_smoothing=0.2))
    got.backward()
    assert m.history.recency.grad[:3].abs().sum() > 0 and m.history.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model, tokenizer", [
    ({}, {"item_tokens": "whole"}),  # one token per item
    ({"leaf_head": True}, {"item_tokens": "codes", "code_levels": 1, "code_branches": 4, "code_input": "first"}),
])
def test_history_bias_trains_saves_and_reloads(tmp_path, model, tokenizer):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, history_bias=True, **model)
    p.tokenizer = dataclasses.replace(p.tokenizer, **tokenizer)
    p.train = dataclasses.replace(p.train, pretrain_epochs=0, finetune_epochs=4, eval_users=0, lr=3e-3)
    trainer = Trainer(repeat_data(np.random.default_rng(1)), tmp_path / "run", p, progress=False)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["valid"]["HR@10"] > 0.5  # the item two back is the answer 80% of the time
    rec = load(tmp_path / "run" / "last")
    assert rec.model.history is not None and (rec.model.leaves is not None) == bool(model)
    before = trainer.recommender().recommend([[1, 2, 3, 2]], k=5, exclude_seen=False)[0]
    after = rec.recommend([[1, 2, 3, 2]], k=5, exclude_seen=False)[0]
    assert after.items == before.items
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5)


def test_history_bias_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(ValueError, match="history_bias needs model.item_eos=False"):
        dataclasses.replace(preset("tiny").model, history_bias=True)  # item_eos defaults to True
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, history_bias=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8)
    with pytest.raises(ValueError, match="history_bias: needs tokenizer.item_tokens='whole'"):
        Trainer(repeat_data(np.random.default_rng(0)), tmp_path / "codes", p, progress=False)
    rec = _rec()
    enc = rec.encode_batch([np.array([1, 2])], [None])
    with pytest.raises(ValueError, match="only item_decode runs"):
        beam_decode(rec.model, rec.trie, enc, 5)
    with pytest.raises(ValueError, match="one offsets tensor per head"):
        rng = np.random.default_rng(0)
        item_topk(_heads(rng, 2, 30, 1), 0, 30, 3, history=(torch.zeros(2, 3, dtype=torch.long), []))
