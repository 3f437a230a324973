"""item_topk (chunked LM head + C++ streaming top-k) against its plain PyTorch definition."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import genrec_fast.item_topk as item_topk_module
from genrec_fast.beam_search import check_filters
from genrec_fast.item_topk import Head, _item_topk_torch, _scores, item_topk, item_topk_reference


def heads_and_logits(rng, members, U, V, C, integer=False, zero_bias=False):
    heads, logits = [], []
    for _ in range(members):
        if integer:  # small integer logits: many exact ties
            x = torch.from_numpy(rng.integers(-2, 3, (U, C))).float()
            w = torch.from_numpy(rng.integers(-1, 2, (V, C))).float()
            b = torch.from_numpy(rng.integers(-1, 2, V)).float()
        else:
            x, w, b = (torch.from_numpy(rng.standard_normal(s)).float() for s in ((U, C), (V, C), (V,)))
        if zero_bias:  # GenRec's final_logits_bias is zero unless converted from a model that set it
            b = torch.zeros(V)
        heads.append(Head(x, w, b))
        logits.append(x @ w.T + b)
    return heads, logits


def random_filters(rng, U, n, kind):
    exclude = [rng.choice(n, size=int(rng.integers(0, n + 1)), replace=True) for _ in range(U)] if "ex" in kind else None
    allow = None
    if "shared" in kind:
        allow = rng.random(n) < 0.5
    elif "per_user" in kind:
        allow = rng.random((U, n)) < 0.3
    return exclude, allow


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), U=st.integers(1, 9), n=st.integers(1, 70), before=st.integers(0, 9),
       after=st.integers(0, 3), k=st.integers(1, 25), chunk=st.integers(1, 40), members=st.integers(1, 3),
       integer=st.booleans(), zero_bias=st.booleans(),
       kind=st.sampled_from(["", "ex", "shared", "per_user", "ex+shared", "ex+per_user"]))
def test_fast_path_equals_reference(seed, U, n, before, after, k, chunk, members, integer, zero_bias, kind):
    rng = np.random.default_rng(seed)
    heads, logits = heads_and_logits(rng, members, U, before + n + after, 8, integer, zero_bias)
    exclude, allow = random_filters(rng, U, n, kind)
    want_i, want_s = item_topk_reference(logits, before, n, k, exclude, allow)
    for fn in (_fused_path, _scan_path, _whole_path, _torch_path):
        got_i, got_s = fn(heads, before, n, k, exclude, allow, chunk)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
        if integer and members > 1:  # the reference's mean of rounded log-softmaxes breaks exact ties
            assert_same_up_to_ties(got_i, got_s, want_i, logits, before)
        else:
            np.testing.assert_array_equal(got_i, want_i)  # ties too: both order them by item index


def assert_same_up_to_ties(got_i, got_s, want_i, logits, first):
    """Same count per user, and every returned item carries its own (reference) score."""
    np.testing.assert_array_equal(got_i == -1, want_i == -1)
    logp = torch.stack([torch.log_softmax(z, -1) for z in logits]).mean(0).numpy()
    for u in range(len(got_i)):
        found = got_i[u][got_i[u] >= 0]
        np.testing.assert_allclose(got_s[u][:len(found)], logp[u, first + found], atol=1e-5)


def _fused_path(heads, first, n, k, exclude, allow, chunk):
    """The fused C++ head for one model (the default from 16 users on); ensembles take the scan path."""
    return item_topk(heads, first, n, k, exclude, allow, chunk, fused=len(heads) == 1)


def _scan_path(heads, first, n, k, exclude, allow, chunk):
    """The matmuls of `chunk` vocabulary rows into the C++ scan (from WHOLE_MATMUL_MAX users x vocabulary on)."""
    old, item_topk_module.WHOLE_MATMUL_MAX = item_topk_module.WHOLE_MATMUL_MAX, 0
    try:
        return item_topk(heads, first, n, k, exclude, allow, chunk, fused=False)
    finally:
        item_topk_module.WHOLE_MATMUL_MAX = old


def _whole_path(heads, first, n, k, exclude, allow, chunk):
    """One matmul over the whole vocabulary (a few users, one model)."""
    return item_topk(heads, first, n, k, exclude, allow, chunk, fused=False)


def _torch_path(heads, first, n, k, exclude, allow, chunk):
    """The device loop (GPUs), run here on CPU tensors."""
    U = heads[0].x.shape[0]
    ptr, items, allow = check_filters(exclude, allow, U, n)
    got_i, values, norms = _item_topk_torch(heads, first, n, k, ptr, items, allow, chunk)
    return got_i, _scores(got_i, values, norms.mean(0))


def test_k_beyond_the_allowed_items_pads_and_nan_is_never_chosen():
    rng = np.random.default_rng(0)
    heads, _ = heads_and_logits(rng, 1, 2, 30, 4)
    w = heads[0].weight.clone()
    w[12] = float("nan")  # item 2 (first item 10) scores NaN for every user (so does the normaliser)
    heads = [Head(heads[0].x, w, heads[0].bias)]
    allow = np.zeros(20, bool)
    allow[[1, 2, 7]] = True
    items, scores = item_topk(heads, 10, 20, 5, allow=allow)
    assert sorted(items[0, :2]) == [1, 7] and (items[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    items, _ = item_topk(heads, 10, 20, 5, allow=np.zeros(20, bool))  # an empty allow-list
    assert (items == -1).all()


def test_lse_is_over_the_whole_vocabulary():
    rng = np.random.default_rng(1)
    heads, logits = heads_and_logits(rng, 1, 3, 5000, 16)
    items, scores = item_topk(heads, 1000, 3000, 4, chunk=700)
    logp = torch.log_softmax(logits[0], -1)
    np.testing.assert_allclose(scores, logp.gather(1, torch.from_numpy(items) + 1000).numpy(), atol=1e-5)


def test_bad_arguments_name_what_is_wrong():
    heads, _ = heads_and_logits(np.random.default_rng(2), 1, 2, 20, 4)
    with pytest.raises(ValueError, match="do not fit a vocabulary of 20"):
        item_topk(heads, 5, 16, 3)
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        item_topk(heads, 0, 20, 0)
    with pytest.raises(ValueError, match=r"exclude must hold num_users=2 arrays, got 1"):
        item_topk(heads, 0, 20, 3, exclude=[[1]])
    with pytest.raises(ValueError, match=r"exclude\[1\] holds item ids outside \[0, 20\)"):
        item_topk(heads, 0, 20, 3, exclude=[[1], [20]])
    with pytest.raises(ValueError, match=r"allow must have shape \(20,\) or \(2, 20\)"):
        item_topk(heads, 0, 20, 3, allow=np.ones(19, bool))
    with pytest.raises(ValueError, match="allow must be a bool mask over items"):
        item_topk(heads, 0, 20, 3, allow=np.ones(20, int))


def test_native_scan_rejects_bad_sizes():
    from genrec_fast.native import core
    with pytest.raises(ValueError, match="exclude_ptr must be 1-D with num_users"):
        core().StreamingTopK(2, 3, 10, np.array([0, 1], np.int64), np.array([1], np.int64))
    with pytest.raises(ValueError, match="num_users must be >= 0"):
        core().StreamingTopK(-1, 3, 10, np.zeros(0, np.int64), np.zeros(0, np.int64))
    t = core().StreamingTopK(2, 3, 10)
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="outside the catalog"):
        t.add(z.data_ptr(), 2, 4, 4, 8, True, True, 1)
    with pytest.raises(ValueError, match="rows, expected num_users=2"):
        t.add(z.data_ptr(), 3, 4, 4, 0, True, True, 1)


@pytest.mark.parametrize("users", [6, 37])
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("k, chunk", [(1, 5000), (5, 777), (20, 100), (40, 3000)])
def test_many_blocks_without_filters(k, chunk, integer, users):
    """Catalogs of many 64-column blocks (the scan skips blocks below the k-th block max) and of many
    512-column chunks of the fused head, over one and several 16-user tiles."""
    rng = np.random.default_rng(k + chunk)
    heads, logits = heads_and_logits(rng, 1, users, 4100, 8, integer)
    want_i, want_s = item_topk_reference(logits, 100, 4000, k)
    for fused in (False, True):
        got_i, got_s = item_topk(heads, 100, 4000, k, chunk=chunk, fused=fused)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


def test_fused_head_with_filters_over_several_tiles():
    rng = np.random.default_rng(7)
    U, n = 35, 3000
    heads, logits = heads_and_logits(rng, 1, U, n + 13, 24)
    exclude, allow = random_filters(rng, U, n, "ex+per_user")
    want = item_topk_reference(logits, 13, n, 25, exclude, allow)
    got = item_topk(heads, 13, n, 25, exclude, allow, threads=2)  # fused: one model, >= 16 users
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("users, threads", [(1, 2), (3, 3), (11, 2), (12, 2), (15, 4), (16, 2), (17, 3)])
@pytest.mark.parametrize("kind", ["", "ex+per_user", "ties", "offsets", "boundaries"])
def test_fused_head_splits_the_catalog_when_users_are_few(users, threads, kind):
    """Fewer 16-user tiles than threads: the fused head scans spans of >= 16,384 columns (here 2-3) into
    partial top-ks and log-sum-exps and merges them (under 12 users with dots over dim, else with the tiles);
    ties across spans still go to the smaller item, filters and history offsets hold in every span."""
    rng = np.random.default_rng(users * 10 + threads)
    first, n, k = 5, 3 * 16384 + 77, 20
    heads, logits = heads_and_logits(rng, 1, users, first + n + 3, 8, integer=kind == "ties")
    exclude, allow = random_filters(rng, users, n, kind)
    if kind == "boundaries":  # only the items next to where 2, 3 or 4 spans meet
        allow = np.zeros(n, dtype=bool)
        for t in (2, 3, 4):
            for i in range(1, t):
                allow[n * i // t - 2:n * i // t + 2] = True
    history, z = None, logits[0].clone()
    if kind == "offsets":  # item 0 and a repeat on purpose; -1 = none
        hist = torch.from_numpy(rng.integers(-1, n, (users, 7)))
        hist[:, 0], hist[:, 1] = 0, hist[:, 2]
        off = torch.from_numpy((20 * rng.standard_normal((users, 7))).astype(np.float32))  # some into the top k
        for u, s in zip(*np.nonzero(hist.numpy() >= 0)):
            z[u, first + hist[u, s]] += off[u, s]
        history = (hist, [off])
    want_i, want_s = item_topk_reference([z], first, n, k, exclude, allow)
    # fused (the default from 32,768 items)
    got_i, got_s = item_topk(heads, first, n, k, exclude, allow, threads=threads, history=history)
    np.testing.assert_array_equal(got_i, want_i)
    # offsets of 20 make logits of ~60, whose float32 rounding (every path's, split or not) reaches ~3e-5
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-4 if kind == "offsets" else 1e-5)


def test_split_head_added_in_two_calls():
    """Two `add_head` calls over halves of the catalog, each split over threads: the second call's spans start
    empty and merge into what the first call kept (nothing counted twice)."""
    from genrec_fast.native import core
    rng = np.random.default_rng(3)
    U, n, k, C = 2, 2 * 2 ** 15, 30, 8
    heads, logits = heads_and_logits(rng, 1, U, n, C, integer=True)  # ties across the calls and the spans
    x, w, b = (t.contiguous() for t in heads[0])
    top = core().StreamingTopK(U, k, n)
    half = n // 2
    for lo in (0, half):
        top.add_head(x.data_ptr(), w.data_ptr() + 4 * lo * C, b.data_ptr() + 4 * lo, U, C, half, lo, True, True, 2)
    items, values, lse = top.results()
    want_i, want_s = item_topk_reference(logits, 0, n, k)
    np.testing.assert_array_equal(items, want_i)
    np.testing.assert_allclose(values - lse[:, None], want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("members", [1, 2])
def test_device_loop_on_cuda_equals_reference(members):
    """On a GPU the chunked torch loop runs on the device; only (U, k) comes back to the host."""
    rng = np.random.default_rng(11)
    heads, logits = heads_and_logits(rng, members, 40, 9000, 64)
    exclude, allow = random_filters(rng, 40, 8000, "ex+shared")
    want = item_topk_reference(logits, 1000, 8000, 20, exclude, allow)
    cuda = [Head(h.x.cuda(), h.weight.cuda(), h.bias.cuda()) for h in heads]
    got = item_topk(cuda, 1000, 8000, 20, exclude, allow, chunk=3000)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 40), st.integers(1, 45))
@settings(max_examples=60, deadline=None)
def test_top_by_score_orders_as_lexsort(seed, R, W, k):
    """The one-key selection every top-k merge uses (history pairs, the torch loop, the CUDA kernel's splits)
    against numpy's two-key lexsort: ties, +-0.0, +-inf, NaN last, ids from -1 up to 2**31 - 1."""
    from genrec_fast.device_search import top_by_score

    rng = np.random.default_rng(seed)
    pool = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.5, -2.0, 3.25], dtype=np.float32)
    s = rng.choice(pool, (R, W)) if seed % 2 else rng.standard_normal((R, W)).astype(np.float32).round(1)
    high = 2**31 - 1 if seed % 3 == 0 else 10 * W
    items = np.stack([rng.choice(high, W, replace=False) - 1 for _ in range(R)]).astype(np.int64)
    k = min(k, W)
    got = top_by_score(torch.from_numpy(s), torch.from_numpy(items), k).numpy()
    np.testing.assert_array_equal(got, np.lexsort((items, -s), axis=1)[:, :k])
