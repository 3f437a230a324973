"""The bfloat16 head (bf16_head.py, `StreamingTopK.add_head_bf16`): the same items as the float head and the
reference, logits to float rounding, the normaliser within the per-user bound; users whose order cannot be proved
go through the float head. Runs where the CPU has AVX512-BF16; elsewhere `precision="bfloat16"` must fall back."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast import bf16_head
from genrec_fast import item_topk as item_topk_module
from genrec_fast.item_topk import Head, item_topk, item_topk_reference
from genrec_fast.native import core

needs_bf16 = pytest.mark.skipif(not bf16_head.supported(), reason="needs a CPU with AVX512-BF16 (and AVX-512 in use)")


@pytest.fixture(autouse=True)
def _small_catalogs_too(monkeypatch):
    """item_topk takes the bfloat16 head from bf16_head.MIN_ITEMS items (where it gains); the tests' catalogs are
    smaller."""
    monkeypatch.setattr(bf16_head, "MIN_ITEMS", 0)


def _head(U, V, C, seed, bias=True, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(U, C, generator=g)
    w = torch.randn(V, C, generator=g) * scale
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    return Head(x, w, b)


def _spy_redone(monkeypatch) -> list:
    """The users each call hands back to the float head (`item_topk._user_rows`' rows), as they come."""
    redone, user_rows = [], item_topk_module._user_rows
    monkeypatch.setattr(item_topk_module, "_user_rows", lambda rows, *a: redone.append(rows) or user_rows(rows, *a))
    return redone


def _emulated(h: Head) -> torch.Tensor:
    """add_head_bf16's scores in float64: x and w rounded to bfloat16."""
    z = h.x.bfloat16().double() @ h.weight.bfloat16().double().T
    return z if h.bias is None else z + h.bias.double()


@needs_bf16
@pytest.mark.parametrize("U", [1, 5, 12, 16, 40])
def test_scan_scores_are_the_rounded_rows_dot_products(U):
    """The C++ scan's values (k = every item) against the float64 product of the rounded operands (float sums only
    between them): the tiles (>= 12 users) and the per-row dots (fewer; 32 columns a register, so hidden sizes
    of 64 and 40 cross a masked last chunk)."""
    C = 40 if U % 2 else 64
    h = _head(U, 3001, C, seed=U)
    V = h.weight.shape[0]
    top = core().StreamingTopK(U, V, V)
    w16 = h.weight.bfloat16().view(torch.int16).contiguous()
    top.add_head_bf16(h.x.data_ptr(), w16.data_ptr(), h.bias.data_ptr(), U, C, V, 0, True, True, 2)
    items, values, lse = top.results()
    want = _emulated(h)
    got = torch.full((U, V), float("nan"), dtype=torch.float64)
    got.scatter_(1, torch.as_tensor(items), torch.as_tensor(values, dtype=torch.float64))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(lse, dtype=torch.float64), torch.logsumexp(want, 1), atol=2e-5, rtol=0)


@needs_bf16
def test_scan_names_bad_arguments():
    h = _head(16, 100, 63, seed=0)
    top = core().StreamingTopK(16, 5, 100)
    w16 = h.weight.bfloat16().view(torch.int16).contiguous()
    with pytest.raises(ValueError, match="even dim"):
        top.add_head_bf16(h.x.data_ptr(), w16.data_ptr(), 0, 16, 63, 100, 0, True, True, 1)
    with pytest.raises(ValueError, match="rows"):
        top.add_head_bf16(h.x.data_ptr(), w16.data_ptr(), 0, 15, 63, 100, 0, True, True, 1)


@needs_bf16
@settings(max_examples=40, deadline=None)
@given(U=st.integers(1, 70), V=st.integers(30, 4000), C=st.sampled_from([16, 32, 40, 64, 96]),
       first=st.integers(0, 5), k=st.integers(1, 40), seed=st.integers(0, 10_000), filters=st.booleans(),
       offsets=st.booleans(), bias=st.booleans())
def test_same_items_as_the_reference(U, V, C, first, k, seed, filters, offsets, bias):
    """Against `item_topk_reference` (full logits, log_softmax, stable sort): the same items in the same order,
    scores within the per-user bound of the normaliser; exclude / allow, history offsets, tokens before and after
    the items, k beyond the allowed items."""
    h = _head(U, V + first + 3, C, seed, bias)
    num_items = V
    rng = np.random.default_rng(seed)
    exclude = [list(rng.integers(0, V, int(rng.integers(0, 6)))) for _ in range(U)] if filters else None
    allow = rng.random((U, V)) < 0.8 if filters else None
    history = None
    if offsets:
        hist = torch.as_tensor(rng.integers(-1, V, (U, 7)))
        history = (hist, [torch.as_tensor(rng.normal(0, 2, (U, 7)), dtype=torch.float32)])
    items, scores = item_topk([h], first, num_items, k, exclude, allow, history=history, precision="bfloat16")
    z = h.x @ h.weight.T + (0 if h.bias is None else h.bias)  # (U, V) full logits, the offsets added
    if history is not None:
        hist, (off,) = history
        for u, j in zip(*np.nonzero(hist.numpy() >= 0)):
            z[u, first + int(hist[u, j])] += off[u, j]
    want_items, want_scores = item_topk_reference([z], first, num_items, k, exclude, allow)
    np.testing.assert_array_equal(items >= 0, want_items >= 0)
    # the same items, up to float-rounding ties: each position's item has the reference's score there
    logp = torch.log_softmax(z.double(), 1)[:, first:first + num_items].numpy()
    at = np.take_along_axis(logp, np.maximum(items, 0), 1)
    np.testing.assert_allclose(np.where(items >= 0, at, 0.0), np.where(items >= 0, want_scores, 0.0), atol=1e-5)
    bound = bf16_head.error_bound(h.x, float(h.weight.norm(dim=1).max()),
                                  0.0 if h.bias is None else float(h.bias.abs().max()))
    # the normaliser's error: each unbiased term within a factor exp(B_u), so log(1 +- (...) S0 / S) with S0 the
    # unbiased softmax mass and S the biased one (= B_u to first order without offsets)
    z0 = (h.x @ h.weight.T + (0 if h.bias is None else h.bias)).double()
    ratio = torch.exp(torch.logsumexp(z0, 1) - torch.logsumexp(z.double(), 1)).numpy()
    low = -np.expm1(-bound) * ratio
    shift = np.maximum(np.log1p(np.expm1(bound) * ratio), -np.log1p(-np.minimum(low, 1 - 1e-12)))
    found = items >= 0
    diff = np.abs(np.where(found, scores, 0.0) - np.where(found, want_scores, 0.0))
    assert (diff <= shift[:, None] + 1e-4).all()
    assert np.isneginf(scores[~found]).all()
    # the logits themselves are the float ones: within a user, the scores differ as the reference's do
    rel = np.where(found, scores - scores[:, :1], 0.0) - np.where(found, want_scores - want_scores[:, :1], 0.0)
    assert np.abs(rel).max(initial=0.0) < 1e-4


@needs_bf16
def test_users_that_cannot_be_proved_go_through_the_float_head(monkeypatch):
    """With a bound too wide for any user, every user is ranked by the float head: the float path's result exactly;
    a user whose state holds a NaN (every logit NaN, never ranked) gets what the float head gives it."""
    h = _head(40, 5000, 64, seed=3)
    want = item_topk([h], 2, 4990, 20)
    monkeypatch.setattr(bf16_head, "error_bound", lambda x, w_max, b_max: np.full(x.shape[0], 1e9))
    redone = _spy_redone(monkeypatch)
    got = item_topk([h], 2, 4990, 20, precision="bfloat16")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert list(redone[0]) == list(range(40))
    monkeypatch.undo()
    x = h.x.clone()
    x[7, 3] = float("nan")
    nan_head = Head(x, h.weight, h.bias)
    with np.errstate(invalid="ignore"):  # (the NaN user's padding: -inf less a -inf normaliser)
        got = item_topk([nan_head], 2, 4990, 20, precision="bfloat16")
        want = item_topk([nan_head], 2, 4990, 20)
    np.testing.assert_array_equal(got[0], want[0])
    assert (got[0][7] == -1).all()
    np.testing.assert_allclose(got[1], want[1], atol=0.05)  # (-inf where no item, as the float head)


@needs_bf16
def test_the_rounded_table_is_kept_until_the_weights_change():
    h = _head(16, 500, 32, seed=1)
    w16, w_max = bf16_head.rows(h.weight)
    assert bf16_head.rows(h.weight)[0] is w16
    with torch.no_grad():
        h.weight[3, 0] += 1.0
    w16b, w_maxb = bf16_head.rows(h.weight)
    assert w16b is not w16 and int(w16b[3, 0]) != int(w16[3, 0])
    with torch.inference_mode():  # a model made under inference_mode: no version counter
        w = torch.randn(40, 8)
    assert bf16_head.rows(w)[0] is bf16_head.rows(w)[0]


def test_bad_precision_is_named():
    h = _head(4, 50, 16, seed=0)
    with pytest.raises(ValueError, match="precision"):
        item_topk([h], 0, 50, 5, precision="half")


def test_falls_back_to_float_where_the_cpu_cannot():
    """GENREC_CPU_ISA=avx2 (no AVX-512 in use): not supported, and precision="bfloat16" returns the float head's
    items and scores exactly, with one warning that says so."""
    code = ("import numpy as np, torch; from genrec_fast import bf16_head; "
            "from genrec_fast.item_topk import Head, item_topk; torch.manual_seed(0); "
            "h = Head(torch.randn(20, 32), torch.randn(3000, 32), None); "
            "a = item_topk([h], 0, 3000, 10); b = item_topk([h], 0, 3000, 10, precision='bfloat16'); "
            "c = item_topk([h], 0, 3000, 10, precision='bfloat16'); "
            "assert not bf16_head.supported(); assert all(np.array_equal(p, q) for p, q in zip(a, b)); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GENREC_CPU_ISA": "avx2"},
                          capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert done.stderr.count("has no AVX512-BF16") == 1


@needs_bf16
def test_recommend_with_the_bfloat16_head_returns_the_same_items():
    """A one-token model with both biases through `Recommender.head_precision`: the float head's items for every
    request of a batch (filters included), log-probabilities within the bound's order (random weights: ~1e-3)."""
    import dataclasses

    from genrec_fast import Recommender, preset
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False, history_bias=True, transition_bias=True,
                              transition_neighbors=4, transition_reverse=True)
    n = 3000
    rec = Recommender.random(list(range(n)), cfg, vocab_size=200, item_tokens="whole", seed=4)
    rng = np.random.default_rng(4)
    rec.model.transition.fit([rng.integers(0, n, 12) for _ in range(300)])
    with torch.no_grad():
        rec.model.transition.weight.normal_(0, 2.0)
        rec.model.history.recency.normal_(0, 2.0)
    hists = [list(rng.integers(0, n, int(rng.integers(1, 15)))) for _ in range(40)]
    allowed = set(range(0, n, 3)) | set(hists[0])
    want = rec.recommend(hists, k=20, exclude_seen=True, allowed_items=allowed)
    rec.head_precision = "bfloat16"
    got = rec.recommend(hists, k=20, exclude_seen=True, allowed_items=allowed)
    assert [r.items for r in got] == [r.items for r in want]
    np.testing.assert_allclose([r.scores for r in got], [r.scores for r in want], atol=0.02)
    with pytest.raises(ValueError, match="head_precision .* got 'fp8'"):
        rec.head_precision = "fp8"
    assert rec.head_precision == "bfloat16"


@needs_bf16
def test_small_catalogs_keep_the_float_head(monkeypatch):
    monkeypatch.setattr(bf16_head, "MIN_ITEMS", 3000)
    scans = []
    scan_bf16 = item_topk_module._scan_bf16
    monkeypatch.setattr(item_topk_module, "_scan_bf16", lambda *a: scans.append(1) or scan_bf16(*a))
    h = _head(20, 3005, 32, seed=2)
    item_topk([h], 0, 2999, 10, precision="bfloat16")
    assert not scans
    item_topk([h], 0, 3000, 10, precision="bfloat16")
    assert scans == [1]


def test_the_environment_sets_the_default_precision(monkeypatch):
    from genrec_fast import Recommender
    monkeypatch.setenv("GENREC_HEAD_PRECISION", "bfloat16")
    assert Recommender.random(list(range(30)), "tiny", vocab_size=100).head_precision == "bfloat16"
    monkeypatch.delenv("GENREC_HEAD_PRECISION")
    assert Recommender.random(list(range(30)), "tiny", vocab_size=100).head_precision == "float32"
    monkeypatch.setenv("GENREC_HEAD_PRECISION", "bf16")
    with pytest.raises(ValueError, match="GENREC_HEAD_PRECISION"):
        Recommender.random(list(range(30)), "tiny", vocab_size=100)


@needs_bf16
def test_some_users_through_the_float_head_with_filters_and_offsets(monkeypatch):
    """Half the users (a bound too wide for them) ranked again by the float head: their exclusions, allowed items
    and offsets picked by row, so every user's result is the float path's."""
    U, V = 36, 6000
    h = _head(U, V + 4, 64, seed=11)
    rng = np.random.default_rng(11)
    exclude = [list(rng.integers(0, V, int(rng.integers(0, 30)))) for _ in range(U)]
    allow = rng.random((U, V)) < 0.7
    history = (torch.as_tensor(rng.integers(-1, V, (U, 9))), [torch.as_tensor(rng.normal(0, 3, (U, 9)),
                                                                            dtype=torch.float32)])
    want = item_topk([h], 3, V, 15, exclude, allow, history=history)
    wide = lambda x, w_max, b_max: np.where(np.arange(x.shape[0]) % 2 == 0, 1e9, 0.0)  # noqa: E731
    monkeypatch.setattr(bf16_head, "error_bound", wide)
    redone = _spy_redone(monkeypatch)
    got = item_topk([h], 3, V, 15, exclude, allow, history=history, precision="bfloat16")
    assert list(redone[0]) == list(range(0, U, 2))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1][::2], want[1][::2])  # the float head's own scores
    np.testing.assert_allclose(got[1][1::2], want[1][1::2], atol=0.01)
