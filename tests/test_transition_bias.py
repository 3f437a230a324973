"""Transition bias: the neighbour table, the own-user counts, the context, exact decoding, the fused loss, training."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast import Recommender, SequenceData, load, preset
from genrec_fast.decoding import beam_decode, item_decode
from genrec_fast.ensemble import Ensemble
from genrec_fast.history_bias import biased_logits
from genrec_fast.item_topk import item_topk_reference
from genrec_fast.train import Trainer
from genrec_fast.transition_bias import OwnPairs, context_items, neighbor_table

ITEMS = [f"item{i}" for i in range(60)]


def _brute_counts(seqs, window=3, skip_user=None, reverse=False):
    """N[a, j]: the summed 1/d of the pairs a, then j d steps later; reverse: keyed (j, a)."""
    counts = defaultdict(float)
    for u, s in enumerate(seqs):
        if u == skip_user:
            continue
        for i in range(len(s)):
            for d in range(1, window + 1):
                if i + d < len(s):
                    key = (int(s[i + d]), int(s[i])) if reverse else (int(s[i]), int(s[i + d]))
                    counts[key] += 1.0 / d
    return counts


def _seqs(draw_lengths, n_items, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_items, n) for n in draw_lengths]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=0, max_size=12), st.integers(1, 9), st.integers(1, 4),
       st.integers(1, 4), st.integers(0, 10 ** 6), st.booleans())
def test_neighbor_table_keeps_the_largest_counts(lengths, n_items, neighbors, window, seed, reverse):
    """Each item's successors (reverse: predecessors) with the largest summed 1/d."""
    seqs = _seqs(lengths, n_items, seed)
    items, counts = neighbor_table(seqs, n_items, neighbors, window, reverse=reverse)
    assert items.shape == counts.shape == (n_items + 1, neighbors)
    assert (items[n_items] == -1).all()
    brute = _brute_counts(seqs, window, reverse=reverse)
    for a in range(n_items):
        row = {j: c for (x, j), c in brute.items() if x == a}
        got = [(j, c) for j, c in zip(items[a].tolist(), counts[a].tolist()) if j >= 0]
        assert len(got) == min(neighbors, len(row)) and len({j for j, _ in got}) == len(got)
        for j, c in got:  # the true count of every kept item, largest first ...
            assert c == pytest.approx(row[j], rel=1e-6)
        assert all(x >= y - 1e-6 for (_, x), (_, y) in zip(got, got[1:]))
        dropped = [c for j, c in row.items() if j not in dict(got)]  # ... and none left out is larger
        assert not dropped or max(dropped) <= got[-1][1] + 1e-6
        assert (counts[a][items[a] < 0] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=8), st.integers(1, 7), st.integers(0, 10 ** 6))
def test_own_pairs_are_each_users_share_of_the_counts(lengths, n_items, seed):
    seqs = _seqs(lengths, n_items, seed)
    own = OwnPairs(seqs, n_items)
    full = _brute_counts(seqs)
    a = np.arange(-1, n_items)[None, :].repeat(len(seqs), 0)  # (U, n + 1): every item and "none"
    j = np.broadcast_to(np.arange(-1, n_items)[None, None, :], (len(seqs), n_items + 1, n_items + 1))
    got = own.counts(np.arange(len(seqs)), a, np.ascontiguousarray(j))
    back = own.counts(np.arange(len(seqs)), a, np.ascontiguousarray(j), reverse=True)  # the pairs (y, x)
    for u in range(len(seqs)):
        others = _brute_counts(seqs, skip_user=u)
        for x in range(n_items):
            for y in range(n_items):
                assert got[u, x + 1, y + 1] == pytest.approx(full[x, y] - others[x, y], abs=1e-6)
                assert back[u, x + 1, y + 1] == pytest.approx(full[y, x] - others[y, x], abs=1e-6)
        assert (got[u, 0] == 0).all() and (got[u, :, 0] == 0).all()
        assert (back[u, 0] == 0).all() and (back[u, :, 0] == 0).all()


def test_context_items_are_the_items_before_the_mask():
    item_ids = torch.tensor([[0, 5, 6, 7, 0, 0], [3, 0, 9, 0, 4, 0], [8, 0, 0, 0, 0, 0]])  # 0: no item (user, mask)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert context_items(item_ids, mask, 2).tolist() == [[6, 5], [3, 8], [7, -1]]
    until = torch.tensor([6, 3, 6])  # row 1: its <mask> at 3, the item after it does not count
    assert context_items(item_ids, mask, 3, until).tolist() == [[6, 5, 4], [8, 2, -1], [7, -1, -1]]


def _rec(history_bias=False, seed=0, context=3, neighbors=4, reverse=False):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=history_bias, transition_bias=True,
                              transition_context=context, transition_neighbors=neighbors,
                              transition_reverse=reverse)
    rec = Recommender.random(ITEMS, cfg, vocab_size=200, item_tokens="whole", seed=seed)
    rng = np.random.default_rng(seed)
    rec.model.transition.fit([rng.integers(0, 60, 12) for _ in range(80)])
    with torch.no_grad():  # offsets as large as learned ones
        rec.model.transition.weight.normal_(0, 2.0)
        if reverse:
            rec.model.transition.reverse_weight.normal_(0, 2.0)
        if history_bias:
            rec.model.history.recency.normal_(0, 2.0)
    return rec


def _transition_logits(m, z, enc, first, own=None):
    """The definition: z + sum_r a[r] log1p(N[c_r, j]) over the full vocabulary (item j = token first + j), by
    loops; with reverse, + sum_r a'[r] log1p(N[j, c_r]) over the predecessor columns; own (B, R, W): counts
    taken off each (row, context item, column) first, floored at 0."""
    ctx = context_items(enc["item_ids"], enc["mask"], m.transition.context)
    t = m.transition
    out = z.clone()
    for b in range(z.shape[0]):
        for r, a in enumerate(ctx[b].tolist()):
            if a < 0:
                continue
            for col, (j, c) in enumerate(zip(t.items[a].tolist(), t.counts[a].tolist())):
                if j >= 0:
                    w = t.weight[r] if col < t.neighbors else t.reverse_weight[r]
                    out[b, first + j] += w * np.log1p(c if own is None else max(c - float(own[b, r, col]), 0.0))
    return out


@pytest.mark.parametrize("history_bias, ensemble, reverse", [(False, False, False), (True, False, False),
                                                             (True, True, False), (False, False, True),
                                                             (True, True, True)])
def test_item_decode_with_transition_bias_is_exact(history_bias, ensemble, reverse):
    rec = _rec(history_bias, reverse=reverse)
    if reverse:  # the table: successors, then predecessors
        assert rec.model.transition.items.shape[1] == 2 * rec.model.transition.neighbors
    model = (Ensemble([rec.model, _rec(history_bias, seed=1, context=2, neighbors=3).model]) if ensemble
             else rec.model)
    rng = np.random.default_rng(0)
    hists = [rng.integers(0, 60, int(rng.integers(1, 9))) for _ in range(20)]
    enc = rec.encode_batch(hists, [None] * 20)
    first = int(rec.tokenizer.item_flat[0])
    exclude = [h[:1] for h in hists]
    allow = rng.random(60) < 0.85
    got_i, got_s = item_decode(model, enc, first, 60, 12, exclude, allow)
    with torch.no_grad():
        logits = []
        for m in (model.members if ensemble else [model]):
            memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
            h = m.first_heads(memory, enc["mask"])[0]
            z = h.x @ h.weight.T + h.bias
            if history_bias:
                z = biased_logits(z, enc["tokens"], m.history.offsets(h.x, memory, enc["item_ids"], enc["mask"]))
            logits.append(_transition_logits(m, z, enc, first))
    want_i, want_s = item_topk_reference(logits, first, 60, 12, exclude, allow)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_transition_loss_is_the_cross_entropy_of_the_biased_logits(reverse):
    rec = _rec(reverse=reverse)
    m = rec.model.train()
    enc = rec.encode_batch([np.array([1, 2, 2]), np.array([7, 8])], [None, None])
    first = int(rec.tokenizer.item_flat[0])
    labels = torch.tensor([[first + 2], [first + 40]])
    dec = torch.full((2, 1), m.cfg.bos_id)
    ctx = context_items(enc["item_ids"], enc["mask"], 3)
    own = torch.rand(2, 3, m.transition.items.shape[1])  # subtracted before log1p, floored at 0
    torch.manual_seed(3)
    got = m.history_loss(**enc, decoder_tokens=dec, labels=labels, smoothing=0.2, ignore_index=-100,
                         first_item=first, transition=(ctx, own))
    torch.manual_seed(3)  # the same dropout masks
    memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    hidden = m.decode_hidden(dec, memory, enc["mask"])[:, 0]
    with torch.no_grad():  # the loop definition, each row's own counts taken off (a context item may repeat)
        want = _transition_logits(m, m.lm_head(hidden).detach(), enc, first, own)
    bias = want - m.lm_head(hidden).detach()  # the offsets, then on the live logits for the gradient
    z = m.lm_head(hidden) + bias
    torch.testing.assert_close(got.detach(), F.cross_entropy(z, labels[:, 0], label_smoothing=0.2).detach(),
                               rtol=1e-5, atol=1e-4)
    got.backward()
    assert m.transition.weight.grad.abs().sum() > 0
    if reverse:
        assert m.transition.reverse_weight.grad.abs().sum() > 0


def _successor_data(rng, n_users=300, n_items=40):
    """Users who move to a fixed successor of their last item (80% of steps): co-occurrence knows it."""
    succ = rng.permutation(n_items)
    seqs = []
    for _ in range(n_users):
        s = [int(rng.integers(0, n_items))]
        while len(s) < int(rng.integers(6, 10)):
            s.append(int(succ[s[-1]]) if rng.random() < 0.8 else int(rng.integers(0, n_items)))
        seqs.append(np.array(s))
    return SequenceData(list(range(n_users)), list(range(n_items)), seqs, [str(i + 1) for i in range(n_items)]), succ


@pytest.mark.parametrize("model, tokenizer", [
    ({}, {"item_tokens": "whole"}),  # one token per item
    ({"transition_reverse": True}, {"item_tokens": "whole"}),
    ({"leaf_head": True, "history_bias": True},
     {"item_tokens": "codes", "code_levels": 1, "code_branches": 4, "code_input": "first"}),
    ({"leaf_head": True, "transition_reverse": True},
     {"item_tokens": "codes", "code_levels": 1, "code_branches": 4, "code_input": "first"}),
])
def test_transition_bias_trains_saves_and_reloads(tmp_path, model, tokenizer):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, transition_bias=True, transition_neighbors=5, **model)
    p.tokenizer = dataclasses.replace(p.tokenizer, **tokenizer)
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=0, lr=3e-3)
    data, succ = _successor_data(np.random.default_rng(1))
    trainer = Trainer(data, tmp_path / "run", p, progress=False)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["valid"]["HR@10"] > 0.5
    assert trainer.model.transition.weight[0] > 0.1  # it learned to trust the last item's successors
    rec = load(tmp_path / "run" / "last")
    assert rec.model.transition is not None
    torch.testing.assert_close(rec.model.transition.counts, trainer.model.transition.counts.cpu())
    before = trainer.recommender().recommend([[1, 2, 3, 2]], k=5)[0]
    after = rec.recommend([[1, 2, 3, 2]], k=5)[0]
    assert after.items == before.items
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_trainer_subtracts_the_examples_own_user(tmp_path, reverse):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, transition_bias=True, transition_neighbors=40,
                                  transition_reverse=reverse)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    data, _ = _successor_data(np.random.default_rng(2), n_users=60)
    trainer = Trainer(data, tmp_path / "run", p, progress=False)
    from genrec_fast.train import make_examples, to_batch
    for pretrain in (True, False):
        part = make_examples(trainer.split, np.random.default_rng(0), pretrain, trainer.tcfg)[:50]
        batch, _ = to_batch(part, trainer.tokenizer, trainer.model.cfg, "cpu")
        ctx, own = trainer._transition_inputs(part, batch)
        left = (trainer.model.transition.counts[ctx.clamp(min=0)] - own).numpy()  # (B, R, W)
        for b, e in enumerate(part):
            others = _brute_counts(trainer.split.train, skip_user=e.owner)
            before = _brute_counts(trainer.split.train, skip_user=e.owner, reverse=True)
            cut = len(e.items) if e.mask_at is None else e.mask_at
            want_ctx = [int(x) for x in e.items[:cut][::-1][:3]]
            assert ctx[b].tolist() == want_ctx + [-1] * (3 - len(want_ctx))
            for r, a in enumerate(want_ctx):
                for m_, j in enumerate(trainer.model.transition.items[a].tolist()):
                    if j >= 0:  # successors' columns, then (reverse) predecessors'
                        want = others[a, j] if m_ < 40 else before[a, j]
                        assert left[b, r, m_] == pytest.approx(want, abs=1e-5)


def test_transition_bias_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(ValueError, match="transition_bias needs items without an EOS step"):
        dataclasses.replace(preset("tiny").model, transition_bias=True)  # item_eos defaults to True
    with pytest.raises(ValueError, match="transition_context"):
        dataclasses.replace(preset("tiny").model, item_eos=False, transition_bias=True, transition_context=0)
    with pytest.raises(ValueError, match="transition_reverse needs model.transition_bias"):
        dataclasses.replace(preset("tiny").model, item_eos=False, transition_reverse=True)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, transition_bias=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8)
    with pytest.raises(ValueError, match="transition_bias: needs tokenizer.item_tokens='whole'"):
        Trainer(_successor_data(np.random.default_rng(0))[0], tmp_path / "x", p, progress=False)
    rec = _rec()
    enc = rec.encode_batch([np.array([1, 2])], [None])
    with pytest.raises(ValueError, match="only item_decode runs"):
        beam_decode(rec.model, rec.trie, enc, 5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_item_decode_with_transition_bias_equals_the_host():
    rec = _rec(history_bias=True)
    rng = np.random.default_rng(5)
    hists = [[ITEMS[j] for j in rng.integers(0, 60, int(rng.integers(1, 9)))] for _ in range(40)]
    host = rec.recommend(hists, k=10, exclude_seen=True)
    rec.model.to("cuda")
    gpu = rec.recommend(hists, k=10, exclude_seen=True)
    assert [r.items for r in gpu] == [r.items for r in host]
    np.testing.assert_allclose([r.scores for r in gpu], [r.scores for r in host], atol=1e-4)
