"""The leaf head (model.leaf_head): codes whose last token is scored with the item's own ID embedding over
its leaf's items. Decoding is exact against brute-force teacher forcing on every backend, the fused loss
equals the cross-entropy of the teacher-forced logits, and training, saving and loading keep it."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from brute_force import assert_beam_search_is_exhaustive, exhaustive_scores

from genrec_fast import Recommender, SequenceData, load, preset
from genrec_fast.batching import pad_encoder, pad_targets
from genrec_fast.train import Trainer

ITEMS = [f"item{i}" for i in range(70)]  # 70 items in 4 x 4 leaves: leaves of 4 or 5 items


def _rec(leaf_head=True, levels=2, seed=0):
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, leaf_head=leaf_head)
    rec = Recommender.random(ITEMS, cfg, vocab_size=200, item_tokens="codes", code_levels=levels,
                             code_branches=4, code_input="first", seed=seed)
    with torch.no_grad():  # item vectors as large as trained ones, so the leaf softmax is far from uniform
        rec.model.item_embed.weight[1:].normal_(0, 1.0)
    return rec


@pytest.mark.parametrize("levels", [1, 2])
def test_leaf_head_search_is_exact_on_every_backend(levels):
    rec = _rec(levels=levels)
    assert rec.model.leaves is not None and rec.model.leaves.levels == levels + 1
    assert_beam_search_is_exhaustive(rec, [3, 40, 3, 17], None, k=70)
    rng = np.random.default_rng(1)
    hists = [[ITEMS[j] for j in rng.integers(0, 70, int(rng.integers(1, 9)))] for _ in range(6)]
    outs = {b: rec.recommend(hists, k=10, backend=b, exclude_seen=True) for b in ("cpp", "reference", "device")}
    for b in ("reference", "device"):
        assert [r.items for r in outs[b]] == [r.items for r in outs["cpp"]]
        np.testing.assert_allclose([r.scores for r in outs[b]], [r.scores for r in outs["cpp"]], atol=1e-4)
    for r, h in zip(outs["cpp"], hists):
        assert not set(r.items) & set(h) and len(set(r.items)) == 10


def test_leaf_head_scores_the_last_token_by_the_item_within_its_leaf():
    """Given its cluster tokens, an item's last-step probability is the softmax of h . e_item over its leaf's
    items: the probabilities of a leaf's items sum to the leaf's probability, and the same weights without
    the leaf head score differently."""
    rec = _rec()
    brute = exhaustive_scores(rec, [5, 6, 7], None)  # (70,) log P(item)
    table = rec.tokenizer.code_table
    leaf_of = [tuple(r) for r in table[:, :-1].tolist()]
    for leaf in set(leaf_of):
        members = [i for i, key in enumerate(leaf_of) if key == leaf]
        head_logp = _cluster_logp(rec, [5, 6, 7], members[0])  # log P(cluster tokens of this leaf)
        np.testing.assert_allclose(np.logaddexp.reduce(brute[members]), head_logp, atol=1e-5)
    plain = dataclasses.replace(rec.model.cfg, leaf_head=False)
    other = Recommender(type(rec.model)(plain).eval(), rec.tokenizer, rec.catalog)
    other.model.load_state_dict(rec.model.state_dict())
    assert not np.allclose(exhaustive_scores(other, [5, 6, 7], None), brute, atol=1e-3)


def _cluster_logp(rec, items, item) -> float:
    """log P of `item`'s cluster tokens alone (teacher forcing through the LM head)."""
    m = rec.model
    enc = pad_encoder([rec.encode(items, None)])
    dec_in, labels = pad_targets([rec.tokenizer.target(item, False)], m.cfg.bos_id)
    with torch.no_grad():
        memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        logp = F.log_softmax(m.decode(dec_in, memory, enc["mask"]), -1)[0]  # (L, V)
    last = m.leaves.levels - 1
    return float(logp[torch.arange(last), labels[0, :last]].sum())


@pytest.mark.parametrize("smoothing, leaf_smoothing", [(0.0, None), (0.3, None), (0.3, 0.0), (0.0, 0.2)])
def test_leaf_head_loss_is_the_cross_entropy_of_its_logits(smoothing, leaf_smoothing):
    """head_loss (fused LM head for the cluster steps, leaf softmax for the last) against the mean
    cross-entropy of `logits()`; label smoothing spreads over all tokens at the cluster steps and over the
    leaf's items at the last step (by leaf_smoothing when given); padded targets (-100) do not count."""
    rec = _rec()
    m = rec.model.train()
    torch.manual_seed(0)
    targets = [rec.tokenizer.target(i, False) for i in (0, 9, 33, 69, 50)]
    dec_in, labels = pad_targets(targets, m.cfg.bos_id)  # (5, 3)
    labels[4] = -100  # a padded row
    hidden = torch.randn(5, 3, m.cfg.d_model, requires_grad=True)
    got = m.head_loss(hidden, labels, smoothing, -100, leaf_smoothing)
    logits = m.logits(hidden, dec_in)  # (5, 3, V)
    terms = []
    for b in range(4):
        for t in range(3):
            z = logits[b, t]
            valid = torch.isfinite(z)
            logp = F.log_softmax(z, -1)
            nll = -logp[labels[b, t]]
            s = leaf_smoothing if t == 2 and leaf_smoothing is not None else smoothing
            terms.append((1 - s) * nll - s * logp[valid].mean())
    want = torch.stack(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(got, hidden)
    g2, = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_item_aux_adds_the_full_item_softmax_at_the_first_step(smoothing):
    """head_loss(item_aux=a) = head_loss + a x F.cross_entropy(h_0 @ E[1:].T, item) over the targets that
    reach the last step (values and gradients, the item table's included)."""
    rec = _rec()
    m = rec.model.train()
    torch.manual_seed(1)
    items = [0, 9, 33, 69, 50]
    dec_in, labels = pad_targets([rec.tokenizer.target(i, False) for i in items], m.cfg.bos_id)  # (5, 3)
    labels[4] = -100  # a padded row
    hidden = torch.randn(5, 3, m.cfg.d_model, requires_grad=True)
    got = m.head_loss(hidden, labels, smoothing, -100, None, item_aux=0.7)
    z = hidden[:4, 0] @ m.item_embed.weight[1:].T  # (4, n_items)
    aux = F.cross_entropy(z, torch.tensor(items[:4]), label_smoothing=smoothing)
    want = m.head_loss(hidden, labels, smoothing, -100, None) + 0.7 * aux
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, [hidden, m.item_embed.weight]),
                    torch.autograd.grad(want, [hidden, m.item_embed.weight])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, m.head_loss(hidden, labels, smoothing, -100, None))


def _data(rng, n_users=200, n_items=80):
    seqs = [rng.integers(0, n_items, int(rng.integers(4, 9))) for _ in range(n_users)]
    seqs[0] = np.arange(n_items)
    return SequenceData(list(range(n_users)), list(range(n_items)), seqs, [str(i + 1) for i in range(n_items)])


def test_leaf_head_trains_saves_and_reloads(tmp_path):
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, leaf_head=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="codes", code_levels=1, code_branches=8,
                                      code_input="first")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=1, eval_users=20)
    trainer = Trainer(_data(np.random.default_rng(2)), tmp_path / "run", p, progress=False)
    trainer.run()
    import json
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    rec = load(tmp_path / "run" / "last")  # the trainer's final weights
    assert rec.model.cfg.leaf_head and rec.model.leaves is not None
    assert not any(k.startswith("leaves.") for k in rec.model.state_dict())  # derived from the code table
    before = trainer.recommender().recommend([[1, 2, 3]], k=5, exclude_seen=False)[0]
    after = rec.recommend([[1, 2, 3]], k=5, exclude_seen=False)[0]
    assert after.items == before.items
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-5)


def test_leaf_head_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(ValueError, match="leaf_head needs model.item_eos=False"):
        dataclasses.replace(preset("tiny").model, leaf_head=True)  # item_eos defaults to True
    with pytest.raises(ValueError, match="item_id_embed=True"):
        dataclasses.replace(preset("tiny").model, leaf_head=True, item_eos=False, item_id_embed=False)
    p = preset("tiny")
    p.model = dataclasses.replace(p.model, item_eos=False, leaf_head=True)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    with pytest.raises(ValueError, match="leaf_head: needs tokenizer.item_tokens='codes'"):
        Trainer(_data(np.random.default_rng(0)), tmp_path / "whole", p, progress=False)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, leaf_smoothing=0.0)
    with pytest.raises(ValueError, match="train.leaf_smoothing=0.0 smooths the leaf head's softmax"):
        Trainer(_data(np.random.default_rng(0)), tmp_path / "noleaf", p, progress=False)
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, item_aux=0.5)
    with pytest.raises(ValueError, match="train.item_aux=0.5 trains the leaf head's item vectors"):
        Trainer(_data(np.random.default_rng(0)), tmp_path / "noaux", p, progress=False)


def test_leaf_head_ensemble_is_exact():
    """An ensemble of two leaf-head models (same codes, other weights) ranks by the mean of their token
    log-probabilities, as brute force does: each member carries its own leaf keys through the search."""
    from genrec_fast.ensemble import Ensemble
    a, b = _rec(seed=0), _rec(seed=0)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ens = Recommender(Ensemble([a.model, b.model]), a.tokenizer, a.catalog)
    assert_beam_search_is_exhaustive(ens, [3, 40, 3, 17], None, k=70)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("ensemble", [False, True])
def test_decode_logprobs_is_the_window_of_the_vocabulary_wide_log_softmax(levels, ensemble):
    """decode_logprobs(tokens, cache, lo, hi) = log_softmax(decode_step(tokens, cache))[:, lo:hi] at every
    step (cluster steps, the leaf step), for the search's windows and for windows that cut a leaf's slots or
    reach past them."""
    from genrec_fast.ensemble import Ensemble
    rec = _rec(levels=levels)
    model = Ensemble([rec.model, _rec(levels=levels, seed=3).model]) if ensemble else rec.model
    enc = pad_encoder([rec.encode(h, None) for h in ([3, 40, 3], [17], [5, 6, 7, 8])])
    V, rng = model.cfg.vocab_size, np.random.default_rng(0)
    fed = [torch.full((3,), model.cfg.bos_id)]  # the tokens fed so far, one (3,) per step
    with torch.no_grad():
        memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])

        def at_step(fn):  # a fresh cache fed the tokens before the last, then fn at the last
            cache = model.start_decoding(memory, enc["mask"])
            for t in fed[:-1]:
                model.decode_step(t, cache)
            return fn(fed[-1], cache)

        for step in range(rec.trie.max_depth - 1):  # the model's steps (the EOS step is certain)
            lo, hi = rec.trie.window(step)
            expected = F.log_softmax(at_step(model.decode_step).float(), dim=-1)  # (3, V)
            for a, b in [(lo, hi), (0, V), (max(lo - 3, 0), lo + 2), (hi - 2, min(hi + 5, V))]:
                got = at_step(lambda t, c: model.decode_logprobs(t, c, a, b))
                assert got.shape == (3, b - a) and got.dtype == torch.float32
                torch.testing.assert_close(got, expected[:, a:b], atol=1e-5, rtol=0)
            fed.append(torch.as_tensor(rng.integers(lo, hi, 3)))  # any tokens of the step's window


@given(st.integers(1, 40), st.integers(0, 9), st.integers(1, 70), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_native_leaf_scores_equal_the_reference(rows, width, dim, seed):
    """`_core.leaf_scores` (used without autograd on CPU float32) against the PyTorch definition, empty slots
    (-inf) included; under autograd the reference runs and its gradients reach the item table."""
    from genrec_fast.leaf_head import leaf_scores, leaf_scores_reference
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(50, dim, generator=g)
    slots = torch.randint(0, 50, (rows, width), generator=g)  # 0: an empty slot
    hidden = torch.randn(rows, dim, generator=g)
    expected = leaf_scores_reference(weight, slots, hidden)
    with torch.no_grad():
        got = leaf_scores(weight, slots, hidden)
    assert got.shape == (rows, width) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(got), slots == 0)
    w = weight.clone().requires_grad_()
    leaf_scores(w, slots, hidden).masked_fill(slots == 0, 0).sum().backward()  # the differentiable path
    assert w.grad is not None and bool(w.grad[slots[slots > 0]].abs().sum() > 0) == bool((slots > 0).any())


def test_native_leaf_scores_rejects_slots_outside_the_table():
    from genrec_fast.native import core
    w, h, out = torch.zeros(5, 4), torch.zeros(1, 4), torch.zeros(1, 2)
    for bad in (5, -1):
        s = torch.tensor([[1, bad]])
        with pytest.raises(ValueError, match=f"slot {bad} at 1 is outside the table's 5 rows"):
            core().leaf_scores(w.data_ptr(), 5, 4, s.data_ptr(), 0, h.data_ptr(), 1, 2, out.data_ptr(), 1)
    w = torch.zeros(32, 4)  # leaf-blocked: two groups of 16 rows
    for starts, slots, match in ((16, [0] * 16 + [9], "start 16 of row 0 with slot 16 reads rows up to 48 of"),
                                 (3, [9], "start 3 of row 0 with slot 0 reads rows up to 19 of a"),
                                 (32, [0, 0], None)):  # empty slots read nothing
        s, at, out = torch.tensor([slots]), torch.tensor([starts]), torch.zeros(1, len(slots))
        call = lambda: core().leaf_scores(w.data_ptr(), 32, 4, s.data_ptr(), at.data_ptr(), h.data_ptr(), 1,
                                          len(slots), out.data_ptr(), 1)
        if match is None:
            call()
            assert bool(torch.isinf(out).all())
        else:
            with pytest.raises(ValueError, match=match):
                call()
    at = torch.tensor([0])
    with pytest.raises(ValueError, match="a multiple of 16 rows, got 31"):
        core().leaf_scores(w.data_ptr(), 31, 4, s.data_ptr(), at.data_ptr(), h.data_ptr(), 1, 2, out.data_ptr(), 1)


_GUARDED_READ = """
import ctypes, mmap, sys
import numpy as np, torch
from genrec_fast.native import core
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)  # a table that ends where an unreadable page begins
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE
rows, dim = 16, 4  # one group of 16 rows, its last byte the page's last
table = base + page - rows * dim * 4
slots, starts, hidden = torch.tensor([[0, 0], [3, 0]]), torch.tensor([16, 0]), torch.ones(2, dim)
out = torch.zeros(2, 2)
core().leaf_scores(table, rows, dim, slots.data_ptr(), starts.data_ptr(), hidden.data_ptr(), 2, 2, out.data_ptr(), 1)
print("ok", out[0].tolist())
"""


def test_an_empty_row_of_the_leaf_blocked_table_reads_nothing():
    """A decoder row whose leaf is empty (its start may point past the table's end) reads no group: the table
    here ends at an unreadable page, so a read past it would kill the child process."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _GUARDED_READ], capture_output=True, text=True)
    assert done.returncode == 0 and "ok [-inf, -inf]" in done.stdout, (done.returncode, done.stderr[-1000:])


@given(st.integers(1, 30), st.integers(1, 12), st.integers(1, 40), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_leaf_ordered_scores_equal_the_scattered_ones(leaves, width, dim, seed):
    """The leaf head's copy of the item table laid out leaf by leaf, in transposed groups of 16 rows
    (`LeafHead.ordered`, read at starts[key] + slot), scores every row as the table read in place and as the
    PyTorch definition, leaves with holes and empty leaves included."""
    from genrec_fast.leaf_head import LeafHead, leaf_scores_reference
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, leaves * width + 1))
    cells = rng.choice(leaves * width, n, replace=False)  # each item a distinct (leaf, slot): holes anywhere
    head = LeafHead(np.stack([cells // width, cells % width], 1), np.array([5, 5 + leaves]), 5 + leaves + width)
    weight = torch.from_numpy(rng.standard_normal((n + 1, dim)).astype(np.float32))
    keys = torch.from_numpy(rng.integers(0, head.items.shape[0], int(rng.integers(1, 20))))
    hidden = torch.from_numpy(rng.standard_normal((len(keys), dim)).astype(np.float32))
    with torch.no_grad():
        got = head.leaf_logits(hidden, keys, weight)
        head.leaf_order = False
        in_place = head.leaf_logits(hidden, keys, weight)
    assert head._copy is not None and head._copy[2].shape == (len(head.order) // 16, dim, 16)
    expected = leaf_scores_reference(weight, head.items[keys], hidden)
    for scores in (got, in_place):
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.isinf(scores), head.items[keys] == 0)


def test_leaf_ordered_copy_follows_the_weights():
    """The ordered copy never serves stale vectors: in-place writes (version), a new table, and a fused
    optimizer's steps (no version) followed by eval() all show in the next scores."""
    rec = _rec()
    model, hist = rec.model, [[ITEMS[3], ITEMS[40]]]

    def scores():
        with torch.no_grad():
            return rec.recommend(hist, k=5, exclude_seen=False)[0]

    def check():  # the ordered copy scores as the table read in place
        out = scores()
        type(model.leaves).leaf_order = False
        try:
            in_place = scores()
        finally:
            type(model.leaves).leaf_order = True
        assert out.items == in_place.items
        np.testing.assert_allclose(out.scores, in_place.scores, rtol=1e-5, atol=1e-5)
        return out

    first = check()
    with torch.no_grad():
        model.item_embed.weight[1:].mul_(-1.0)  # in place: the version counter moves
    assert check() != first
    model.item_embed.weight = torch.nn.Parameter(torch.randn_like(model.item_embed.weight))  # a new table
    check()
    opt = torch.optim.AdamW([model.item_embed.weight], lr=1.0, fused=True)  # leaves the version as it was
    model.train()
    version = model.item_embed.weight._version
    model.item_embed.weight.grad = torch.randn_like(model.item_embed.weight)
    opt.step()
    assert model.item_embed.weight._version == version  # why train() / eval() drop the copy
    before = model.leaves._copy
    model.eval()
    assert model.leaves._copy is None and before is None  # train() dropped it too
    check()



def test_the_blocked_copy_gathered_in_parts_equals_the_whole_gather():
    from genrec_fast.leaf_head import LEAF_GROUP, _blocked
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(101, 8, generator=g)
    order = torch.randint(0, 101, (LEAF_GROUP * 7,), generator=g)
    whole = weight.index_select(0, order).view(-1, LEAF_GROUP, 8).transpose(1, 2).contiguous()
    for part in (LEAF_GROUP, 3 * LEAF_GROUP, 1 << 16):
        assert torch.equal(_blocked(weight, order, part), whole)
