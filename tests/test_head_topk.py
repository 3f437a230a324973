"""The CUDA LM head + top-k (cuda/head_topk.cu, kernels/head_topk.py) against `item_topk_reference`.

Without a GPU the kernel runs on CPU threads: the same .cu compiled by g++ against tests/cuda_emu/include
(one std::thread per CUDA thread; shared memory, __syncthreads and wmma emulated by their documented
semantics). It checks the tiling, the wmma operand layouts and pointers, the vocabulary splits, the row
phase (log-sum-exp, exclusions, allow mask, ties) and the merge, for fp32, fp16 and bf16 inputs; timing,
the real tensor-core register layout and memory alignment faults need the GPU tests below.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from genrec_fast.beam_search import check_filters
from genrec_fast.item_topk import Head, item_topk, item_topk_reference
from genrec_fast.kernels.head_topk import head_topk_available, merge_splits

from emu import build  # tests/emu.py

CUDA = torch.cuda.is_available() and head_topk_available()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build("head_topk_emu.cpp", tmp_path_factory)


def _p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def to_dtype(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 a -> (the stored array the kernel reads, its values as float32): fp32, fp16 or bf16 (as uint16,
    rounded to nearest even)."""
    a = np.ascontiguousarray(a, np.float32)
    if dtype == "float32":
        return a, a
    if dtype == "float16":
        h = a.astype(np.float16)
        return h, h.astype(np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def run_emu(emu, x, w, b, first_item, num_items, k, ptr=None, ex_items=None, allow=None, splits=None,
            dtype="float32"):
    """The kernel on CPU threads, then `merge_splits`: -> items (U, k), logits (U, k), lse (U,). x and w are
    the stored arrays of `dtype` (`to_dtype`)."""
    U, C = x.shape
    V = w.shape[0]
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    b = None if b is None else np.ascontiguousarray(b, np.float32)
    if splits is None:
        splits = emu.emu_head_topk_splits(ctypes.c_longlong(U), ctypes.c_longlong(V))
    if ptr is not None:  # the kernel takes each user's exclusions sorted
        rows = np.repeat(np.arange(U), np.diff(ptr))
        ex_items = np.ascontiguousarray(ex_items[np.lexsort((ex_items, rows))], np.int64)
        ptr = np.ascontiguousarray(ptr, np.int64)
        if len(ex_items) == 0:
            ex_items = np.zeros(1, np.int64)
    allow_u8 = None if allow is None else np.ascontiguousarray(allow, np.uint8)
    values = np.empty((U, splits, k), np.float32)
    items = np.empty((U, splits, k), np.int32)
    maxes, sums = np.empty((U, splits), np.float32), np.empty((U, splits), np.float32)
    err = ctypes.create_string_buffer(256)
    ll = ctypes.c_longlong
    rc = emu.emu_head_topk(_p(x), _p(w), ctypes.c_int(DTYPE_CODES[dtype]), _p(b), ll(U), ll(C), ll(V), ll(first_item), ll(num_items), ll(k), _p(ptr),
                           _p(ex_items), _p(allow_u8), ll(0 if allow is None or allow.ndim == 1 else num_items),
                           ll(splits), _p(values), _p(items), _p(maxes), _p(sums), err, ll(256))
    if rc:
        raise RuntimeError(err.value.decode())
    t = torch.from_numpy
    return merge_splits(t(values), t(items), t(maxes), t(sums), k, num_items)


def check_against_reference(got, x, w, b, first_item, num_items, k, exclude=None, allow=None, rtol=1e-5,
                            exact_items=False):
    """The kernel's top-k against `item_topk_reference` on the same inputs in float64. Items equal up to
    near-ties: the kernel sums in float32 in its own order, so two logits closer than that error may swap at
    the k-th place. So: every returned item passes the filters, once; its score is its true log-probability;
    and rank by rank the scores equal the reference's (the same items wherever no near-tie exists).
    exact_items: the same items, ties included (exact ties of identical rows sum identically)."""
    items, logits, lse = (a.cpu().numpy() for a in got)
    z = torch.from_numpy(x).double() @ torch.from_numpy(w).double().t()
    if b is not None:
        z = z + torch.from_numpy(b).double()
    want_items, want_scores = item_topk_reference([z], first_item, num_items, k, exclude, allow)
    np.testing.assert_allclose(lse.astype(np.float64), torch.logsumexp(z, 1).numpy(), rtol=rtol, atol=1e-4)
    np.testing.assert_array_equal(items >= 0, want_items >= 0)  # as many items per user
    logp = torch.log_softmax(z, 1).numpy()[:, first_item:first_item + num_items]  # (U, num_items) the truth
    ptr, ex_items, allow_a = check_filters(exclude, allow, len(items), num_items)
    for u, row in enumerate(items):
        row = row[row >= 0]
        assert len(set(row.tolist())) == len(row), f"user {u}: an item twice"
        if allow_a is not None:
            assert (allow_a if allow_a.ndim == 1 else allow_a[u])[row].all(), f"user {u}: a disallowed item"
        if ptr is not None:
            assert not np.isin(row, ex_items[ptr[u]:ptr[u + 1]]).any(), f"user {u}: an excluded item"
        scores = logits[u, :len(row)].astype(np.float64) - float(lse[u])
        np.testing.assert_allclose(scores, logp[u, row], rtol=rtol, atol=1e-4)
        np.testing.assert_allclose(scores, want_scores[u, :len(row)], rtol=rtol, atol=1e-4)
    if exact_items:
        np.testing.assert_array_equal(items, want_items)
    _, next_scores = item_topk_reference([z], first_item, num_items, k + 1, exclude, allow)  # rank k + 1 too
    with np.errstate(invalid="ignore"):  # -inf - -inf at the padding: NaN, not a tie
        near_tie = np.abs(np.diff(next_scores, axis=1))[:, :k] < 1e-4  # ranks r and r + 1 within tol
    mismatch = (items != want_items) & ~(near_tie | np.roll(near_tie, 1, axis=1))
    assert not mismatch.any(), f"items differ away from near-ties at {np.argwhere(mismatch)[:5].tolist()}"


@st.composite
def problems(draw):
    U = draw(st.integers(1, 140))
    C = draw(st.sampled_from([16, 48, 64, 80, 144]))
    V = draw(st.integers(1, 300))
    first_item = draw(st.integers(0, V - 1))
    num_items = draw(st.integers(1, V - first_item))
    k = draw(st.integers(1, 40))
    splits = draw(st.integers(1, 6))
    filters = draw(st.sampled_from(["none", "exclude", "allow1", "allow2", "both"]))
    return U, C, V, first_item, num_items, k, splits, filters, draw(st.integers(0, 2**31 - 1))


@given(problems(), st.sampled_from(["float32", "float16", "bfloat16"]))
@example(problem=(112, 80, 217, 112, 87, 28, 1, "allow2", 1827883), dtype="float16")  # a near-tie at rank k
@settings(max_examples=30, deadline=None)
def test_emulated_kernel_matches_reference(emu, problem, dtype):
    """Every dtype: the 16-bit inputs through the (emulated) wmma tiles, against the reference on the same
    rounded inputs in float64."""
    U, C, V, first_item, num_items, k, splits, filters, seed = problem
    rng = np.random.default_rng(seed)
    scale = 40.0 if seed % 3 == 0 else 1.0  # logits of +-100s: the online log-sum-exp must rescale exactly
    x_in, x = to_dtype(scale * rng.standard_normal((U, C)), dtype)
    w_in, w = to_dtype(rng.standard_normal((V, C)) / np.sqrt(C), dtype)
    b = rng.standard_normal(V).astype(np.float32) if seed % 2 else None
    exclude = allow = None
    if filters in ("exclude", "both"):
        exclude = [list(rng.choice(num_items, size=rng.integers(0, num_items + 1), replace=True)) for _ in range(U)]
    if filters in ("allow1", "both"):
        allow = rng.random(num_items) < 0.7
    if filters == "allow2":
        allow = rng.random((U, num_items)) < 0.5
    ptr, ex_items, allow_a = check_filters(exclude, allow, U, num_items)
    got = run_emu(emu, x_in, w_in, b, first_item, num_items, k, ptr, ex_items, allow_a, splits, dtype)
    check_against_reference(got, x, w, b, first_item, num_items, k, exclude, allow)


def test_emulated_kernel_breaks_ties_by_item(emu):
    """Equal logits across tiles and splits (repeated W rows): the smaller item wins, as in the reference."""
    rng = np.random.default_rng(0)
    U, C, V = 70, 32, 200
    for dtype in DTYPE_CODES:
        x_in, x = to_dtype(rng.standard_normal((U, C)), dtype)
        w_in, w = to_dtype(np.tile(rng.standard_normal((10, C)), (V // 10, 1)), dtype)  # 20 copies of each row
        for splits in (1, 3):
            got = run_emu(emu, x_in, w_in, None, 3, 190, 25, splits=splits, dtype=dtype)
            check_against_reference(got, x, w, None, 3, 190, 25, exact_items=True)


def test_emulated_kernel_nan_and_empty(emu):
    """A NaN logit is never chosen and makes the normaliser NaN; users with every item filtered get none."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    w = rng.standard_normal((50, 16)).astype(np.float32)
    x[1, 0] = np.nan
    allow = np.ones((3, 50), dtype=bool)
    allow[2] = False
    items, logits, lse = run_emu(emu, x, w, None, 0, 50, 5, allow=allow)
    assert (items[0] >= 0).all() and np.isfinite(lse[0])
    assert (items[1] == -1).all() and torch.isnan(lse[1])
    assert (items[2] == -1).all() and (logits[2] == float("-inf")).all() and np.isfinite(lse[2])


def test_emulated_kernel_rejects_bad_arguments(emu):
    x = np.zeros((2, 20), np.float32)
    w = np.zeros((10, 20), np.float32)
    with pytest.raises(RuntimeError, match="dim: expected a positive multiple of 16"):
        run_emu(emu, x, w, None, 0, 10, 3)
    with pytest.raises(RuntimeError, match="k: expected 1..256"):
        run_emu(emu, x[:, :16], w[:, :16], None, 0, 10, 300)
    with pytest.raises(RuntimeError, match="do not fit a vocabulary"):
        run_emu(emu, x[:, :16], w[:, :16], None, 5, 10, 3)


def test_merge_splits_ranks_across_splits():
    """Two splits of two: the best two overall by (value desc, item asc); the lse from the parts."""
    values = torch.tensor([[[3.0, 1.0], [3.0, 2.0]]])  # (1, 2, 2)
    items = torch.tensor([[[7, 1], [2, 4]]], dtype=torch.int32)
    maxes = torch.tensor([[3.0, 3.0]])
    sums = torch.tensor([[1.5, 2.0]])
    got_items, got_values, lse = merge_splits(values, items, maxes, sums, 3, 10)
    assert got_items.tolist() == [[2, 7, 4]] and got_values.tolist() == [[3.0, 3.0, 2.0]]
    assert lse.item() == pytest.approx(3.0 + np.log(3.5))


def test_merge_splits_of_no_users():
    empty = torch.zeros(0, 3, 4)
    items, values, lse = merge_splits(empty, empty.int(), torch.zeros(0, 3), torch.zeros(0, 3), 4, 10)
    assert items.shape == values.shape == (0, 4) and lse.shape == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_exclusions_sorted_on_the_device_as_on_the_host(seed):
    """The exclude CSR given as tensors (sorted by torch ops) equals the one given as arrays (numpy)."""
    from genrec_fast.kernels.head_topk import _exclusions
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, size=7) * (seed > 0)  # seed 0: every list empty
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, 50, size=ptr[-1]).astype(np.int64)
    want = _exclusions(ptr, items, torch.device("cpu"))
    got = _exclusions(torch.from_numpy(ptr), torch.from_numpy(items), torch.device("cpu"))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_fused_true_on_cpu_keeps_the_cpu_path():
    """fused=True on CPU tensors is the C++ fused head, not the CUDA kernel."""
    rng = np.random.default_rng(2)
    x, w = torch.from_numpy(rng.standard_normal((20, 16)).astype(np.float32)), torch.randn(40, 16)
    items, _ = item_topk([Head(x, w, None)], 0, 40, 5, fused=True)
    want, _ = item_topk_reference([x @ w.t()], 0, 40, 5)
    np.testing.assert_array_equal(items, want)


# ---- on a GPU -------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and genrec_fast built with the CUDA kernels")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("U,C,V", [(1, 64, 1000), (37, 64, 12101), (256, 256, 20011), (130, 48, 777)])
def test_cuda_head_topk_matches_reference(dtype, U, C, V):
    torch.manual_seed(U + V)
    x = torch.randn(U, C, device="cuda").to(dtype)
    w = (torch.randn(V, C, device="cuda") / C**0.5).to(dtype)
    b = torch.randn(V, device="cuda").to(dtype)
    rng = np.random.default_rng(V)
    exclude = [list(rng.choice(V - 5, size=int(rng.integers(0, 50)))) for _ in range(U)]
    allow = rng.random(V - 5) < 0.9
    got = item_topk([Head(x, w, b)], 5, V - 5, 20, exclude, allow, fused=True)
    ref_logits = (x.float() @ w.float().t() + b.float())  # the kernel accumulates in fp32 from the same inputs
    want = item_topk_reference([ref_logits], 5, V - 5, 20, exclude, allow)
    torch_path = item_topk([Head(x, w, b)], 5, V - 5, 20, exclude, allow, fused=False)
    err = np.abs(got[1] - want[1]).max()
    torch_err = np.abs(torch_path[1] - want[1]).max()
    assert err <= 2 * torch_err + 1e-4, (err, torch_err)
    agree = (got[0] == want[0]).mean()
    assert agree >= (0.999 if dtype == torch.float32 else 0.97), agree  # near-ties may swap at low precision


@gpu
def test_cuda_head_topk_refuses_offsets_and_the_default_runs_the_torch_loop(monkeypatch):
    """The kernel takes no logit offsets: fused=True with a history says so; the opt-in default (fused=None) then
    runs the torch loop, which adds the offsets on the device and equals the definition."""
    torch.manual_seed(0)
    U, C, V = 64, 64, 5000
    x, w = torch.randn(U, C, device="cuda"), torch.randn(V, C, device="cuda") / 8
    hist = torch.randint(0, V, (U, 6), device="cuda")
    off = torch.randn(U, 6, device="cuda")
    with pytest.raises(ValueError, match="takes no logit offsets"):
        item_topk([Head(x, w, None)], 0, V, 10, history=(hist, [off]), fused=True)
    monkeypatch.setenv("GENREC_CUDA_HEAD_TOPK", "1")
    got = item_topk([Head(x, w, None)], 0, V, 10, history=(hist, [off]))
    z = (x @ w.t()).index_put_((torch.arange(U, device="cuda")[:, None], hist), off, accumulate=True)
    want = item_topk_reference([z], 0, V, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


@gpu
def test_the_opt_in_default_runs_the_torch_loop_where_the_kernel_cannot(monkeypatch):
    """With GENREC_CUDA_HEAD_TOPK=1 and fused=None, an ensemble and k > MAX_K run the torch loop (fused=True says
    why); exclusions given as device tensors equal those given as arrays."""
    from genrec_fast.kernels.head_topk import MAX_K, head_topk
    torch.manual_seed(2)
    U, C, V = 8, 64, 3000
    x, w, w2 = torch.randn(U, C, device="cuda"), torch.randn(V, C, device="cuda") / 8, torch.randn(V, C, device="cuda")
    monkeypatch.setenv("GENREC_CUDA_HEAD_TOPK", "1")
    got = item_topk([Head(x, w, None), Head(x, w2 / 8, None)], 0, V, 10)
    want = item_topk_reference([x @ w.t(), x @ (w2 / 8).t()], 0, V, 10)
    np.testing.assert_array_equal(got[0], want[0])
    got = item_topk([Head(x, w, None)], 0, V, MAX_K + 1)
    np.testing.assert_array_equal(got[0], item_topk_reference([x @ w.t()], 0, V, MAX_K + 1)[0])
    with pytest.raises(ValueError, match="k must be in"):
        item_topk([Head(x, w, None)], 0, V, MAX_K + 1, fused=True)
    ptr = np.arange(0, 5 * U + 1, 5, dtype=np.int64)
    ex = np.random.default_rng(0).integers(0, V, size=5 * U)
    on_host = head_topk(x, w, None, 0, V, 10, ptr, ex)
    on_device = head_topk(x, w, None, 0, V, 10, torch.from_numpy(ptr).cuda(), torch.from_numpy(ex).cuda())
    for a, b in zip(on_host, on_device):
        assert torch.equal(a, b)


@gpu
def test_cuda_head_topk_takes_misaligned_and_strided_inputs():
    """A view 4 bytes past an aligned address, and a non-contiguous one: copied, not refused."""
    torch.manual_seed(1)
    flat = torch.randn(33 * 64 + 1, device="cuda")
    x = flat[1:].view(33, 64)  # contiguous, 4 bytes off a 16-byte boundary
    w = torch.randn(2000, 128, device="cuda")[:, ::2]  # (2000, 64), stride 2
    got = item_topk([Head(x, w, None)], 0, 2000, 10, fused=True)
    want = item_topk_reference([x @ w.t()], 0, 2000, 10)
    np.testing.assert_array_equal(got[0], want[0])


def test_emulated_kernel_at_the_largest_k(emu):
    """k = MAX_K (256) over a few splits shorter than k: every split returns all its items, the merge the best."""
    from genrec_fast.kernels.head_topk import MAX_K

    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    w = rng.standard_normal((700, 32)).astype(np.float32)
    got = run_emu(emu, x, w, None, 0, 700, MAX_K, splits=5)
    check_against_reference(got, x, w, None, 0, 700, MAX_K)
