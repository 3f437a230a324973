import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from genrec_fast import load, preset
from genrec_fast.data import synthetic
from genrec_fast.history_bias import biased_logits
from genrec_fast.loss import NegativeSampler, item_cross_entropy, linear_cross_entropy, sampled_cross_entropy
from genrec_fast.model import GenRec
from genrec_fast.train import Trainer, seen_tokens, to_batch


def reference(logits, labels, smoothing, seen):
    """Per token: cross-entropy over the classes left after removing `seen` (first step, never the target)."""
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            y = int(labels[b, t])
            if y < 0:
                continue
            keep = np.ones(logits.shape[-1], dtype=bool)
            if t == 0:
                keep[seen[b].numpy()] = False
                keep[y] = True
            lp = logits[b, t, torch.from_numpy(keep)].log_softmax(-1)
            y_kept = int(keep[:y].sum())
            terms.append(-(1 - smoothing) * lp[y_kept] - smoothing * lp.mean())
    return torch.stack(terms).mean()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([0.0, 0.1, 0.3]))
def test_masked_loss_is_cross_entropy_over_the_unseen_classes(seed, T, smoothing):
    g = torch.Generator().manual_seed(seed)
    B, V, S = 4, 17, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, -1] = -100  # padding
    seen = torch.randint(0, V, (B, S), generator=g)
    seen[2, 0] = labels[2, 0]  # a repeated item stays a class
    got = item_cross_entropy(logits, labels, smoothing, seen)
    torch.testing.assert_close(got, reference(logits, labels, smoothing, seen))


def test_without_seen_it_is_plain_cross_entropy_and_masked_classes_get_no_gradient():
    logits = torch.randn(3, 2, 11, requires_grad=True)
    labels = torch.tensor([[4, 3], [5, -100], [6, 3]])
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.2)
    torch.testing.assert_close(item_cross_entropy(logits, labels, 0.2), want)
    seen = torch.tensor([[7, 8], [9, 9], [0, 0]])
    item_cross_entropy(logits, labels, 0.2, seen).backward()
    assert (logits.grad[0, 0, [7, 8]] == 0).all() and (logits.grad[1, 0, 9] == 0).all()
    assert (logits.grad[0, 1, [7, 8]] != 0).all()  # later steps (EOS) keep every class


def test_trainer_masks_each_examples_context_items(tmp_path):
    d = synthetic(n_users=80, n_items=30, seed=2)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, mask_seen=True, pretrain_epochs=0, finetune_epochs=1, eval_users=30)
    with pytest.raises(ValueError, match="mask_seen"):  # an item of several pieces has no single class
        Trainer(d, tmp_path / "pieces", p, progress=False)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    trainer = Trainer(d, tmp_path, p, progress=False)
    part = trainer.epoch_batches(pretrain=False)[0]
    seen = seen_tokens(part, trainer.tokenizer, "cpu")
    _, labels = to_batch(part, trainer.tokenizer, trainer.model.cfg, "cpu")
    for b, e in enumerate(part):
        row = [t for t in seen[b].tolist() if t != 0]
        assert trainer.tokenizer.decode_item(row[:1]) == int(e.items[0])
        assert row == [int(trainer.tokenizer.item_pieces[i][0]) for i in e.items]
    assert np.isfinite(trainer.train_epoch(False))
    trainer._save("best")
    rec = load(tmp_path / "best")
    assert rec.exclude_seen  # such a model never learned to rank its history low: excluded by default
    hist = [d.item_ids[i] for i in trainer.split.test_history(0)]
    n = len(d.item_ids)
    assert sorted(rec.recommend([hist], k=n)[0].items) == sorted(set(d.item_ids) - set(hist))
    assert len(rec.recommend([hist], k=n, exclude_seen=False)[0].items) == n  # explicit False still wins


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 50), st.sampled_from([0.0, 0.1, 0.3]),
       st.booleans(), st.integers(1, 16))
def test_linear_cross_entropy_matches_cross_entropy_of_the_logits(seed, N, V, smoothing, bias, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100  # padding rows
    got = linear_cross_entropy(x, w, b, labels, smoothing, chunk=chunk)
    want = F.cross_entropy(F.linear(x, w, b), labels, ignore_index=-100, label_smoothing=smoothing)
    if (labels == -100).all():
        assert got.isnan() and want.isnan()
        return
    torch.testing.assert_close(got, want)
    inputs = [x, w] + ([b] if bias else [])
    for a, e in zip(torch.autograd.grad(2.5 * got, inputs), torch.autograd.grad(2.5 * want, inputs)):
        torch.testing.assert_close(a, e)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.integers(2, 40), st.integers(1, 6),
       st.sampled_from([0.0, 0.3]), st.integers(1, 16))
def test_linear_cross_entropy_with_offsets_matches_the_biased_logits(seed, N, V, S, smoothing, chunk):
    """Sparse offsets (history_bias.py) summed onto their tokens, repeats included, values differentiable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (N, S), generator=g)
    values = (2 * torch.randn(N, S, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    if (labels == -100).all():
        labels[0] = 0
    got = linear_cross_entropy(x, w, None, labels, smoothing, chunk=chunk, offsets=(tokens, values))
    want = F.cross_entropy(biased_logits(F.linear(x, w), tokens, values), labels, ignore_index=-100,
                           label_smoothing=smoothing)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, [x, w, values]), torch.autograd.grad(want, [x, w, values])):
        torch.testing.assert_close(a, e)


def test_linear_cross_entropy_names_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), None, torch.zeros(4, dtype=torch.long), chunk=0)


def test_model_head_loss_is_the_loss_of_its_logits():
    torch.manual_seed(0)
    m = GenRec(dataclasses.replace(preset("tiny").model, vocab_size=40, n_users=5, n_items=7))
    m.final_logits_bias.normal_()
    h = torch.randn(3, 2, m.cfg.d_model, requires_grad=True)
    labels = torch.tensor([[4, 3], [5, -100], [6, 39]])
    got = m.head_loss(h, labels, 0.2, -100)
    want = item_cross_entropy(m.lm_head(h), labels, 0.2)
    torch.testing.assert_close(got, want)
    (gh,) = torch.autograd.grad(got, h)
    (wh,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(gh, wh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("chunk", [None, 7])
def test_linear_cross_entropy_on_cuda_matches_the_cpu_reference(chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    w = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    b = torch.randn(1000, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 1000, (300,), generator=g)
    labels[::5] = -100
    xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    got = linear_cross_entropy(xc, wc, b.cuda(), labels.cuda(), 0.3, chunk=chunk)
    x.requires_grad_(), w.requires_grad_()
    want = F.cross_entropy(F.linear(x, w, b), labels, ignore_index=-100, label_smoothing=0.3)
    torch.testing.assert_close(got.cpu(), want)
    for a, e in zip(torch.autograd.grad(got, [xc, wc]), torch.autograd.grad(want, [x, w])):
        torch.testing.assert_close(a.cpu(), e)


def sampled_reference(x, weight, bias, labels, candidates, log_q, smoothing):
    """Per row: F.cross_entropy over the row's candidate columns: the first column holding its label is the
    class, the other columns holding it are left out."""
    terms = []
    for n in range(len(labels)):
        y = int(labels[n])
        if y < 0:
            continue
        pos = int((candidates == y).nonzero()[0, 0])
        keep = candidates != y
        keep[pos] = True
        z = F.linear(x[n], weight[candidates[keep]], None if bias is None else bias[candidates[keep]])
        if log_q is not None:
            z = z - log_q[keep]
        target = torch.tensor([int(keep[:pos].sum())])
        terms.append(F.cross_entropy(z[None], target, label_smoothing=smoothing))
    return torch.stack(terms).mean()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(0, 20), st.sampled_from([0.0, 0.1, 0.3]),
       st.booleans(), st.booleans())
def test_sampled_cross_entropy_matches_the_per_row_reference(seed, N, K, smoothing, bias, sparse):
    g = torch.Generator().manual_seed(seed)
    V = 15
    x = torch.randn(N, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100  # padding rows
    drawn = torch.randint(0, V, (K,), generator=g)  # with replacement: accidental hits and repeats
    candidates = torch.cat([labels[labels >= 0].unique(), drawn])
    log_q = torch.randn(len(candidates), generator=g, dtype=torch.float64)
    got = sampled_cross_entropy(x, w, b, labels, candidates, log_q, smoothing, sparse=sparse)
    if (labels < 0).all():
        assert got.isnan()
        return
    want = sampled_reference(x, w, b, labels, candidates, log_q, smoothing)
    torch.testing.assert_close(got, want)
    inputs = [x, w] + ([b] if bias else [])
    for a, e in zip(torch.autograd.grad(1.5 * got, inputs), torch.autograd.grad(1.5 * want, inputs)):
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, e)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_sampled_cross_entropy_over_every_class_is_the_full_softmax(smoothing):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (9,), generator=g)
    every = torch.randperm(30, generator=g)  # each class once, in any order
    got = sampled_cross_entropy(x, w, b, labels, every, None, smoothing, sparse=True)
    want = F.cross_entropy(F.linear(x, w, b), labels, label_smoothing=smoothing)
    torch.testing.assert_close(got, want)
    (gx, gw), (wx, ww) = torch.autograd.grad(got, [x, w]), torch.autograd.grad(want, [x, w])
    assert gw.is_sparse
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw.to_dense(), ww)
    torch.testing.assert_close(linear_cross_entropy(x, w, b, labels, smoothing), want)


def sampled_offsets_reference(x, weight, bias, labels, candidates, log_q, smoothing, tokens, values):
    """Per row: F.cross_entropy over the row's own offset tokens (logit + summed offsets, no log_q; the label's
    class if it is one of them) and the shared candidates that are neither one of them nor a repeat of the label."""
    terms = []
    for n in range(len(labels)):
        y = int(labels[n])
        if y < 0:
            continue
        own = {}
        for t, v in zip(tokens[n].tolist(), values[n]):
            if t >= 0:
                own[t] = own.get(t, 0) + v
        shared = [m for m in range(len(candidates)) if int(candidates[m]) not in own]
        first = [m for m in shared if int(candidates[m]) == y][:1]
        shared = [m for m in shared if int(candidates[m]) != y or m in first]
        z_shared = F.linear(x[n], weight[candidates[shared]], None if bias is None else bias[candidates[shared]])
        if log_q is not None:
            z_shared = z_shared - log_q[shared]
        z_own = torch.stack([x[n] @ weight[t] + (0 if bias is None else bias[t]) + v for t, v in own.items()]) \
            if own else z_shared[:0]
        z = torch.cat([z_shared, z_own])
        target = list(own).index(y) + len(shared) if y in own else shared.index(first[0])
        terms.append(F.cross_entropy(z[None], torch.tensor([target]), label_smoothing=smoothing))
    return torch.stack(terms).mean()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 10), st.integers(0, 12), st.integers(1, 6),
       st.sampled_from([0.0, 0.3]), st.booleans())
def test_sampled_cross_entropy_with_offsets_matches_the_per_row_reference(seed, N, K, S, smoothing, bias):
    """The biases' offset tokens are each row's own classes (repeats summed, -1 = none), shared candidates
    equal to them leave the row, and the label takes its offset column when it has one."""
    g = torch.Generator().manual_seed(seed)
    V = 12
    x = torch.randn(N, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    tokens = torch.randint(-1, V, (N, S), generator=g)  # repeats, -1 = none, labels among them at times
    values = (2 * torch.randn(N, S, generator=g, dtype=torch.float64)).requires_grad_()
    candidates = torch.cat([labels[labels >= 0].unique(), torch.randint(0, V, (K,), generator=g)])
    log_q = torch.randn(len(candidates), generator=g, dtype=torch.float64)
    got = sampled_cross_entropy(x, w, b, labels, candidates, log_q, smoothing, offsets=(tokens, values))
    if (labels < 0).all():
        assert got.isnan()
        return
    want = sampled_offsets_reference(x, w, b, labels, candidates, log_q, smoothing, tokens, values)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(f, [x, w, values], allow_unused=True, materialize_grads=True) for f in (got, want)]
    for a, e in zip(*grads):  # (values unused where no row has an offset token)
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_sampled_cross_entropy_with_offsets_over_every_class_is_the_biased_full_softmax(smoothing):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 30, (9, 7), generator=g)
    values = torch.randn(9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = tokens[:, 0].clone()  # the label among the offset tokens ...
    labels[::2] = torch.randint(0, 30, (5,), generator=g)  # ... or anywhere
    got = sampled_cross_entropy(x, w, None, labels, torch.randperm(30, generator=g), None, smoothing, sparse=True,
                                offsets=(tokens, values))
    want = linear_cross_entropy(x, w, None, labels, smoothing, offsets=(tokens, values))
    torch.testing.assert_close(got, want)
    (gx, gw, gv), (wx, ww, wv) = torch.autograd.grad(got, [x, w, values]), torch.autograd.grad(want, [x, w, values])
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw.to_dense(), ww)
    torch.testing.assert_close(gv, wv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_sampled_cross_entropy_with_offsets_on_cuda_matches_the_cpu():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(64, 16, generator=g), torch.randn(500, 16, generator=g)
    labels = torch.randint(0, 500, (64,), generator=g)
    labels[::7] = -100
    tokens = torch.randint(-1, 500, (64, 40), generator=g)
    tokens[:, 0] = labels.clamp(min=0)  # labels among the offset classes too
    values = torch.randn(64, 40, generator=g)
    candidates = torch.cat([labels[labels >= 0].unique(), torch.randint(0, 500, (100,), generator=g)])
    log_q = torch.randn(len(candidates), generator=g)
    grads = []
    for dev in ("cpu", "cuda"):
        xs, ws, vs = (t.to(dev).requires_grad_() for t in (x, w, values))
        loss = sampled_cross_entropy(xs, ws, None, labels.to(dev), candidates.to(dev), log_q.to(dev), 0.3,
                                     sparse=True, offsets=(tokens.to(dev), vs))
        grads.append([loss] + [t.to_dense() if t.is_sparse else t for t in torch.autograd.grad(loss, [xs, ws, vs])])
    for a, e in zip(*grads):
        torch.testing.assert_close(e.cpu(), a, rtol=1e-4, atol=1e-5)


def test_sampled_cross_entropy_names_a_label_missing_from_the_candidates():
    with pytest.raises(ValueError, match="candidates"):
        sampled_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), None, torch.tensor([1, 4]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="candidates"):
        sampled_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), None, torch.tensor([1, 4]), torch.tensor([[1]]))


def test_negative_sampler_draws_the_batch_targets_then_uniform_items_with_their_log_q():
    share = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    sampler = NegativeSampler(first_item=10, target_share=share, num_negatives=6)
    labels = torch.tensor([11, 10, 11])
    cands, log_q = sampler.draw(labels, np.random.default_rng(0))
    assert cands[:2].tolist() == [10, 11] and len(cands) == 8 and ((cands >= 10) & (cands < 14)).all()
    again, _ = sampler.draw(labels, np.random.default_rng(0))
    assert torch.equal(cands, again)  # the numpy generator decides: a resumed run draws the same
    p = share[cands - 10]
    torch.testing.assert_close(log_q, torch.log(1 - (1 - p) ** 3 + 6 / 4))  # in the batch of 3, or drawn
    none = NegativeSampler(10, share, 0).log_q(torch.tensor([13]), 3)
    assert torch.isfinite(none).all()  # an item that is never a target and never drawn
