"""The history bias over collaborative codes with the leaf head (history_bias.code_offsets): at every code
step a history item's offset lands on its token in the rows that share its tokens so far; the transition bias's
successor items (transition_bias.py) the same way, with weights of their own at the cluster steps. Decoding is exact
against brute-force teacher forcing of the biased logits (every catalog item scored), the fused loss equals
the cross-entropy of those logits (training, saving and reloading: test_history_bias.py)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from repeat_data import repeat_data

from genrec_fast import Recommender, preset
from genrec_fast.batching import pad_encoder, pad_targets
from genrec_fast.ensemble import Ensemble
from genrec_fast.history_bias import add_offsets, code_offsets
from genrec_fast.model import GenRec
from genrec_fast.train import Trainer

ITEMS = [f"item{i}" for i in range(70)]


def _rec(levels=1, seed=0, history=True, transition=False, reverse=False):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, leaf_head=True, history_bias=history,
                              transition_bias=transition, transition_neighbors=6, transition_reverse=reverse)
    rec = Recommender.random(ITEMS, cfg, vocab_size=200, item_tokens="codes", code_levels=levels,
                             code_branches=4, code_input="first", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-size item vectors and a bias far from 0
        rec.model.item_embed.weight[1:].normal_(0, 1.0)
        if history:
            rec.model.history.recency.normal_(0, 2.0)
            rec.model.history.query.weight.normal_(0, 1.0)
        if transition:
            rng = np.random.default_rng(seed)
            rec.model.transition.fit([rng.integers(0, 70, 15) for _ in range(120)])
            rec.model.transition.weight.normal_(0, 2.0)
            rec.model.transition.cluster_weight.normal_(0, 2.0)  # differs from the leaf step's
            if reverse:
                rec.model.transition.reverse_weight.normal_(0, 2.0)
                rec.model.transition.reverse_cluster_weight.normal_(0, 2.0)
    return rec


def _biased_logits(m, enc, dec_in) -> torch.Tensor:
    """The definition, by loops: teacher-forced logits (n, L, V) of targets dec_in (n, L), each step t plus,
    for every history position j whose item's first t tokens are the target's, the bias of step t's state
    at j on that item's t-th token."""
    n = dec_in.shape[0]
    memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"]).expand(n, -1, -1)
    mask = enc["mask"].expand(n, -1)
    hidden = m.decode_hidden(dec_in, memory, mask)  # (n, L, C)
    logits = m.logits(hidden, dec_in).clone()  # (n, L, V)
    item_ids = enc["item_ids"].expand(n, -1)
    codes = m.leaves.codes
    pairs = []  # (item id, its offset at each step (n, L))
    if m.history is not None:
        values = m.history.score(hidden, m.history.state(memory, item_ids, mask))  # (n, L, S)
        pairs += [(int(item_ids[0, j]), values[:, :, j]) for j in range(item_ids.shape[1])
                  if item_ids[0, j] > 0 and mask[0, j]]
    if m.transition is not None:  # each context item's successors, a[r] log1p(N), a of the cluster or leaf step
        t = m.transition  # (and with reverse its predecessors, weighed by the reverse vectors)
        ctx = [int(x) for x in enc["item_ids"][0][enc["item_ids"][0] > 0].flip(0)[:t.context] - 1]
        last = m.leaves.levels - 1
        for r, a in enumerate(ctx):
            for col, (j, c) in enumerate(zip(t.items[a].tolist(), t.counts[a].tolist())):
                if j >= 0:
                    cw, lw = ((t.cluster_weight, t.weight) if col < t.neighbors
                              else (t.reverse_cluster_weight, t.reverse_weight))
                    w = torch.stack([cw[r]] * last + [lw[r]])  # (L,)
                    pairs.append((j + 1, (w * np.log1p(c)).expand(n, -1)))
    for b in range(n):
        target = dec_in[b, 1:].tolist()  # the target's tokens before the last
        for item, value in pairs:
            code = codes[item].tolist()
            for t in range(m.leaves.levels):
                if code[:t] == target[:t]:
                    logits[b, t, code[t]] = logits[b, t, code[t]] + value[b, t]
    return logits


def _brute(rec, items) -> np.ndarray:
    """log P(item | history) for every catalog item under the biased logits."""
    m = rec.model
    enc = pad_encoder([rec.encode(items, None)])
    dec_in, labels = pad_targets([rec.tokenizer.target(i, False) for i in range(len(ITEMS))], m.cfg.bos_id)
    with torch.no_grad():
        logp = F.log_softmax(_biased_logits(m, enc, dec_in), -1)  # (n, L, V)
    return logp.gather(2, labels[..., None])[..., 0].sum(1).numpy()


def test_code_offsets_match_prefixes():
    values = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # (1, 2 rows, 3 positions)
    codes = torch.tensor([[[10, 20], [11, 21], [-1, -1]]])  # (1, 3, L=2): two history items and a non-item
    tok, val = code_offsets(values, codes, torch.zeros(1, 2, 0, dtype=torch.long))  # step 0: every item
    assert tok.tolist() == [[[10, 11, 0]]] and val.tolist() == [[[1, 2, 0], [4, 5, 0]]]  # tokens: one row a user
    tok, val = code_offsets(values, codes, torch.tensor([[[10], [12]]]))  # step 1: rows fed 10 and 12
    assert tok.tolist() == [[[20, 21, 0]]] and val.tolist() == [[[1, 0, 0], [0, 0, 0]]]


@settings(max_examples=50, deadline=None)
@given(U=st.integers(1, 3), W=st.integers(1, 4), S=st.integers(1, 6), X=st.integers(1, 8),
       first=st.none() | st.integers(0, 3), seed=st.integers(0, 99))
def test_per_user_offsets_equal_the_row_by_row_ones(U, W, S, X, first, seed):
    """add_offsets' per-user form (tokens (U, 1, S) shared by a user's W rows) adds what the same tokens copied to
    every row do, repeats summed, leaf columns (first) clamped."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(U * W, X, generator=g)
    tokens = torch.randint(0, X + (first or 0), (U, 1, S), generator=g)
    values = torch.randn(U, W, S, generator=g)
    got = add_offsets(z, (tokens, values), first)
    rows = tokens.expand(U, W, S).reshape(U * W, S)
    cols = rows if first is None else (rows - first).clamp(0, X - 1)
    want = z.clone()
    for r in range(U * W):
        for j in range(S):
            want[r, cols[r, j]] += values.reshape(U * W, S)[r, j]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(add_offsets(z, (rows, values.reshape(U * W, S)), first), want)
    r = torch.arange(U * W)[:, None].expand(U * W, S)  # the same pairs as K entries
    torch.testing.assert_close(add_offsets(z, (r.reshape(-1), rows.reshape(-1), values.reshape(-1)), first), want)


@pytest.mark.parametrize("levels, history, transition, reverse", [
    (1, True, False, False), (2, True, False, False), (1, True, True, False), (2, False, True, False),
    (1, True, True, True)])
def test_beam_search_with_history_bias_over_codes_is_exact(levels, history, transition, reverse):
    rec = _rec(levels=levels, history=history, transition=transition, reverse=reverse)
    assert rec.model.leaves.levels == levels + 1
    for history in ([3, 40, 3, 17], [5], [69, 0, 1, 2, 3, 4, 5, 6]):
        brute = _brute(rec, history)
        got, scores = rec.decode_batch([rec.encode(history, None)], k=70, num_beams=70)
        want = np.argsort(-brute, kind="stable")
        np.testing.assert_array_equal(got[0], want)
        np.testing.assert_allclose(scores[0], brute[want], atol=1e-4)
    plain = dataclasses.replace(rec.model.cfg, history_bias=False, transition_bias=False, transition_reverse=False)
    other = Recommender(type(rec.model)(plain).attach_leaves(rec.tokenizer).eval(), rec.tokenizer, rec.catalog)
    other.model.load_state_dict(rec.model.state_dict(), strict=False)
    got_plain, _ = other.decode_batch([other.encode([3, 40, 3, 17], None)], k=70, num_beams=70)
    assert not np.array_equal(got_plain[0], np.argsort(-_brute(rec, [3, 40, 3, 17]), kind="stable"))


@pytest.mark.parametrize("levels, transition", [(1, False), (1, True), (2, True)])
def test_matched_offsets_equal_the_per_user_form(levels, transition, monkeypatch):
    """On a CPU the code steps after the first add only the matching (row, token, value) pairs
    (`GenRec._matched_offsets`); GPUs keep the per-user form (`_user_offsets`: no host sync). Both give the same
    items and scores."""
    rec = _rec(levels=levels, transition=transition, reverse=transition)
    rng = np.random.default_rng(5)
    hists = [[ITEMS[j] for j in rng.integers(0, 70, int(rng.integers(1, 9)))] for _ in range(9)]
    matched = rec.recommend(hists, k=10)
    monkeypatch.setattr(GenRec, "_matched_offsets", GenRec._user_offsets)
    per_user = rec.recommend(hists, k=10)
    assert [r.items for r in matched] == [r.items for r in per_user]
    np.testing.assert_allclose([r.scores for r in matched], [r.scores for r in per_user], atol=1e-5)


@pytest.mark.parametrize("transition", [False, True])
def test_batched_search_with_filters_matches_one_user_at_a_time(transition):
    """Users of different history lengths in one batch (rows regrouped as beams and users end), the
    filters pruning subtrees: the same items and scores as each user alone, on every search backend."""
    rec = _rec(levels=1, transition=transition)
    rng = np.random.default_rng(3)
    hists = [[ITEMS[j] for j in rng.integers(0, 70, int(rng.integers(1, 9)))] for _ in range(7)]
    together = rec.recommend(hists, k=10, exclude_seen=True)
    for backend in ("reference", "device"):  # the Python search, and the search as tensors (device_search.py)
        other = rec.recommend(hists, k=10, exclude_seen=True, backend=backend)
        assert [r.items for r in other] == [r.items for r in together]
        np.testing.assert_allclose([r.scores for r in other], [r.scores for r in together], atol=1e-5)
    for h, r in zip(hists, together):
        alone = rec.recommend([h], k=10, exclude_seen=True)[0]
        assert r.items == alone.items and not set(r.items) & set(h)
        np.testing.assert_allclose(r.scores, alone.scores, atol=1e-5)
    allowed = ITEMS[:12]
    for r in rec.recommend(hists, k=5, allowed_items=allowed):
        assert set(r.items) <= set(allowed)


@pytest.mark.parametrize("smoothing, leaf_smoothing, transition, reverse", [
    (0.0, None, False, False), (0.3, None, False, False), (0.3, 0.1, False, False), (0.3, 0.1, True, False),
    (0.3, 0.1, True, True)])
def test_codes_history_loss_is_the_cross_entropy_of_the_biased_logits(smoothing, leaf_smoothing, transition,
                                                                      reverse):
    rec = _rec(levels=1, transition=transition, reverse=reverse)
    m = rec.model.eval()  # no dropout: the two computations see the same states
    history, targets = [3, 40, 3, 17, 8], [0, 9, 33, 69]
    enc = pad_encoder([rec.encode(history, None)])
    dec_in, labels = pad_targets([rec.tokenizer.target(i, False) for i in targets], m.cfg.bos_id)  # (4, 2)
    n = len(targets)
    batch = {k: v.expand(n, *v.shape[1:]) for k, v in enc.items()}
    ctx = None
    if transition:
        from genrec_fast.transition_bias import context_items
        ctx = (context_items(batch["item_ids"], batch["mask"], m.transition.context), None)
    got = m.codes_history_loss(**batch, decoder_tokens=dec_in, labels=labels, smoothing=smoothing,
                               ignore_index=-100, leaf_smoothing=leaf_smoothing, transition=ctx)
    logits = _biased_logits(m, enc, dec_in)  # (4, 2, V)
    terms = []
    for b in range(n):
        for t in range(2):
            z = logits[b, t]
            valid = torch.isfinite(z)
            logp = F.log_softmax(z, -1)
            s = leaf_smoothing if t == 1 and leaf_smoothing is not None else smoothing
            terms.append((1 - s) * -logp[labels[b, t]] - s * logp[valid].mean())
    want = torch.stack(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [m.history.query.weight, m.history.recency, m.item_embed.weight, m.shared.weight]
    params += [m.transition.weight, m.transition.cluster_weight] if transition else []
    params += [m.transition.reverse_weight, m.transition.reverse_cluster_weight] if reverse else []
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_codes_history_bias_refusals(tmp_path):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, leaf_head=True, history_bias=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=4)
    with pytest.raises(ValueError, match="code_input='first'"):  # code_input "all": one position per piece
        Trainer(repeat_data(np.random.default_rng(0)), tmp_path / "all", p, progress=False)
    rec = _rec()
    enc = rec.encode_batch([np.array([1, 2])], [None])
    with pytest.raises(ValueError, match="needs the item_ids"):
        memory = rec.model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        rec.model.start_decoding(memory, enc["mask"])


@pytest.mark.parametrize("transition", [False, True])
def test_codes_history_bias_in_an_ensemble_reaches_every_member(transition):
    """An ensemble of a model with itself scores as the model (each member's cache carries the bias)."""
    rec = _rec(transition=transition)
    ens = Recommender(Ensemble([rec.model, rec.model]).eval(), rec.tokenizer, rec.catalog)
    history = [3, 40, 3, 17]
    got, scores = ens.decode_batch([ens.encode(history, None)], k=70, num_beams=70)
    want = np.argsort(-_brute(rec, history), kind="stable")
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_allclose(scores[0], _brute(rec, history)[want], atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("transition", [False, True])
def test_cuda_device_search_with_codes_history_bias_equals_the_host(transition):
    rec = _rec(levels=1, transition=transition)
    rng = np.random.default_rng(5)
    hists = [[ITEMS[j] for j in rng.integers(0, 70, int(rng.integers(1, 9)))] for _ in range(9)]
    host = rec.recommend(hists, k=10, exclude_seen=True)
    rec.model.to("cuda")
    for backend in ("auto", "device"):
        gpu = rec.recommend(hists, k=10, exclude_seen=True, backend=backend)
        assert [r.items for r in gpu] == [r.items for r in host]
        np.testing.assert_allclose([r.scores for r in gpu], [r.scores for r in host], atol=1e-4)


def test_codes_checkpoint_without_cluster_weight_loads_with_one_weight_for_every_step():
    """Codes checkpoints from before `cluster_weight` used the transition weight at every code step."""
    rec = _rec(transition=True)
    state = {k: v for k, v in rec.model.state_dict().items() if k != "transition.cluster_weight"}
    other = _rec(seed=1, transition=True).model
    other.load_state_dict(state)
    torch.testing.assert_close(other.transition.cluster_weight, rec.model.transition.weight)
    assert "cluster_weight" not in dict(_rec(history=True).model.named_parameters())  # no transition bias
