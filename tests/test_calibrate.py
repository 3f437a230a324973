"""Bias calibration: its NDCG@10 of any factors is the evaluator's NDCG@10 of the model with its bias weights scaled
by them; the fit never loses on the users it fits; it runs after training and its checkpoint reloads."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from genrec_fast import Recommender, SequenceData, load, preset
from genrec_fast import calibrate as calibrate_mod
from genrec_fast.calibrate import Candidates, Decoded, bias_groups, calibrate, candidates, fit, scale_biases
from genrec_fast.data import leave_one_out
from genrec_fast.ensemble import Ensemble
from genrec_fast.evaluate import evaluate, model_ranker
from genrec_fast.train import Trainer, train

N_ITEMS = 50


def _data(seed=0, n_users=120):
    """Users who mostly move to a fixed successor of their last item, and sometimes repeat an earlier one."""
    rng = np.random.default_rng(seed)
    succ = rng.permutation(N_ITEMS)
    seqs = []
    for _ in range(n_users):
        s = [int(rng.integers(0, N_ITEMS))]
        while len(s) < int(rng.integers(5, 10)):
            r = rng.random()
            s.append(int(succ[s[-1]]) if r < 0.6 else int(rng.choice(s)) if r < 0.75 else int(rng.integers(0, N_ITEMS)))
        seqs.append(np.array(s))
    return SequenceData(list(range(n_users)), list(range(N_ITEMS)), seqs, [str(i + 1) for i in range(N_ITEMS)])


def _rec(data, history=True, transition=True, reverse=False, seed=0):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=history, transition_bias=transition,
                              transition_neighbors=6, transition_reverse=reverse)
    rec = Recommender.random(list(range(N_ITEMS)), cfg, vocab_size=200, n_users=data.n_users, item_tokens="whole",
                             seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # offsets of a trained model's size
        if history:
            rec.model.history.recency.normal_(0, 1.0)
            rec.model.history.query.weight.normal_(0, 0.5)
        if transition:
            rec.model.transition.fit(leave_one_out(data).train)
            rec.model.transition.weight.normal_(0, 1.0)
            if reverse:
                rec.model.transition.reverse_weight.normal_(0, 1.0)
    return rec


def _codes_rec(data, seed=0):
    """Collaborative codes (one level of 4 clusters) with the leaf head and all three bias groups, the cluster
    step's transition weights apart from the leaf step's."""
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, leaf_head=True, history_bias=True,
                              transition_bias=True, transition_neighbors=6, transition_reverse=True)
    rec = Recommender.random(list(range(N_ITEMS)), cfg, vocab_size=200, n_users=data.n_users, item_tokens="codes",
                             code_levels=1, code_branches=4, code_input="first", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        rec.model.item_embed.weight[1:].normal_(0, 1.0)
        rec.model.history.recency.normal_(0, 2.0)
        rec.model.history.query.weight.normal_(0, 1.0)
        rec.model.transition.fit(leave_one_out(data).train)
        for w in ("weight", "cluster_weight", "reverse_weight", "reverse_cluster_weight"):
            getattr(rec.model.transition, w).normal_(0, 2.0)
    return rec


# what each group's factor multiplies, named here apart from calibrate.py's own list
GROUP_PARAMS = {"history": ["history.recency", "history.query.weight", "history.query.bias"],
                "transition": ["transition.weight", "transition.cluster_weight"],
                "reverse": ["transition.reverse_weight", "transition.reverse_cluster_weight"]}


def _scaled(rec, scales: dict):
    other = copy.deepcopy(rec)
    params = dict(other.model.named_parameters())
    with torch.no_grad():
        for g, s in scales.items():
            for name in GROUP_PARAMS[g]:
                params[name].mul_(float(s))
    return other


def test_decoded_ndcg_is_the_evaluators_ndcg_of_the_scaled_codes_model():
    """A trie-search model: each factor set's NDCG@10 is the evaluator's beam-search ranking of the model with every
    bias weight scaled (both code steps' transition weights); `reset` restores the trained weights."""
    data = _data(5)
    split = leave_one_out(data)
    rec = _codes_rec(data)
    trained = copy.deepcopy(rec)
    groups = bias_groups(rec.model)
    assert groups == ["history", "transition", "reverse"] and not rec.one_step
    users = np.arange(1, data.n_users, 2)
    dec = Decoded(rec, split, users, groups, progress=False)
    rng = np.random.default_rng(2)
    seen = []
    for scales in [np.ones(3), np.zeros(3), np.array([1.0, 3.0, 0.0])] + [rng.uniform(0, 4, 3) for _ in range(2)]:
        other = _scaled(trained, dict(zip(groups, scales)))
        want = evaluate(model_ranker(other), split, "valid", users, progress=False)["NDCG@10"]
        assert dec.ndcg(torch.tensor(scales)) == pytest.approx(want, abs=1e-12)
        part = torch.arange(0, len(users), 3)
        want = evaluate(model_ranker(other), split, "valid", users[part.numpy()], progress=False)["NDCG@10"]
        assert dec.ndcg(torch.tensor(scales), part) == pytest.approx(want, abs=1e-12)
        seen.append(want)
    assert len(set(seen)) > 1  # the factors change the ranking
    dec.reset()
    for (name, p), w in zip(rec.model.named_parameters(), trained.model.parameters()):
        assert torch.equal(p, w), name


def test_calibrate_a_codes_model_on_a_sample_of_users(monkeypatch):
    data = _data(6, n_users=160)
    split = leave_one_out(data)
    rec = _codes_rec(data, seed=1)
    trained = copy.deepcopy(rec)
    monkeypatch.setattr(calibrate_mod, "DECODE_USERS", 100)
    out = calibrate(rec, split, seed=3, progress=False)
    assert out["users"] == 100
    users = np.sort(np.random.default_rng(3).choice(data.n_users, 100, replace=False))
    held = out["heldout_ndcg10"]
    assert out["applied"] == (held["after"] > held["before"])
    want = _scaled(trained, out["scales"])  # the scales found (all 1 when not applied) on the trained weights
    for (name, p), w in zip(rec.model.named_parameters(), want.model.parameters()):
        torch.testing.assert_close(p, w, msg=name)
    got = evaluate(model_ranker(rec), split, "valid", users, progress=False)["NDCG@10"]
    assert got == pytest.approx(out["valid_ndcg10"]["after"], abs=1e-12)
    base = evaluate(model_ranker(trained), split, "valid", users, progress=False)["NDCG@10"]
    assert base == pytest.approx(out["valid_ndcg10"]["before"], abs=1e-12)
    assert out["valid_ndcg10"]["after"] >= base


def test_calibrate_a_one_token_model_on_a_sample_of_users_beyond_candidate_users(monkeypatch):
    data = _data()
    split = leave_one_out(data)
    rec = _rec(data, True, True, True)
    trained = copy.deepcopy(rec)
    monkeypatch.setattr(calibrate_mod, "CANDIDATE_USERS", 80)
    out = calibrate(rec, split, seed=4, progress=False)
    assert out["users"] == 80 < data.n_users
    users = np.sort(np.random.default_rng(4).choice(data.n_users, 80, replace=False))
    base = evaluate(model_ranker(trained), split, "valid", users, progress=False)["NDCG@10"]
    assert base == pytest.approx(out["valid_ndcg10"]["before"], abs=1e-9)
    got = evaluate(model_ranker(rec), split, "valid", users, progress=False)["NDCG@10"]
    assert got == pytest.approx(out["valid_ndcg10"]["after" if out["applied"] else "before"], abs=1e-9)


@pytest.mark.parametrize("history, transition, reverse", [(True, True, True), (True, False, False),
                                                          (False, True, False)])
def test_candidate_ndcg_is_the_evaluators_ndcg_of_the_scaled_model(history, transition, reverse):
    data = _data()
    split = leave_one_out(data)
    rec = _rec(data, history, transition, reverse)
    groups = bias_groups(rec.model)
    assert len(groups) == history + transition + reverse
    cands = candidates(rec, split, np.arange(data.n_users), batch_size=32, progress=False)
    rng = np.random.default_rng(1)
    for scales in [np.ones(len(groups)), np.zeros(len(groups))] + [rng.uniform(0, 4, len(groups)) for _ in range(4)]:
        other = copy.deepcopy(rec)
        scale_biases(other.model, dict(zip(groups, scales)))
        want = evaluate(model_ranker(other), split, "valid", progress=False)["NDCG@10"]
        assert cands.ndcg(torch.tensor(scales)) == pytest.approx(want, abs=1e-9)


def test_candidate_ndcg_of_a_subset_in_chunks_is_the_evaluators_on_those_users(monkeypatch):
    """ndcg(scales, users) in chunks of 7 users, with the subset's rows kept between calls of the same users
    and gathered afresh for other users: the evaluator's NDCG@10 of the scaled model on those users."""
    data = _data()
    split = leave_one_out(data)
    rec = _rec(data, True, True, True)
    groups = bias_groups(rec.model)
    cands = candidates(rec, split, np.arange(data.n_users), progress=False)
    monkeypatch.setattr(Candidates, "CHUNK", 7)
    perm = torch.from_numpy(np.random.default_rng(2).permutation(data.n_users))
    halves = (perm[:data.n_users // 2], perm[data.n_users // 2:])
    for scales in (np.ones(3), np.array([0.5, 3.0, 0.0]), np.array([2.0, 1.5, 4.0])):
        other = copy.deepcopy(rec)
        scale_biases(other.model, dict(zip(groups, scales)))
        for users in halves + (halves[0],):
            want = evaluate(model_ranker(other), split, "valid", users.numpy(), progress=False)["NDCG@10"]
            assert cands.ndcg(torch.tensor(scales), users) == pytest.approx(want, abs=1e-9)


def test_fit_never_loses_on_its_users_and_calibrate_applies_only_a_held_out_gain():
    data = _data(2, n_users=200)
    split = leave_one_out(data)
    rec = _rec(data, reverse=True, seed=3)
    groups = bias_groups(rec.model)
    cands = candidates(rec, split, np.arange(data.n_users), progress=False)
    half = torch.arange(100)
    scales = fit(cands, groups, half)
    assert cands.ndcg(torch.tensor([scales[g] for g in groups]), half) >= cands.ndcg(torch.ones(3), half)
    before = rec.model.transition.weight.clone()
    out = calibrate(rec, split, progress=False)
    held = out["heldout_ndcg10"]
    assert out["applied"] == (held["after"] > held["before"])
    if out["applied"]:
        torch.testing.assert_close(rec.model.transition.weight, before * out["scales"]["transition"])
    else:
        assert out["scales"] == {g: 1.0 for g in groups}
        torch.testing.assert_close(rec.model.transition.weight, before)
    got = evaluate(model_ranker(rec), split, "valid", progress=False)["NDCG@10"]
    assert got == pytest.approx(out["valid_ndcg10"]["after" if out["applied"] else "before"], abs=1e-9)


def test_calibrate_refuses_models_it_cannot_scale():
    data = _data()
    rec = _rec(data, history=False, transition=False)
    with pytest.raises(ValueError, match="neither model.history_bias nor model.transition_bias"):
        calibrate(rec, leave_one_out(data), progress=False)
    with pytest.raises(ValueError, match="unknown group 'pointer'"):
        scale_biases(_rec(data).model, {"pointer": 2.0})
    biased = _rec(data)
    ens = Recommender(Ensemble([biased.model, biased.model]).eval(), biased.tokenizer, biased.catalog)
    with pytest.raises(ValueError, match="not an ensemble"):
        calibrate(ens, leave_one_out(data), progress=False)


def test_train_calibrates_the_kept_model(tmp_path):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, history_bias=True, transition_bias=True,
                                  transition_neighbors=5, transition_reverse=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=2, eval_users=0, lr=3e-3,
                                  calibrate=True)
    data = _data(4, n_users=150)
    rec = train(data, tmp_path / "run", p, progress=False)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    cal = summary["calibration"]
    assert set(cal["scales"]) == {"history", "transition", "reverse"}
    best = load(tmp_path / "run" / "best")
    got = evaluate(model_ranker(best), leave_one_out(data), "valid", progress=False)
    assert got["NDCG@10"] == pytest.approx(cal["valid_ndcg10"]["after" if cal["applied"] else "before"], abs=1e-6)
    torch.testing.assert_close(rec.model.transition.reverse_weight, best.model.transition.reverse_weight)
    torch.testing.assert_close(rec.model.history.recency, best.model.history.recency)  # train returns what it kept
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=4,
                                      code_input="first")
    p.model = dataclasses.replace(p.model, leaf_head=True)  # a trie-search model: calibrated by decoding
    train(data, tmp_path / "codes", p, progress=False)
    cal = json.loads((tmp_path / "codes" / "train_summary.json").read_text())["calibration"]
    got = evaluate(model_ranker(load(tmp_path / "codes" / "best")), leave_one_out(data), "valid", progress=False)
    assert got["NDCG@10"] == pytest.approx(cal["valid_ndcg10"]["after" if cal["applied"] else "before"], abs=1e-6)
    p.model = dataclasses.replace(p.model, history_bias=False, transition_bias=False, transition_reverse=False)
    with pytest.raises(ValueError, match="train.calibrate: needs"):
        Trainer(data, tmp_path / "none", p, progress=False)


def test_resuming_a_calibrated_run_keeps_its_best_as_calibrated_once(tmp_path):
    """A resumed run that trains no epoch (its schedule is done) leaves best/ calibrated once: the same weights
    and factors after every resume, never factors applied again to weights they scaled already."""
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, history_bias=True, transition_bias=True,
                                  transition_neighbors=5)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=0, lr=3e-3,
                                  calibrate=True)
    data, run = _data(4, n_users=150), tmp_path / "run"
    train(data, run, p, progress=False)
    first = json.loads((run / "train_summary.json").read_text())["calibration"]
    weights = torch.load(run / "best" / "weights.pt")
    assert first["applied"] and set(first["scales"].values()) - {0.0, 1.0}  # factors that compound if re-applied
    for _ in range(2):
        train(data, run, p, progress=False, resume=True)
        again = json.loads((run / "train_summary.json").read_text())["calibration"]
        assert again["scales"] == first["scales"] and again["applied"]
        now = torch.load(run / "best" / "weights.pt")
        assert all(torch.equal(weights[k], now[k]) for k in weights)
    recorded = json.loads((run / "best" / "config.json").read_text())["info"]["calibration"]
    assert recorded["scales"] == first["scales"]
