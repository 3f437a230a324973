"""The hybrid (hybrid.py): a one-token GenRec model and SASRec ranking the union of their top items, against brute
force."""
import dataclasses
import io
import json
import sys

import numpy as np
import pytest
import torch

from genrec_fast import Hybrid, Recommender, load, preset
from genrec_fast.cascade import fit_weight
from genrec_fast.cli import main
from genrec_fast.data import Catalog, leave_one_out, synthetic
from genrec_fast.evaluate import evaluate, model_ranker
from genrec_fast.sasrec import SASRec, SASRecConfig, save as save_sasrec

N_ITEMS = 40


def _genrec(seed=0, item_ids=None, n_users=0):
    """A one-token model with the history and transition biases (offsets far from 0)."""
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=True, transition_bias=True,
                              transition_neighbors=4)
    item_ids = list(range(N_ITEMS)) if item_ids is None else item_ids
    rec = Recommender.random(item_ids, cfg, vocab_size=200, item_tokens="whole", seed=seed, n_users=n_users)
    rng = np.random.default_rng(seed)
    rec.model.transition.fit([rng.integers(0, len(item_ids), 12) for _ in range(80)])
    with torch.no_grad():
        rec.model.transition.weight.normal_(0, 2.0)
        rec.model.history.recency.normal_(0, 2.0)
    return rec


def _sasrec(seed=0, n_items=N_ITEMS):
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(n_items=n_items, d_model=16, window=8)).eval()
    with torch.no_grad():
        model.item.weight.mul_(4.0)  # spread the scores: few near ties
    return model


@pytest.fixture(scope="module")
def pair():
    g = _genrec()
    return g, _sasrec(), g.catalog


def _hists(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, N_ITEMS, int(rng.integers(1, 12))).tolist() for _ in range(n)]


@pytest.mark.parametrize("filters", [{}, {"exclude_seen": True}, {"allowed_items": range(1, 40, 2)},
                                     {"exclude_seen": True, "allowed_items": range(0, 40, 7)}])
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("n", [3, 6])
def test_hybrid_equals_brute_force(pair, weight, filters, n):
    genrec, sasrec, catalog = pair
    hists, k = _hists(20), 5  # (>= 16 users: the fused C++ head + top-k scans for both models)
    got = Hybrid(genrec, sasrec, catalog, n, weight).recommend(hists, k=k, **filters)
    full_g = genrec.recommend(hists, k=N_ITEMS)  # GenRec's log-probability of every item
    full_s = sasrec.scores(hists).numpy()  # (U, N_ITEMS) SASRec's logits
    allowed = set(filters.get("allowed_items", range(N_ITEMS)))
    for g, fg, fs, h in zip(got, full_g, full_s, hists):
        ok = [i for i in range(N_ITEMS) if i in allowed and not (filters.get("exclude_seen") and i in h)]
        log_g = dict(zip(fg.items, fg.scores))
        top_g = sorted(ok, key=lambda i: -log_g[i])[:max(n, k)]
        top_s = sorted(ok, key=lambda i: -fs[i])[:max(n, k)]
        items = top_g + [i for i in top_s if i not in top_g]
        zg, zs = np.array([log_g[i] for i in items]), np.array([fs[i] for i in items], dtype=np.float64)
        zg, zs = (z - z.max() - np.log(np.exp(z - z.max()).sum()) for z in (zg, zs))  # normalised over the union
        score = (1 - weight) * zg + weight * zs
        want = sorted(range(len(items)), key=lambda j: -score[j])[:k]
        assert set(g.items) <= set(items) and len(g.items) == min(k, len(items))
        np.testing.assert_allclose(g.scores, score[want], rtol=1e-4, atol=1e-4)
        if len(set(np.round(score, 3))) == len(score):  # no near ties: the same order
            assert g.items == [items[j] for j in want]


def test_sasrec_reads_the_window_cut_to_the_longest_history_as_the_whole(pair):
    genrec, sasrec, catalog = pair
    hybrid = Hybrid(genrec, sasrec, catalog)
    for hists in (_hists(seed=7), [[3]], [[1, 2], [5]], [list(range(20))]):  # 20 > the window (8): cut at 8
        seq = hybrid.encode_batch(hists, [None] * len(hists))["sasrec"]
        assert seq.shape[1] == min(max(len(h) for h in hists), sasrec.cfg.window)
        want = sasrec.scores(hists)  # (U, N_ITEMS) over the whole window
        h = hybrid.sasrec_head(seq)
        torch.testing.assert_close(h.x @ h.weight.T, want, rtol=1e-5, atol=1e-5)


def test_weight_zero_is_genrec_and_one_is_sasrec(pair):
    genrec, sasrec, catalog = pair
    hists = _hists(seed=3)
    for filters in ({}, {"exclude_seen": True, "allowed_items": range(1, 40, 2)}):
        alone = genrec.recommend(hists, k=6, **filters)
        got = Hybrid(genrec, sasrec, catalog, 6, 0.0).recommend(hists, k=6, **filters)
        assert [g.items for g in got] == [a.items for a in alone]
        got = Hybrid(genrec, sasrec, catalog, 6, 1.0).recommend(hists, k=6, **filters)
        ok = set(filters.get("allowed_items", range(N_ITEMS)))
        want = [sorted((i for i in ok if not (filters and i in h)), key=lambda i: -s[i])[:6]
                for h, s in zip(hists, sasrec.scores(hists).numpy())]  # SASRec's best allowed items
        assert [g.items for g in got] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_hybrid_on_the_gpu_answers_as_on_the_cpu(pair):
    """Both models on the GPU: GenRec's candidate logits in torch ops (`candidate_logits_reference`)."""
    import copy
    genrec, sasrec, catalog = pair
    g, s = copy.deepcopy(genrec), copy.deepcopy(sasrec)
    g.model.to("cuda")
    hists = _hists(seed=6)
    for filters in ({}, {"exclude_seen": True, "allowed_items": range(0, 40, 3)}):
        want = Hybrid(genrec, sasrec, catalog, 6, 0.5).recommend(hists, k=5, **filters)
        got = Hybrid(g, s, catalog, 6, 0.5).recommend(hists, k=5, **filters)
        assert [x.items for x in got] == [w.items for w in want]
        np.testing.assert_allclose([x.scores for x in got], [w.scores for w in want], rtol=1e-4, atol=1e-4)


def test_hybrid_refuses_what_it_cannot_rank(pair):
    genrec, sasrec, catalog = pair
    codes = Recommender.random(list(range(N_ITEMS)), dataclasses.replace(preset("tiny").model, item_eos=False),
                               vocab_size=200, item_tokens="codes", code_levels=2, code_branches=4)
    with pytest.raises(ValueError, match="genrec: expected a model with one token per item"):
        Hybrid(codes, sasrec, catalog)
    with pytest.raises(ValueError, match="sasrec: its catalog's item ids differ"):
        Hybrid(genrec, _sasrec(n_items=N_ITEMS + 1), catalog)
    other = Catalog(list(range(1, N_ITEMS + 1)), catalog.item_codes, catalog.user_ids)
    with pytest.raises(ValueError, match="sasrec: its catalog's item ids differ"):
        Hybrid(genrec, sasrec, other)
    with pytest.raises(ValueError, match=r"weight: expected a number in \[0, 1\]"):
        Hybrid(genrec, sasrec, catalog, 5, 1.5)
    with pytest.raises(ValueError, match="candidates: expected a positive integer"):
        Hybrid(genrec, sasrec, catalog, 0)
    with pytest.raises(ValueError, match="genrec: expected one model's Recommender"):
        Hybrid(Hybrid(genrec, sasrec, catalog), sasrec, catalog)


def test_fit_weight_scores_each_weight_as_the_evaluator_does():
    data = synthetic(n_users=120, n_items=N_ITEMS, seed=5)
    genrec = _genrec(item_ids=data.item_ids, n_users=data.n_users)
    hybrid = Hybrid(genrec, _sasrec(), Catalog.from_data(data), 10)
    split = leave_one_out(data)
    for exclude_seen in (False, True):
        out = fit_weight(hybrid, split, weights=(0.0, 0.4, 1.0), batch_size=50, exclude_seen=exclude_seen)
        assert out["exclude_seen"] is exclude_seen and out["kind"] == "hybrid" and out["candidates"] == 10
        for w in (0.0, 0.4, 1.0):
            hybrid.weight = w
            m = evaluate(model_ranker(hybrid), split, "valid", exclude_seen=exclude_seen, progress=False)
            assert out["valid_ndcg10"][str(w)] == pytest.approx(m["NDCG@10"], abs=1e-5)
        assert hybrid.weight == out["weight"] and out["valid_ndcg10"][str(out["weight"])] == max(
            out["valid_ndcg10"].values())


def test_cli_fits_saves_evaluates_and_serves_a_hybrid(p5_file, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "whole.json"
    cfg.write_text(json.dumps({"preset": "tiny", "tokenizer": {"item_tokens": "whole"}, "model": {"item_eos": False}}))
    assert main(["train", "--data", str(p5_file), "--config", str(cfg), "--pretrain-epochs", "1", "--set",
                 "train.finetune_epochs=1", "--out", str(tmp_path / "g"), "--no-report", "--quiet"]) == 0
    assert main(["train", "--model", "sasrec", "--data", str(p5_file), "--set", "sasrec.max_epochs=2", "--set",
                 "sasrec.min_steps=0", "--out", str(tmp_path / "s"), "--no-report", "--quiet"]) == 0
    out, g, s = tmp_path / "hybrid", str(tmp_path / "g" / "best"), str(tmp_path / "s" / "best")
    capsys.readouterr()
    assert main(["hybrid", g, s, "--data", str(p5_file), "--out", str(out), "--candidates", "10"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads(printed.split("\nhybrid ")[0])
    assert f"GenRec alone {fit['valid_ndcg10']['0.0']:.4f}" in printed
    saved = json.loads((out / "hybrid.json").read_text())
    assert saved["weight"] == fit["weight"] and saved["candidates"] == 10
    assert main(["evaluate", str(out), "--data", str(p5_file), "--part", "valid", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["NDCG@10"] == pytest.approx(fit["valid_ndcg10"][str(fit["weight"])], abs=1e-5)
    rec = load(out)
    assert isinstance(rec, Hybrid) and rec.fit == fit and not rec.exclude_seen
    assert main(["hybrid", g, s, "--data", str(p5_file), "--out", str(out), "--overwrite", "--exclude-seen",
                 "--users", "60"]) == 0
    fit = json.loads(capsys.readouterr().out.split("\nhybrid ")[0])
    assert fit["exclude_seen"] and fit["users"] == 60 and load(out).exclude_seen  # served without seen items
    hist = [load(out).catalog.item_ids[i] for i in (1, 3, 5)]
    assert not set(hist) & set(load(out).recommend([hist], k=10)[0].items)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 3 5\n"))
    assert main(["recommend", str(out), "-k", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 4
    with pytest.raises(ValueError, match="is a hybrid; load it alone"):
        load([out, g])
    assert main(["calibrate", str(out), "--data", str(p5_file), "--out", str(tmp_path / "x")]) == 2
    assert "is a hybrid" in capsys.readouterr().err
    assert main(["hybrid", s, g, "--data", str(p5_file), "--out", str(tmp_path / "bad")]) == 2
    assert "no sasrec.json" in capsys.readouterr().err
    from genrec_fast.serve_api import check_arguments
    check_arguments([out], 8)
    with pytest.raises(ValueError, match="is a hybrid; it is served alone"):
        check_arguments([out, g], 8)


def test_a_hybrid_json_without_its_settings_is_a_named_error(tmp_path):
    from genrec_fast.hybrid import load_hybrid
    (tmp_path / "hybrid.json").write_text('{"weight": 0.5}')
    with pytest.raises(ValueError, match=r"hybrid.json lacks \['candidates'\]; the file is damaged"):
        load_hybrid(tmp_path)


def test_save_and_load_round_trip(pair, tmp_path):
    from genrec_fast import checkpoint
    genrec, sasrec, catalog = pair
    checkpoint.save(tmp_path / "g", genrec.model, genrec.tokenizer, catalog)
    save_sasrec(tmp_path / "s", sasrec, synthetic(n_users=3, n_items=N_ITEMS))
    (tmp_path / "s" / "catalog.json").write_text(json.dumps(catalog.to_dict()))  # the GenRec model's ids
    hybrid = Hybrid(genrec, sasrec, catalog, 7, 0.4)
    hybrid.save(tmp_path / "h", tmp_path / "g", tmp_path / "s")
    again = load(tmp_path / "h")
    assert (again.candidates, again.weight) == (7, 0.4)
    hists = _hists(seed=4)
    want, got = hybrid.recommend(hists, k=5), again.recommend(hists, k=5)
    assert [g.items for g in got] == [w.items for w in want]
    np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-5)
