import dataclasses
import json

import numpy as np
import pytest
import torch

from genrec_fast import load, preset, train
from genrec_fast.config import TrainConfig
from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.train import Trainer, budget_steps, lr_factor, make_examples, to_batch


def test_examples_use_training_items_only():
    d = synthetic(n_users=100, n_items=40, seed=4)
    s = leave_one_out(d)
    cfg = TrainConfig(max_items=5)
    rng = np.random.default_rng(0)
    for pretrain in (True, False):
        for ex in make_examples(s, rng, pretrain, cfg):
            u = ex.user
            if u is None:
                continue
            train_u = s.train[u].tolist()
            assert ex.target in train_u
            assert set(ex.items.tolist()) <= set(train_u) and len(ex.items) <= 5
            if pretrain:
                assert ex.items[ex.mask_at] == ex.target
            else:
                n = len(ex.items)  # the context is the items right before the target
                pos = [i for i in range(n, len(train_u)) if train_u[i - n:i] == ex.items.tolist()]
                assert any(train_u[p] == ex.target for p in pos)


def test_pretraining_masks_the_last_item_about_30_percent():
    d = synthetic(n_users=400, n_items=40, seed=4)
    exs = make_examples(leave_one_out(d), np.random.default_rng(0), True, TrainConfig())
    last = np.mean([e.mask_at == len(e.items) - 1 for e in exs])
    assert 0.3 < last < 0.55  # 0.3 forced + uniform picks that land on the last item


def test_user_token_dropped_sometimes():
    d = synthetic(n_users=200, n_items=40, seed=4)
    exs = make_examples(leave_one_out(d), np.random.default_rng(0), False, TrainConfig(drop_user_prob=0.2))
    assert 0.15 < np.mean([e.user is None for e in exs]) < 0.25


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == 0.1 and lr_factor(9, 10, 100) == 1.0
    assert abs(lr_factor(100, 10, 100) - 0.1) < 1e-9


def test_logs_plot_and_resume(tmp_path):
    d = synthetic(n_users=120, n_items=30, seed=6)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=50)
    train(d, tmp_path, p, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["phase"] for r in rows] == ["pretrain", "finetune"]
    assert all("valid" in r and "NDCG@10" in r["valid"] for r in rows)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    p.train = dataclasses.replace(p.train, finetune_epochs=2)
    train(d, tmp_path, p, progress=False, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # resumed after epoch 2, not from scratch


class _Killed(Exception):
    """Stands for the process being killed in the middle of an epoch."""


def _kill_in_epoch(monkeypatch, n: int):
    """Trainer.train_epoch raises _Killed in (1-based) epoch n; -> the real train_epoch, to put back."""
    epoch = Trainer.train_epoch

    def killed(self, pretrain, deadline=None):
        if self.epoch == n - 1:
            raise _Killed
        return epoch(self, pretrain, deadline)
    monkeypatch.setattr(Trainer, "train_epoch", killed)
    return epoch


def test_resume_after_a_kill_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    """With dropout (torch's generator) and the user-token drops (numpy's), a run killed in epoch 3 and resumed
    from last/ (epoch 2) logs the same losses and validations and ends with the same weights as a run never
    stopped: train_state holds every generator."""
    d = synthetic(n_users=120, n_items=30, seed=6)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, dropout=0.3, attention_dropout=0.1, activation_dropout=0.1)
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=2, eval_users=50)
    train(d, tmp_path / "whole", p, progress=False)
    epoch = _kill_in_epoch(monkeypatch, 3)
    with pytest.raises(_Killed):
        train(d, tmp_path / "cut", p, progress=False)
    monkeypatch.setattr(Trainer, "train_epoch", epoch)
    train(d, tmp_path / "cut", p, progress=False, resume=True)
    logs = [[json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "cut")]
    for row in logs[0] + logs[1]:  # (the timings differ)
        del row["elapsed_s"], row["valid"]["seconds"]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3] and logs[0] == logs[1]
    whole, cut = (torch.load(tmp_path / run / "last" / "weights.pt") for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_resume_with_another_config_names_the_fields_that_differ(tmp_path):
    """A resume whose config changes the model (or whether the user table trains) is a one-line ValueError that
    names each field, saved -> now, instead of torch's mismatch of every weight; other train fields may change."""
    d = synthetic(n_users=60, n_items=20, seed=6)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=0, eval_users=20)
    train(d, tmp_path, p, progress=False)
    other = preset("tiny")
    other.model = dataclasses.replace(p.model, d_model=64, dropout=0.0)
    other.train = dataclasses.replace(p.train, drop_user_prob=1.0)
    with pytest.raises(ValueError) as e:
        Trainer(d, tmp_path, other, progress=False).resume()
    msg = str(e.value)
    assert "\n" not in msg and "model.d_model 32 -> 64" in msg and "model.dropout 0.1 -> 0.0" in msg
    assert "train.drop_user_prob 0.2 -> 1.0" in msg and "repeat the run's --config and --set" in msg
    other.model, other.train = p.model, dataclasses.replace(p.train, finetune_epochs=1, lr=2e-3)
    Trainer(d, tmp_path, other, progress=False).resume()  # a longer schedule, another learning rate: fine


def test_patience_counts_finetuning_epochs_only(tmp_path):
    """With lr 0 every validation equals the first: pretraining epochs 1-2 never count, finetuning epoch 3 is
    finetuning's best, 4 and 5 are two without a gain: patience 2 stops there and `best` stays epoch 1's."""
    d = synthetic(n_users=60, n_items=20, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=2, finetune_epochs=6, eval_users=20, patience=2, lr=0.0)
    t = Trainer(d, tmp_path, p, progress=False)
    assert len(t.eval_users) == len(set(t.eval_users.tolist())) == 20  # train.eval_users distinct users
    summary = t.run()
    assert (summary["epochs"], summary["stopped_by"]) == (5, "patience")
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len({r["valid"]["NDCG@10"] for r in rows}) == 1


def test_best_is_the_first_highest_validation_ndcg10_and_patience_restarts_at_each_gain(tmp_path, monkeypatch):
    """Scripted validations (HR@10 disagreeing with NDCG@10): `best` is written at each strictly higher NDCG@10
    (epochs 1, 2, 4; epoch 6 only ties epoch 4), a gain restarts patience (epoch 4 after epoch 3's loss), and
    patience 2 stops after epoch 6, also in a run killed in epoch 6 and resumed (train_state keeps the count)."""
    ndcg = [.10, .20, .15, .25, .18, .25, .30]  # epochs 1 (pretraining) .. 7
    hr = [.90, .10, .10, .10, .10, .10, .10]
    saved = []
    save = Trainer._save
    monkeypatch.setattr(Trainer, "_evaluate_valid", lambda self, ranker: {"NDCG@10": ndcg[self.epoch],
                                                                          "HR@10": hr[self.epoch]})
    monkeypatch.setattr(Trainer, "_save", lambda self, name, with_state=False: (
        saved.append(self.epoch + 1) if name == "best" else None, save(self, name, with_state)))
    epoch = _kill_in_epoch(monkeypatch, 6)
    d = synthetic(n_users=40, n_items=20, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=6, eval_users=20, patience=2)
    with pytest.raises(_Killed):
        Trainer(d, tmp_path, p, progress=False).run()
    monkeypatch.setattr(Trainer, "train_epoch", epoch)
    resumed = Trainer(d, tmp_path, p, progress=False)
    resumed.resume()
    summary = resumed.run()
    assert saved == [1, 2, 4]
    assert (summary["epochs"], summary["stopped_by"], summary["best_valid_ndcg10"]) == (6, "patience", .25)


@pytest.mark.parametrize("mask_seen", [False, True])
def test_validation_excludes_seen_items_as_the_model_is_trained_to(tmp_path, monkeypatch, mask_seen):
    """A train.mask_seen model never learned to score its history items: its validation excludes them."""
    import sys
    train_module = sys.modules["genrec_fast.train"]  # (genrec_fast.train is the function)
    asked = []
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **kw: (asked.append(kw["exclude_seen"]), real(*a, **kw))[1])
    p = preset("tiny")
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, eval_users=20, mask_seen=mask_seen)
    Trainer(synthetic(n_users=40, n_items=20, seed=7), tmp_path, p, progress=False).validate()
    assert asked == [mask_seen]


def test_max_minutes_stops_before_an_epoch_that_would_pass_the_budget(tmp_path):
    d = synthetic(n_users=60, n_items=20, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=20, max_minutes=1e-4)
    train(d, tmp_path, p, progress=False)  # 6 ms: the first epoch runs (a checkpoint to load), no second
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert json.loads((tmp_path / "train_summary.json").read_text())["stopped_by"] == "max_minutes"
    p.train = dataclasses.replace(p.train, max_minutes=0.0)
    summary = Trainer(d, tmp_path / "all", p, progress=False).run()
    assert summary["epochs"] == 4 and summary["stopped_by"] == "schedule"
    p.train = dataclasses.replace(p.train, max_minutes=2.0)
    t = Trainer(d, tmp_path / "rule", p, progress=False)
    assert t._stop_reason(elapsed_s=100, last_epoch_s=0) is None  # the first epoch always runs
    assert t._stop_reason(elapsed_s=60, last_epoch_s=50) is None  # ends at 110 s <= 120 s
    assert t._stop_reason(elapsed_s=71, last_epoch_s=50) == "max_minutes"


def test_max_minutes_cuts_an_epoch_longer_than_the_budget(tmp_path):
    d = synthetic(n_users=200, n_items=30, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=20, eval_from=10,
                                  batch_size=8, max_minutes=1e-4)
    t = Trainer(d, tmp_path, p, progress=False)
    n = t.steps_per_epoch(True)
    assert n > 20
    summary = t.run()  # 6 ms: the first epoch stops after its first step, not after its n
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and summary["stopped_by"] == "max_minutes"
    assert 1 <= rows[0]["cut_after_steps"] == t.step < n and t.cut_of == (t.step, n)
    assert "valid" in rows[0] and summary["best_valid_ndcg10"] == rows[0]["valid"]["NDCG@10"]  # a cut epoch
    # is validated (eval_from aside): it is the run's last
    assert (tmp_path / "best").is_dir() and (tmp_path / "last").is_dir()
    assert t._stop_reason(elapsed_s=61 * 1e-4, last_epoch_s=1e-9) == "max_minutes"  # a passed budget starts none
    p.train = dataclasses.replace(p.train, max_minutes=0.0, finetune_epochs=1)
    train(d, tmp_path, p, progress=False, resume=True)  # the cut epoch counts as done: on with the next
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"], "cut_after_steps" in r) for r in rows] == [(1, "pretrain", True),
                                                                                (2, "finetune", False)]
    p.train = dataclasses.replace(p.train, finetune_epochs=0)
    whole = Trainer(d, tmp_path / "whole", p, progress=False)
    whole.run()
    assert whole.step == n and whole.cut_of is None


def test_budget_steps_counts_the_whole_epochs_that_fit():
    assert budget_steps(100, remaining_s=50.0, s_per_step=0.1, epoch_steps=[200, 200, 200]) == 500  # 20 s each
    assert budget_steps(100, remaining_s=39.9, s_per_step=0.1, epoch_steps=[200, 200]) == 300  # the 2nd ends late
    assert budget_steps(100, remaining_s=5.0, s_per_step=0.1, epoch_steps=[200]) == 100  # none fits
    assert budget_steps(0, remaining_s=1e9, s_per_step=0.1, epoch_steps=[3, 4]) == 7  # the schedule ends first


def test_budget_schedule_anneals_within_the_budget(tmp_path):
    d = synthetic(n_users=60, n_items=20, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=30, eval_users=20, max_minutes=10.0)
    t = Trainer(d, tmp_path / "plan", p, progress=False)
    assert t.decay_steps == t.total_steps
    n = t.steps_per_epoch(False)
    t.epoch, t.step = 3, 3 * n  # after 3 epochs of 60 s, 7 more fit in the 7 minutes left
    assert t._budget_plan(elapsed_s=180.0, epoch_s=60.0, epoch_steps=n) == 10 * n
    p.train = dataclasses.replace(p.train, max_minutes=1e-4, budget_schedule=True)
    t = Trainer(d, tmp_path / "cut", p, progress=False)
    t.run()  # one epoch runs, then no further one fits: the decay ends where the run did
    assert t.epoch == 1 and t.decay_steps == t.step < t.total_steps
    with pytest.raises(ValueError, match="train.budget_schedule"):
        TrainConfig(budget_schedule=True)


def test_eval_from_skips_early_validations_and_leaves_training_unchanged(tmp_path):
    d = synthetic(n_users=80, n_items=25, seed=8)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=30)
    every = Trainer(d, tmp_path / "every", p, progress=False)
    every.run()
    p.train = dataclasses.replace(p.train, eval_from=2)
    late = Trainer(d, tmp_path / "late", p, progress=False)
    late.run()
    rows = [json.loads(x) for x in (tmp_path / "late" / "log.jsonl").read_text().splitlines()]
    assert ["valid" in r for r in rows] == [False, False, True, True]
    for a, b in zip(every.model.state_dict().values(), late.model.state_dict().values()):
        assert torch.equal(a, b)  # validation draws no random numbers: the same training
    # stopped by the budget before any validation: one step an epoch (nothing to cut), so the budget stops
    # the run after the first, unvalidated epoch and the last weights are validated and kept
    p.train = dataclasses.replace(p.train, eval_from=10, max_minutes=1e-4, batch_size=10_000)
    train(d, tmp_path / "stop", p, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "stop" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["pretrain", "final validation"] and "valid" in rows[1]
    assert (tmp_path / "stop" / "best").is_dir()


def test_cuda_matmul_tf32_sets_the_flag_inside_and_restores_it_after():
    import pytest
    import torch
    from genrec_fast.train import cuda_matmul_tf32
    before = torch.backends.cuda.matmul.allow_tf32
    for enabled in (True, False):
        with cuda_matmul_tf32(enabled):
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cuda.matmul.allow_tf32 is before
    with pytest.raises(RuntimeError), cuda_matmul_tf32(not before):
        raise RuntimeError("a failed epoch")
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_history_augmentations_need_one_input_per_prefix(tmp_path):
    import pytest
    d = synthetic(n_users=30, n_items=20, seed=7)
    for name in ("history_drop", "history_reorder"):
        p = preset("tiny")
        p.model = dataclasses.replace(p.model, encoder_causal=True)
        p.train = dataclasses.replace(p.train, **{name: 0.3})
        with pytest.raises(ValueError, match=f"train.{name} needs model.encoder_causal=False"):
            Trainer(d, tmp_path, p, progress=False)


def test_user_table_left_untouched_without_user_tokens(tmp_path):
    d = synthetic(n_users=60, n_items=20, seed=7)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=0, finetune_epochs=1, eval_users=20, drop_user_prob=1.0)
    trainer = Trainer(d, tmp_path, p, progress=False)
    users0, items0 = trainer.model.user_embed.weight.clone(), trainer.model.item_embed.weight.clone()
    trainer.run()
    assert torch.equal(trainer.model.user_embed.weight, users0)  # never read, so never trained
    assert not torch.equal(trainer.model.item_embed.weight, items0)


def test_cloze_mix_adds_masked_item_examples_to_finetuning():
    d = synthetic(n_users=300, n_items=40, seed=4)
    s = leave_one_out(d)
    plain = make_examples(s, np.random.default_rng(0), False, TrainConfig())
    mixed = make_examples(s, np.random.default_rng(0), False, TrainConfig(cloze_mix=0.5))
    cloze = [e for e in mixed if e.mask_at is not None]
    assert all(e.mask_at is None for e in plain) and len(mixed) - len(cloze) == len(plain)
    n_train = sum(len(x) for x in s.train)
    assert 0.4 * n_train < len(cloze) < 0.6 * n_train
    assert all(e.items[e.mask_at] == e.target for e in cloze)


def _augmented_examples(**augment):
    """Finetuning examples without and with a history augmentation, and the true prefixes of each
    (user, target) pair (several if a target repeats)."""
    s = leave_one_out(synthetic(n_users=300, n_items=40, seed=4))
    plain = make_examples(s, np.random.default_rng(0), False, TrainConfig(drop_user_prob=0.0))
    changed = make_examples(s, np.random.default_rng(0), False, TrainConfig(drop_user_prob=0.0, **augment))
    full = {}
    for e in plain:
        full.setdefault((e.user, e.target), []).append(e.items.tolist())
    return plain, changed, full


def test_history_drop_keeps_an_ordered_nonempty_part_of_each_prefix():
    plain, dropped, full = _augmented_examples(history_drop=0.5)
    assert len(dropped) == len(plain)
    for e in dropped:
        assert len(e.items) >= 1
        got = e.items.tolist()
        assert any(_is_subsequence(got, f) for f in full[(e.user, e.target)]), (e.user, e.target)
    ratio = sum(len(e.items) for e in dropped) / sum(len(e.items) for e in plain)
    assert 0.5 < ratio < 0.65  # half dropped, plus the one kept where all would go


def test_history_reorder_shuffles_one_stretch_and_keeps_the_items():
    _, mixed, prefixes = _augmented_examples(history_reorder=0.5)
    changed = 0
    for e in mixed:
        got = e.items.tolist()
        same_items = [f for f in prefixes[(e.user, e.target)] if sorted(f) == sorted(got)]
        assert same_items, (e.user, e.target)  # a permutation of a true prefix
        diff = [i for i, (a, b) in enumerate(zip(got, same_items[0])) if a != b]
        if diff:  # the moved items lie in one stretch of at most half the history
            changed += 1
            assert diff[-1] - diff[0] + 1 <= len(got) // 2
    assert changed > len(mixed) // 4


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(x in it for x in part)


def test_train_config_rejects_probabilities_outside_0_1():
    import pytest
    with pytest.raises(ValueError, match="train.cloze_mix"):
        TrainConfig(cloze_mix=1.5)
    with pytest.raises(ValueError, match="train.history_drop"):
        TrainConfig(history_drop=-0.1)
    with pytest.raises(ValueError, match="train.max_minutes"):
        TrainConfig(max_minutes=-1)
    with pytest.raises(ValueError, match="train.eval_from"):
        TrainConfig(eval_from=-1)


def test_causal_encoder_trains_all_prefixes_per_window_and_reloads(tmp_path):
    d = synthetic(n_users=80, n_items=25, seed=8)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, encoder_causal=True, encoder_positions="end")
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=2, eval_users=30, cloze_mix=0.3)
    trainer = Trainer(d, tmp_path, p, progress=False)
    parts = trainer.epoch_batches(pretrain=False)
    windows = [w for part in parts for w in part if not hasattr(w, "target")]
    assert len(windows) == sum(len(s) >= 2 for s in trainer.split.train)  # one window per user
    assert any(hasattr(e, "target") for part in parts for e in part)  # the cloze mix is there too
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[1]["loss"]
    rec = load(tmp_path / "best")
    assert rec.model.cfg.encoder_causal
    out = rec.recommend([[d.item_ids[0], d.item_ids[1]]], k=5)
    assert len(out[0].items) == 5


def test_item_eos_false_trains_one_decoder_step_and_ranks_by_the_item_token(tmp_path):
    import pytest
    from brute_force import exhaustive_scores
    d = synthetic(n_users=120, n_items=30, seed=5, follow_prob=0.9)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False)
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=3, eval_users=40, lr=5e-3)
    with pytest.raises(ValueError, match="item_eos"):  # sub-word pieces need EOS to end an item
        Trainer(d, tmp_path / "pieces", p, progress=False)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    trainer = Trainer(d, tmp_path, p, progress=False)
    part = trainer.epoch_batches(pretrain=False)[0]
    kwargs, labels = to_batch(part, trainer.tokenizer, trainer.model.cfg, "cpu")
    assert kwargs["decoder_tokens"].shape == (len(part), 1) and (kwargs["decoder_tokens"] == 2).all()  # BOS
    assert labels[:, 0].tolist() == [int(trainer.tokenizer.item_pieces[e.target][0]) for e in part]
    trainer.run()
    rec = load(tmp_path / "best")
    assert not rec.model.cfg.item_eos
    split = leave_one_out(d)
    for u in (0, 9):  # beam search = ranking by the first decoder step alone
        hist = split.test_history(u)
        brute = exhaustive_scores(rec, hist, None)
        items, scores = rec.decode_batch([rec.encode(hist, None)], k=8, num_beams=8)
        want = np.argsort(-brute, kind="stable")[:8]
        np.testing.assert_array_equal(items[0], want)
        np.testing.assert_allclose(scores[0], brute[want], atol=1e-4)


def test_beam_decode_rejects_items_of_mixed_lengths_for_a_model_without_eos():
    import pytest
    from genrec_fast.beam_search import Trie
    from genrec_fast.decoding import beam_decode
    from genrec_fast.model import GenRec
    cfg = dataclasses.replace(preset("tiny").model, vocab_size=20, item_eos=False)
    enc = {"tokens": torch.tensor([[5, 6]]), "user_ids": torch.zeros(1, 2, dtype=torch.long),
           "item_ids": torch.zeros(1, 2, dtype=torch.long), "mask": torch.ones(1, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match="items of one length"):  # without EOS, [9] could go on to [9, x]
        beam_decode(GenRec(cfg).eval(), Trie.build([[7, 8], [9]], 3), enc, k=2, num_beams=2)


def test_item_tokens_make_the_id_order_irrelevant(tmp_path):
    """With one token per item and no user token the model never reads id text, so P5's original ids
    (which leak the first-appearance order) and a random permutation train the same model; with
    sub-word pieces they differ."""
    def losses(id_order, item_tokens):
        p = preset("tiny")
        p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=40,
                                      drop_user_prob=1.0)
        p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens=item_tokens)
        out = tmp_path / f"{id_order}-{item_tokens}"
        train(synthetic(n_users=60, n_items=30, seed=4, id_order=id_order), out, p, progress=False)
        return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert losses("original", "whole") == losses("random", "whole")
    assert losses("original", "pieces") != losses("random", "pieces")


def _sampled_preset(**train_fields):
    """The tiny model with one token per item, no EOS step and the sampled softmax."""
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, **{"softmax": "sampled", "num_negatives": 8, **train_fields})
    return p


def test_sampled_softmax_needs_one_item_token_per_target(tmp_path):
    import pytest
    d = synthetic(n_users=30, n_items=20, seed=7)
    for section, name, value in [("tokenizer", "item_tokens", "pieces"), ("model", "item_eos", True),
                                 ("model", "encoder_causal", True), ("train", "mask_seen", True)]:
        p = _sampled_preset()
        setattr(p, section, dataclasses.replace(getattr(p, section), **{name: value}))
        with pytest.raises(ValueError, match=f"train.softmax='sampled' needs .*{section}.{name}"):
            Trainer(d, tmp_path, p, progress=False)
    with pytest.raises(ValueError, match="train.softmax"):
        TrainConfig(softmax="sample")
    with pytest.raises(ValueError, match="train.num_negatives"):
        TrainConfig(num_negatives=-1)


def test_full_softmax_keeps_one_dense_adamw(tmp_path):
    p = _sampled_preset()
    p.train = dataclasses.replace(p.train, softmax="full")
    t = Trainer(synthetic(n_users=30, n_items=20, seed=7), tmp_path, p, progress=False)
    assert t.sparse_opt is None and t.optimizers == [t.opt] and not t.model.shared.sparse
    assert [q for g in t.opt.param_groups for q in g["params"]] == t.params


def test_sampled_softmax_step_updates_only_the_rows_it_touches(tmp_path):
    d = synthetic(n_users=80, n_items=40, seed=2)
    t = Trainer(d, tmp_path, _sampled_preset(pretrain_epochs=0, finetune_epochs=1, drop_user_prob=0.0),
                progress=False)
    m = t.model
    tables = {"shared": m.shared.weight, "item_embed": m.item_embed.weight, "user_embed": m.user_embed.weight}
    assert [q for g in t.sparse_opt.param_groups for q in g["params"]] == list(tables.values())
    assert not any(q is w for q in t.opt.param_groups[0]["params"] for w in tables.values())
    before = {k: w.detach().clone() for k, w in tables.items()}
    part = t.epoch_batches(pretrain=False)[0]
    kwargs, labels = to_batch(part, t.tokenizer, m.cfg, "cpu")
    replay = np.random.default_rng()
    replay.bit_generator.state = t.rng.bit_generator.state
    candidates, _ = t.sampler.draw(labels[:, 0], replay)  # what the step will draw
    t.epoch_batches = lambda pretrain: [part]
    assert np.isfinite(t.train_epoch(False))
    touched = {"shared": torch.cat([candidates, kwargs["tokens"].flatten(), kwargs["decoder_tokens"].flatten()]),
               "item_embed": kwargs["item_ids"].flatten(), "user_embed": kwargs["user_ids"].flatten()}
    for k, w in tables.items():
        rows = torch.zeros(len(w), dtype=torch.bool)
        rows[touched[k]] = True
        rows[0] = False  # the padding row never learns
        assert torch.equal(w[~rows], before[k][~rows]), k  # lazy: no other row moves, not even by weight decay
        assert not torch.equal(w[rows], before[k][rows]), k


def test_sampled_softmax_trains_the_history_and_transition_biases(tmp_path):
    """The biases' items are classes of each row's sampled softmax (loss.sampled_cross_entropy(offsets=...)):
    their weights get gradients, and the model learns the planted chains."""
    d = synthetic(n_users=150, n_items=30, seed=6, follow_prob=0.9)
    p = _sampled_preset(pretrain_epochs=0, finetune_epochs=3, eval_users=60, lr=5e-3, drop_user_prob=1.0)
    p.model = dataclasses.replace(p.model, history_bias=True, transition_bias=True, transition_reverse=True)
    t = Trainer(d, tmp_path, p, progress=False)
    part = t.epoch_batches(pretrain=False)[0]
    loss, _ = t._loss(part)
    loss.backward()
    m = t.model
    for name, w in [("transition.weight", m.transition.weight), ("transition.reverse_weight",
                                                                  m.transition.reverse_weight),
                    ("history.recency", m.history.recency)]:
        assert w.grad is not None and bool(w.grad.abs().sum() > 0), name
    summary = t.run()
    assert summary["best_valid_ndcg10"] > 0.3  # popularity is ~0.05 here


def test_full_softmax_over_a_large_catalog_warns_and_names_the_sampled_one(tmp_path, monkeypatch, caplog):
    import logging
    import sys
    monkeypatch.setattr(sys.modules["genrec_fast.train"], "LARGE_CATALOG", 30)
    d = synthetic(n_users=30, n_items=40, seed=7)
    p = _sampled_preset()
    p.train = dataclasses.replace(p.train, softmax="full")
    with caplog.at_level(logging.WARNING, logger="genrec_fast.train"):
        Trainer(d, tmp_path / "full", p, progress=False)
    assert "--set train.softmax=sampled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genrec_fast.train"):
        Trainer(d, tmp_path / "sampled", _sampled_preset(), progress=False)
    assert "train.softmax" not in caplog.text


def test_auto_settings_take_their_catalog_scale_form_from_large_catalog_items(tmp_path, monkeypatch, caplog):
    """train.softmax="auto" and train.sparse_tables=None (the defaults) are the sampled softmax and sparse tables
    from LARGE_CATALOG items (logged, saved resolved in the checkpoint), the full softmax and dense tables below."""
    import logging
    import sys
    p = _sampled_preset(softmax="auto", pretrain_epochs=0, finetune_epochs=1)
    d = synthetic(n_users=30, n_items=40, seed=7)
    small = Trainer(d, tmp_path / "small", p, progress=False)
    assert not small.sampled and small.sparse_opt is None and small.tcfg.sparse_tables is False
    monkeypatch.setattr(sys.modules["genrec_fast.train"], "LARGE_CATALOG", 30)
    with caplog.at_level(logging.INFO, logger="genrec_fast.train"):
        big = Trainer(d, tmp_path / "big", p, progress=False)
    assert big.sampled and big.sparse_opt is not None
    assert ("chosen for the catalog's size: train.softmax='sampled' (train.softmax='full' keeps the full one); "
            "train.sparse_tables=True (as the sampled softmax needs)") in caplog.text
    big.run()
    saved = json.loads((tmp_path / "big" / "best" / "config.json").read_text())["train"]
    assert (saved["softmax"], saved["sparse_tables"]) == ("sampled", True)
    codes = Trainer(d, tmp_path / "codes", _codes_preset(), progress=False)  # a leaf head: full, sparse tables
    assert not codes.sampled and codes.tcfg.sparse_tables and codes.sparse_opt is not None
    p = _codes_preset()
    p.tokenizer = dataclasses.replace(p.tokenizer, max_leaf=5)  # 40 items: 4 clusters of 10 -> 8 clusters of 5
    assert int(Trainer(d, tmp_path / "leaf", p, progress=False).tokenizer.code_table[:, 0].max()) + 1 == 8


def test_clip_grad_norm_takes_sparse_gradients_as_their_dense_equivalent():
    from genrec_fast.train import clip_grad_norm
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(10, 3, generator=g, requires_grad=True), torch.randn(4, generator=g, requires_grad=True)
    (torch.nn.functional.embedding(torch.tensor([1, 1, 4]), w, sparse=True).pow(2).sum() + v.pow(3).sum()).backward()
    dense_w, dense_v = w.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    dense_w.grad, dense_v.grad = w.grad.to_dense(), v.grad.clone()
    want = torch.nn.utils.clip_grad_norm_([dense_w, dense_v], 0.5)
    got = clip_grad_norm([w, v], 0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w.grad.to_dense(), dense_w.grad)
    torch.testing.assert_close(v.grad, dense_v.grad)


def test_sampled_softmax_trains_checkpoints_and_resumes(tmp_path):
    import pytest
    from genrec_fast import checkpoint
    d = synthetic(n_users=150, n_items=30, seed=6, follow_prob=0.9)
    p = _sampled_preset(pretrain_epochs=1, finetune_epochs=2, eval_users=60, lr=5e-3)
    train(d, tmp_path, p, progress=False)
    state = checkpoint.load_train_state(tmp_path / "last")
    saved = state["sparse_optimizer"]["state"]  # token, item and user tables
    p.train = dataclasses.replace(p.train, finetune_epochs=3)
    t = Trainer(d, tmp_path, p, progress=False)
    t.resume()
    assert t.step == state["step"] and t.epoch == 3 and len(saved) == 3
    assert saved[0]["exp_avg"].shape == t.model.shared.weight.shape
    for k, s in saved.items():  # the lazy Adam moments come back
        assert torch.equal(t.sparse_opt.state[t.sparse_opt.param_groups[0]["params"][k]]["exp_avg"], s["exp_avg"])
    train(d, tmp_path, p, progress=False, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert max(r["valid"]["NDCG@10"] for r in rows) > 0.3  # popularity is ~0.05 here: it learned the chains
    p.train = dataclasses.replace(p.train, softmax="full")
    with pytest.raises(ValueError, match="trained with sparse tables .*resume it with the same"):
        Trainer(d, tmp_path, p, progress=False).resume()


def test_target_tokens_are_the_first_labels_of_the_batch(tmp_path):
    """What a rank's sampled softmax draws its in-batch candidates from: the targets of the whole batch."""
    from genrec_fast.train import target_tokens
    for item_tokens, item_eos in (("whole", False), ("pieces", True)):
        p = preset("tiny")
        p.model = dataclasses.replace(p.model, item_eos=item_eos)
        p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens=item_tokens)
        t = Trainer(synthetic(n_users=40, n_items=20, seed=7), tmp_path / item_tokens, p, progress=False)
        part = t.epoch_batches(pretrain=False)[0]
        _, labels = to_batch(part, t.tokenizer, t.model.cfg, "cpu")
        assert torch.equal(target_tokens(part, t.tokenizer, t.model.cfg, "cpu"), labels[:, 0])


def test_item_id_embed_false_keeps_the_id_table_out_of_the_model(tmp_path):
    """model.item_id_embed=False: the item ID table stays zero through training and reloading, so the
    encoder's output no longer depends on the item ids (with the table on, it does)."""
    d = synthetic(n_users=60, n_items=30, seed=3)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_id_embed=False, dropout=0.0)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=20)
    train(d, tmp_path / "off", p, progress=False)
    rec = load(tmp_path / "off" / "best")
    assert not rec.model.cfg.item_id_embed and not rec.model.item_embed.weight.any()
    tokens = torch.tensor([[40, 41, 42, 5, 3]])
    ids = torch.tensor([[4, 9, 2, 0, 0]])
    kw = dict(user_ids=torch.zeros_like(tokens), mask=torch.ones_like(tokens, dtype=torch.bool))
    from genrec_fast.model import GenRec
    for on, model in ((False, rec.model), (True, GenRec(dataclasses.replace(rec.model.cfg, item_id_embed=True)).eval())):
        a = model.encode(tokens, item_ids=ids, **kw)
        b = model.encode(tokens, item_ids=torch.zeros_like(ids), **kw)
        assert torch.equal(a, b) != on


def _codes_preset(**train):
    """A tiny codes model with the leaf head and both biases (the `codes` preset's shape)."""
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, leaf_head=True, history_bias=True, transition_bias=True,
                                  transition_reverse=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=4,
                                      code_input="first")
    p.train = dataclasses.replace(p.train, **{"pretrain_epochs": 0, "finetune_epochs": 1, "drop_user_prob": 0.0,
                                               **train})
    return p


@pytest.mark.parametrize("codes", [True, False])
def test_sparse_tables_give_the_dense_gradient(tmp_path, codes):
    """train.sparse_tables: the item and user tables' sparse gradients are the dense ones (same loss), on codes with
    the leaf head (its leaf softmax gathers item vectors) and on a one-token model with both biases."""
    d = synthetic(n_users=60, n_items=40, seed=3)
    if codes:
        p = _codes_preset()
    else:
        p = _sampled_preset(pretrain_epochs=0, finetune_epochs=1, drop_user_prob=0.0)
        p.train = dataclasses.replace(p.train, softmax="full")
        p.model = dataclasses.replace(p.model, history_bias=True, transition_bias=True)
    grads = {}
    for sparse in (False, True):
        p.train = dataclasses.replace(p.train, sparse_tables=sparse)
        torch.manual_seed(0)
        t = Trainer(d, tmp_path / str(sparse), p, progress=False)
        m = t.model
        assert m.item_embed.sparse == sparse and m.user_embed.sparse == sparse and not m.shared.sparse
        part = t.epoch_batches(pretrain=False)[0]
        loss, _ = t._loss(part)
        loss.backward()
        grads[sparse] = (loss.item(), m.item_embed.weight.grad, m.user_embed.weight.grad)
    (l0, i0, u0), (l1, i1, u1) = grads[False], grads[True]
    assert i1.is_sparse and u1.is_sparse and not i0.is_sparse
    assert l1 == pytest.approx(l0, rel=1e-6)
    torch.testing.assert_close(i1.to_dense(), i0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(u1.to_dense(), u0, rtol=1e-5, atol=1e-7)
    assert float(i0.abs().sum()) > 0


def test_sparse_tables_train_codes_that_reload_and_resume(tmp_path):
    """A codes model trained with sparse tables (only the item table: the user token is never written) learns the
    planted chains, and its checkpoint reloads (recommend) and resumes (the SparseAdam state too)."""
    d = synthetic(n_users=150, n_items=30, seed=6, follow_prob=0.9)
    p = _codes_preset(finetune_epochs=3, eval_users=60, lr=5e-3, drop_user_prob=1.0, sparse_tables=True)
    t = Trainer(d, tmp_path / "a", p, progress=False)
    assert [q for g in t.sparse_opt.param_groups for q in g["params"]] == [t.model.item_embed.weight]
    summary = t.run()
    assert summary["best_valid_ndcg10"] > 0.3  # popularity is ~0.05 here
    rec = load(tmp_path / "a" / "best")
    assert len(rec.recommend([[d.item_ids[0]]], k=5)[0].items) == 5
    from genrec_fast import checkpoint
    state = checkpoint.load_train_state(tmp_path / "a" / "last")
    saved = state["sparse_optimizer"]["state"]  # the item table's lazy Adam moments
    p.train = dataclasses.replace(p.train, finetune_epochs=4)
    again = Trainer(d, tmp_path / "a", p, progress=False)
    again.resume()
    assert again.epoch == 3 and len(saved) == 1
    assert torch.equal(again.sparse_opt.state[again.model.item_embed.weight]["exp_avg"], saved[0]["exp_avg"])


def test_sparse_tables_refuse_item_aux_and_large_dense_catalogs_warn(tmp_path, monkeypatch, caplog):
    import logging
    import sys
    with pytest.raises(ValueError, match="train.sparse_tables: item_aux"):
        TrainConfig(sparse_tables=True, item_aux=0.5)
    monkeypatch.setattr(sys.modules["genrec_fast.train"], "LARGE_CATALOG", 30)
    d = synthetic(n_users=30, n_items=40, seed=7)
    with caplog.at_level(logging.WARNING, logger="genrec_fast.train"):
        Trainer(d, tmp_path / "dense", _codes_preset(sparse_tables=False), progress=False)
    assert "--set train.sparse_tables=true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genrec_fast.train"):
        Trainer(d, tmp_path / "sparse", _codes_preset(sparse_tables=True), progress=False)
    assert "sparse_tables" not in caplog.text


def test_train_checks_its_arguments_before_any_work(tmp_path):
    d = synthetic(n_users=60, n_items=20, seed=1)
    p = preset("tiny")
    with pytest.raises(TypeError, match=r"preset: expected a genrec_fast.Preset \(preset\('recommended'\)"):
        train(d, tmp_path / "a", "recommended")
    with pytest.raises(TypeError, match="data: expected a SequenceData"):
        train("tiny.txt", tmp_path / "a", p)
    with pytest.raises(ValueError, match="device"):
        train(d, tmp_path / "a", p, device="gpu")
    typo = preset("tiny")
    typo.train.max_minuts = 1  # a misspelled field set on the object
    with pytest.raises(ValueError, match="train has no field 'max_minuts'"):
        train(d, tmp_path / "a", typo)
    late = preset("tiny")
    late.train.max_minutes = "1"  # assigned after construction: no __post_init__ ran
    with pytest.raises(ValueError, match=r"train.max_minutes expects float, got '1'"):
        train(d, tmp_path / "a", late)
    (tmp_path / "run" / "best").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="out_dir .*: holds a run already .best/.; resume=True continues it, overwrite=True replaces it"):
        train(d, tmp_path / "run", p)
    assert not (tmp_path / "a").exists()  # nothing was written by a refused call


def test_train_overwrite_trains_over_a_run(tmp_path):
    d = synthetic(n_users=60, n_items=20, seed=1)
    p = dataclasses.replace(preset("tiny"), train=dataclasses.replace(preset("tiny").train, pretrain_epochs=0,
                                                                      finetune_epochs=1))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "stale").write_text("x")
    rec = train(d, tmp_path, p, progress=False, overwrite=True)
    assert rec is not None and not (tmp_path / "best" / "stale").exists()
