import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from genrec_fast import load, preset
from genrec_fast.data import synthetic
from genrec_fast.loss import item_cross_entropy
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
