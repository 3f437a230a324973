"""Weight averaging: the update against its formula, and the trainer keeping the averaged weights."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from genrec_fast import checkpoint, preset, train
from genrec_fast.config import TrainConfig
from genrec_fast.data import synthetic
from genrec_fast.ema import WeightAverage


@settings(max_examples=25, deadline=None)
@given(decay=st.floats(0.05, 0.999), steps=st.integers(1, 30), seed=st.integers(0, 1000))
def test_update_follows_the_ramped_formula(decay, steps, seed):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, decay)
    want = [p.detach().clone() for p in model.parameters()]
    for n in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        avg.update()
        d = min(decay, (1 + n) / (10 + n))
        want = [d * w + (1 - d) * p.detach() for w, p in zip(want, model.parameters())]
    for s, w in zip(avg.shadow, want):
        torch.testing.assert_close(s, w, rtol=1e-5, atol=1e-5)


def test_applied_swaps_the_average_in_and_restores_the_weights():
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, 0.5)
    raw = [p.detach().clone() for p in model.parameters()]
    avg.shadow = [torch.zeros_like(p) for p in raw]
    with avg.applied():
        assert all(bool((p == 0).all()) for p in model.parameters())
    for p, r in zip(model.parameters(), raw):
        assert torch.equal(p, r)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, 1.0)
    with pytest.raises(ValueError, match="train.ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_trainer_validates_and_keeps_the_averaged_weights(tmp_path):
    d = synthetic(n_users=120, n_items=30, seed=6)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=0, finetune_epochs=1, eval_users=50, ema_decay=0.9)
    train(d, tmp_path, p, progress=False)
    best, *_ = checkpoint.load_parts(tmp_path / "best")  # one epoch: its validation saved `best`
    last, *_ = checkpoint.load_parts(tmp_path / "last")
    state = checkpoint.load_train_state(tmp_path / "last")
    assert state["ema"]["updates"] == state["step"] > 0
    for b, s, raw in zip(best.parameters(), state["ema"]["shadow"], last.parameters()):
        torch.testing.assert_close(b, s)  # best holds the average ...
    assert any(not torch.equal(b, raw) for b, raw in zip(best.parameters(), last.parameters()))  # ... not the raw
    p.train = dataclasses.replace(p.train, finetune_epochs=2)
    train(d, tmp_path, p, progress=False, resume=True)  # the average resumes with the run
    assert checkpoint.load_train_state(tmp_path / "last")["ema"]["updates"] == 2 * state["step"]
