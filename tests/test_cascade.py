"""The cascade (cascade.py): a codes retriever's candidates reranked by a one-token ranker, against brute force."""
import dataclasses
import io
import json
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from genrec_fast import Recommender, checkpoint, load, preset
from genrec_fast.cascade import Cascade, append_new_items, append_new_items_reference, combine, fit_weight
from genrec_fast.cli import main
from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.evaluate import evaluate, model_ranker
from genrec_fast.item_topk import Head, _check_offsets, candidate_logits, candidate_logits_reference

N_ITEMS = 40


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), U=st.integers(1, 40), n=st.integers(1, 30), first=st.integers(0, 5),
       N=st.integers(1, 12), P=st.integers(0, 15), members=st.integers(1, 3), bias=st.booleans(),
       C=st.sampled_from([1, 6, 17, 64]), path=st.sampled_from(["auto", "reference"]))
def test_candidate_logits_are_the_full_logits_at_the_candidates(seed, U, n, first, N, P, members, bias, C, path):
    """Both paths (on a CPU `auto` is the C++ core's) against the definition: full logits, offsets added by a
    loop, read at the candidates."""
    rng = np.random.default_rng(seed)
    V = first + n + 2
    heads = [Head(*(torch.from_numpy(rng.standard_normal(s)).float() for s in ((U, C), (V, C))),
                  torch.from_numpy(rng.standard_normal(V)).float() if bias else None) for _ in range(members)]
    cand = rng.integers(-1, n, (U, N))  # -1: no candidate
    hist = torch.from_numpy(rng.integers(-1, n, (U, P)))  # repeats and -1 included
    if seed % 5 == 0:
        hist[:] = -1  # no pair at all
    offsets = [torch.from_numpy(rng.standard_normal((U, P))).float() for _ in range(members)]
    history = (hist, offsets) if P else None
    if path == "auto":
        got = candidate_logits(heads, first, cand, history).numpy()
    else:
        checked = None if history is None else _check_offsets(*history, U, members)
        got = candidate_logits_reference(heads, first, torch.from_numpy(cand), checked).numpy()
    want = np.zeros((U, N))
    for m, h in enumerate(heads):
        z = (h.x.double() @ h.weight.double().T + (0 if h.bias is None else h.bias.double())).numpy()
        for u in range(U):
            for p in range(P):
                if hist[u, p] >= 0:
                    z[u, first + hist[u, p]] += offsets[m][u, p].item()
        want += np.take_along_axis(z, first + np.maximum(cand, 0), 1) / members
    want[cand < 0] = -np.inf
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_candidate_logits_native_equals_reference_at_scale():
    """The C++ path against the torch one at a cascade's shape (many users over the thread split, ~340
    candidates, ~320 pairs with repeats), to float rounding."""
    rng = np.random.default_rng(3)
    U, V, C, N, P, first = 300, 5000, 64, 340, 320, 4
    heads = [Head(torch.randn(U, C), torch.randn(V, C), torch.randn(V))]
    cand = rng.integers(-1, V - first, (U, N))
    hist = torch.from_numpy(rng.integers(-1, 400, (U, P)))  # few distinct items: many repeats
    cand[:, :100] = hist[:, :100].numpy()  # candidates that are pairs
    off = [torch.randn(U, P)]
    got = candidate_logits(heads, first, cand, (hist, off))
    want = candidate_logits_reference(heads, first, torch.from_numpy(cand), _check_offsets(hist, off, U, 1))
    assert torch.equal(got.isinf(), want.isinf()) and int(got.isinf().sum()) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), U=st.integers(0, 70), N=st.integers(0, 12), P=st.integers(0, 20),
       n=st.integers(1, 30))
def test_append_new_items_equals_its_reference(seed, U, N, P, n):
    """The C++ join against the numpy definition: retrieved items first, then the extra items neither retrieved
    nor repeated, at their own positions (-1 holes)."""
    rng = np.random.default_rng(seed)
    cand = np.full((U, N), -1, dtype=np.int64)  # distinct per row, -1 = none
    for u in range(U):
        cand[u] = np.where(rng.random(N) < 0.2, -1, rng.permutation(max(n, N))[:N])
    extra = rng.integers(-1, n, (U, P))
    got = append_new_items(cand, extra)
    np.testing.assert_array_equal(got, append_new_items_reference(cand, extra))
    for u in range(U):  # the definition, by a loop
        seen, want = set(cand[u][cand[u] >= 0].tolist()), []
        for x in extra[u].tolist():
            want.append(x if x >= 0 and x not in seen else -1)
            seen.add(x)
        assert got[u, N:].tolist() == want


def test_candidate_logits_reject_bad_items():
    heads = [Head(torch.randn(2, 4), torch.randn(10, 4), None)]
    with pytest.raises(ValueError, match="items: index 8 beyond"):
        candidate_logits(heads, 2, np.array([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match=r"expected \(U=2, N\)"):
        candidate_logits(heads, 2, np.array([0, 1]))
    with pytest.raises(ValueError, match="pair item 9 at 1 is outside"):  # the C++ core's check
        candidate_logits(heads, 2, np.array([[0, 1], [1, 2]]), (torch.tensor([[0, 9], [1, 1]]),
                                                               [torch.zeros(2, 2)]))


def _ranker(seed=0):
    """A one-token model with the history and transition biases (offsets far from 0)."""
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=True, transition_bias=True,
                              transition_neighbors=4, transition_reverse=True)
    rec = Recommender.random(list(range(N_ITEMS)), cfg, vocab_size=200, item_tokens="whole", seed=seed)
    rng = np.random.default_rng(seed)
    rec.model.transition.fit([rng.integers(0, N_ITEMS, 12) for _ in range(80)])
    with torch.no_grad():
        rec.model.transition.weight.normal_(0, 2.0)
        rec.model.transition.reverse_weight.normal_(0, 2.0)
        rec.model.history.recency.normal_(0, 2.0)
    return rec


def test_a_cascade_keeps_one_copy_of_equal_transition_tables(pair):
    """Two models whose neighbour tables were fit on the same sequences share one copy; the answers stay."""
    retriever, _ = pair
    a, b = _ranker(0), _ranker(0)  # the same sequences: equal tables
    hists = _hists()
    want = [(r.items, r.scores) for r in Cascade(retriever, b).recommend(hists, k=5)]
    assert a.model.transition.items is not b.model.transition.items
    cascade = Cascade(a, b)  # a one-token retriever: any model proposes
    ta, tb = a.model.transition, b.model.transition
    assert tb.items is ta.items and tb.counts is ta.counts
    assert [(r.items, r.scores) for r in Cascade(retriever, b).recommend(hists, k=5)] == want
    assert cascade.ranker is b
    c = _ranker(1)  # other sequences: nothing shared
    Cascade(a, c)
    assert c.model.transition.items is not a.model.transition.items


def _retriever(seed=1):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    return Recommender.random(list(range(N_ITEMS)), cfg, vocab_size=200, item_tokens="codes", code_levels=2,
                              code_branches=4, code_input="first", seed=seed)


@pytest.fixture(scope="module")
def pair():
    return _retriever(), _ranker()


def _hists(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, N_ITEMS, int(rng.integers(1, 9))).tolist() for _ in range(n)]


def _bias_items(ranker, hists):
    """Each history's items that the ranker's biases name: its own items and their transition neighbours."""
    t = ranker.model.transition
    out = []
    for h in hists:
        named = set(h)
        for a in h[-t.context:]:
            named |= {int(j) for j in t.items[a].tolist() if j >= 0}
        out.append(named)
    return out


@pytest.mark.parametrize("filters", [{}, {"exclude_seen": True}, {"allowed_items": range(1, 40, 2)},
                                     {"exclude_seen": True, "allowed_items": range(0, 40, 3)}])
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("bias_items", [False, True])
def test_cascade_equals_brute_force(pair, weight, filters, bias_items):
    retriever, ranker = pair
    hists, N, k = _hists(), 6, 5
    got = Cascade(retriever, ranker, N, weight, bias_items=bias_items).recommend(hists, k=k, **filters)
    cands = retriever.recommend(hists, k=N, num_beams=20, **filters)  # the candidates: the retriever's top N (20 beams)
    full = ranker.recommend(hists, k=N_ITEMS)  # the ranker's log-probability of every item
    allowed = set(filters.get("allowed_items", range(N_ITEMS)))
    for g, c, f, h, named in zip(got, cands, full, hists, _bias_items(ranker, hists)):
        items, log_r = list(c.items), list(c.scores)
        if bias_items:  # the allowed named items the retriever did not return, at its lowest score
            extra = sorted(i for i in named - set(items) if i in allowed
                           and not (filters.get("exclude_seen") and i in h))
            items, log_r = items + extra, log_r + [min(c.scores)] * len(extra)
        log_o = dict(zip(f.items, f.scores))
        z = np.array([log_o[i] for i in items])
        z -= np.log(np.exp(z - z.max()).sum()) + z.max()  # log P_ranker(item | candidates)
        score = (1 - weight) * np.array(log_r) + weight * z
        want = sorted(range(len(items)), key=lambda j: -score[j])[:k]  # ties: retrieved first, then by item
        assert set(g.items) <= set(items) and len(g.items) == min(k, len(items))
        np.testing.assert_allclose(g.scores, score[want], rtol=1e-5, atol=1e-5)
        if len(set(np.round(score, 4))) == len(score):  # no near ties: the same order
            assert g.items == [items[j] for j in want]


def test_the_device_search_gives_the_cascade_the_same_answers(pair):
    """backend="device" (the retriever's trie search as tensors, the GPU path) = the C++ search, on the CPU."""
    cascade, hists = Cascade(*pair, 6, 0.5), _hists(seed=5)
    for filters in ({}, {"exclude_seen": True, "allowed_items": range(0, 40, 3)}):
        want = cascade.recommend(hists, k=5, **filters)
        got = cascade.recommend(hists, k=5, backend="device", **filters)
        assert [g.items for g in got] == [w.items for w in want]
        np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["auto", "device"])
def test_a_cascade_on_the_gpu_answers_as_on_the_cpu(pair, backend):
    """Both models on the GPU: the ranker's candidate logits in torch ops (`candidate_logits_reference`)."""
    import copy
    retriever, ranker = (copy.deepcopy(r) for r in pair)
    for r in (retriever, ranker):
        r.model.to("cuda")
    hists = _hists(seed=6)
    want = Cascade(*pair, 6, 0.5).recommend(hists, k=5, exclude_seen=True)
    got = Cascade(retriever, ranker, 6, 0.5).recommend(hists, k=5, exclude_seen=True, backend=backend)
    assert [g.items for g in got] == [w.items for w in want]
    np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-4, atol=1e-4)


def test_weight_zero_is_the_retriever_and_one_with_every_item_the_ranker(pair):
    retriever, ranker = pair
    hists = _hists(seed=3)
    for filters in ({}, {"exclude_seen": True, "allowed_items": range(1, 40, 2)}):
        alone = retriever.recommend(hists, k=6, **filters)
        assert Cascade(retriever, ranker, 6, 0.0).recommend(hists, k=6, **filters) == alone
        want = ranker.recommend(hists, k=7, **filters)
        got = Cascade(retriever, ranker, N_ITEMS, 1.0).recommend(hists, k=7, num_beams=N_ITEMS, **filters)
        assert [g.items for g in got] == [w.items for w in want]
        for g, w in zip(got, want):  # the same log-probabilities up to each user's normaliser
            d = np.array(g.scores) - np.array(w.scores)
            np.testing.assert_allclose(d, d[0], atol=1e-4)


def test_cascade_refuses_what_it_cannot_rank(pair):
    retriever, ranker = pair
    with pytest.raises(ValueError, match="ranker: expected a model with one token per item"):
        Cascade(ranker, retriever)
    other = Recommender.random(list(range(1, N_ITEMS + 1)), dataclasses.replace(preset("tiny").model, item_eos=False),
                               vocab_size=200, item_tokens="whole")
    with pytest.raises(ValueError, match="item ids differ"):
        Cascade(retriever, other)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="candidates"):
            Cascade(retriever, ranker, bad)
    with pytest.raises(ValueError, match="weight"):
        Cascade(retriever, ranker, 5, 1.5)
    assert Cascade(retriever, ranker, 8, beams=3).beams == 8  # the width searched: never under the candidates


def test_cli_refuses_fewer_beams_than_candidates(capsys):
    assert main(["cascade", "never", "read", "--out", "x", "--candidates", "20", "--beams", "2"]) == 2
    assert "--beams 2, --candidates 20: expected --beams >= --candidates" in capsys.readouterr().err


def test_combine_puts_missing_candidates_last():
    cand = np.array([[3, -1, 5, 7]])
    items, scores = combine(cand, np.array([[-1.0, -np.inf, -2.0, -3.0]]), np.array([[-3.0, -np.inf, -1.0, -2.0]]),
                            0.5, 4)
    assert items.tolist() == [[5, 3, 7, -1]] and scores[0, 3] == -np.inf


def test_fit_weight_scores_each_weight_as_the_evaluator_does():
    data = synthetic(n_users=120, n_items=N_ITEMS, seed=5)
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=True)
    ranker = Recommender.random(data.item_ids, cfg, vocab_size=200, n_users=data.n_users, item_tokens="whole")
    retriever = Recommender.random(data.item_ids, dataclasses.replace(preset("tiny").model, item_eos=False),
                                   vocab_size=200, n_users=data.n_users, item_tokens="codes", code_levels=2,
                                   code_branches=4, code_input="first", seed=2)
    with torch.no_grad():
        ranker.model.history.recency.normal_(0, 2.0)
    split = leave_one_out(data)
    cascade = Cascade(retriever, ranker, 25)
    out = fit_weight(cascade, split, weights=(0.0, 0.4, 1.0), batch_size=50)
    for w in (0.0, 0.4, 1.0):
        cascade.weight = w
        m = evaluate(model_ranker(cascade), split, "valid", progress=False)
        assert out["valid_ndcg10"][str(w)] == pytest.approx(m["NDCG@10"], abs=1e-5)
    assert out["valid_ndcg10"][str(out["weight"])] == max(out["valid_ndcg10"].values())
    assert 0 <= out["held_out_ndcg10"] <= max(out["valid_ndcg10"].values()) + 1e-9


def test_save_and_load_round_trip(pair, tmp_path):
    retriever, ranker = pair
    for name, rec in (("r", retriever), ("o", ranker)):
        checkpoint.save(tmp_path / name, rec.model, rec.tokenizer, rec.catalog)
    cascade = Cascade(retriever, ranker, 8, 0.6)
    cascade.fit = {"weight": 0.6}
    cascade.save(tmp_path / "cascade", tmp_path / "r", tmp_path / "o")
    again = load(tmp_path / "cascade")
    assert isinstance(again, Cascade) and (again.candidates, again.weight, again.fit) == (8, 0.6, {"weight": 0.6})
    with pytest.raises(ValueError, match="is a cascade; load it alone"):
        load([tmp_path / "cascade", tmp_path / "o"])
    hists = _hists(seed=4)
    want, got = cascade.recommend(hists, k=5), again.recommend(hists, k=5)
    assert [g.items for g in got] == [w.items for w in want]
    np.testing.assert_allclose([g.scores for g in got], [w.scores for w in want], rtol=1e-5)


def test_cli_fits_saves_evaluates_and_serves_a_cascade(p5_file, tmp_path, capsys, monkeypatch):
    forms = {"codes": {"item_tokens": "codes", "code_levels": 1, "code_branches": 4, "code_input": "first"},
             "whole": {"item_tokens": "whole"}}
    for name, tok in forms.items():
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({"preset": "tiny", "tokenizer": tok, "model": {"item_eos": False}}))
        assert main(["train", "--data", str(p5_file), "--config", str(cfg), "--pretrain-epochs", "1", "--set",
                     "train.finetune_epochs=1", "--out", str(tmp_path / name), "--no-report", "--quiet"]) == 0
    out = tmp_path / "cascade"
    capsys.readouterr()
    assert main(["cascade", str(tmp_path / "codes" / "best"), str(tmp_path / "whole" / "best"), "--data",
                 str(p5_file), "--out", str(out)]) == 0
    fit = json.loads(capsys.readouterr().out.split("\ncascade ")[0])
    assert json.loads((out / "cascade.json").read_text())["weight"] == fit["weight"]
    assert main(["evaluate", str(out), "--data", str(p5_file), "--part", "valid", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["NDCG@10"] == pytest.approx(fit["valid_ndcg10"][str(fit["weight"])], abs=1e-5)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 3 5\n"))
    assert main(["recommend", str(out), "-k", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 4
    (out / "stale.txt").write_text("of an older cascade")
    again = ["cascade", str(tmp_path / "codes" / "best"), str(tmp_path / "whole" / "best"), "--data", str(p5_file),
             "--out", str(out), "--weight", "0.3"]
    assert main(again) == 2
    assert "not empty; --overwrite replaces it" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0  # replaced whole
    assert json.loads((out / "cascade.json").read_text())["weight"] == 0.3 and not (out / "stale.txt").exists()
    assert main(["calibrate", str(out), "--data", str(p5_file), "--out", str(tmp_path / "x")]) == 2
    assert "is a cascade" in capsys.readouterr().err
    assert main(["cascade", str(tmp_path / "whole" / "best"), str(tmp_path / "codes" / "best"), "--data",
                 str(p5_file), "--out", str(tmp_path / "bad")]) == 2
    assert "ranker: expected a model with one token per item" in capsys.readouterr().err


def test_an_ensemble_ranks_as_it_would_alone(pair):
    from genrec_fast.ensemble import Ensemble
    retriever, ranker = pair
    other = _ranker(seed=1)
    ens = Recommender(Ensemble([ranker.model, other.model]).eval(), ranker.tokenizer, ranker.catalog)
    hists = _hists(seed=5)
    got = Cascade(retriever, ens, N_ITEMS, 1.0).recommend(hists, k=6, num_beams=N_ITEMS, exclude_seen=True)
    assert [g.items for g in got] == [w.items for w in ens.recommend(hists, k=6, exclude_seen=True)]


def test_a_cascade_json_without_its_settings_is_a_named_error(tmp_path):
    from genrec_fast.cascade import load_cascade
    (tmp_path / "cascade.json").write_text('{"weight": 0.5}')
    with pytest.raises(ValueError, match=r"cascade.json lacks \['candidates'\]; the file is damaged"):
        load_cascade(tmp_path)
