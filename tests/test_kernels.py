"""Attention backends against the fp32 reference: the PyTorch path on CPU, the CUDA kernel on a GPU and, in CI,
on CPU threads through the CUDA emulation (tests/cuda_emu)."""
import importlib
import pytest
import torch

from genrec_fast import _core
from genrec_fast.kernels import attention, attention_reference
from genrec_fast.kernels.attention import _attention_cuda

LENGTHS = (1, 7, 97)
CUDA_OK = torch.cuda.is_available() and _core.has_cuda()
needs_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs an NVIDIA GPU and genrec_fast built with the CUDA kernels (nvcc found at build time)")


def make_inputs(Bkv, kv_group, H, Lq, Lk, D, dtype=torch.float32, device="cpu", padded=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Bkv * kv_group, H, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(Bkv, H, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(Bkv, H, Lk, D, generator=g).to(device=device, dtype=dtype)
    lengths = None
    if padded:  # the first batch keeps every key, the others lose up to half of them
        lengths = torch.randint(max(1, Lk // 2), Lk + 1, (Bkv,), generator=g)
        lengths[0] = Lk
        lengths = lengths.to(device=device, dtype=torch.int32)
    return q, k, v, lengths


# ---------------------------------------------------------------- CPU: the PyTorch backend


def test_has_cuda_is_bool():
    assert isinstance(_core.has_cuda(), bool)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_group", [1, 20])
@pytest.mark.parametrize("Lk", LENGTHS)
@pytest.mark.parametrize("Lq", LENGTHS)
def test_torch_backend_matches_reference(Lq, Lk, kv_group, padded):
    q, k, v, lengths = make_inputs(2, kv_group, 3, Lq, Lk, 32, padded=padded)
    out = attention(q, k, v, lengths, kv_group=kv_group, backend="torch")
    ref = attention_reference(q, k, v, lengths, kv_group=kv_group)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq", [1, 7])
def test_shared_kv_equals_kv_copied_per_beam(Lq):
    G = 20
    q, k, v, lengths = make_inputs(3, G, 2, Lq, 9, 32, padded=True)
    shared = attention(q, k, v, lengths, kv_group=G, backend="torch")
    copied = attention(q, k.repeat_interleave(G, 0), v.repeat_interleave(G, 0),
                       lengths.repeat_interleave(G, 0), kv_group=1, backend="torch")
    torch.testing.assert_close(shared, copied, atol=1e-6, rtol=1e-6)


def test_padding_keys_are_ignored():
    q, k, v, _ = make_inputs(2, 1, 2, 5, 8, 32)
    lengths = torch.tensor([8, 3])
    out = attention(q, k, v, lengths, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:] = 1e4  # garbage in the padding must not leak into the output
    v2[1, :, 3:] = -1e4  # (finite: SDPA multiplies masked values by 0, and 0 * nan is nan)
    out2 = attention(q, k2, v2, lengths, backend="torch")
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out[1], attention_reference(q[1:], k[1:, :, :3], v[1:, :, :3])[0])


def test_blhd_views_and_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 2, 32, generator=g)  # (B, L, H, D)
    y = torch.randn(2, 5, 2, 32, generator=g)
    q, k, v = x.transpose(1, 2), y.transpose(1, 2), (2 * y).transpose(1, 2)  # (B, H, L, D) views
    out = attention(q, k, v, kv_group=2, scale=0.3, backend="torch")
    ref = attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), kv_group=2, scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Lq, Lk", [(1, 7), (5, 7), (1, 200), (3, 129)])
def test_auto_backend_on_cpu_never_runs_the_kernel_and_is_correct(Lq, Lk, monkeypatch):
    """On CPU tensors "auto" is the torch path (batched matmuls up to BMM_MAX_KEYS keys, SDPA beyond)."""
    A = importlib.import_module("genrec_fast.kernels.attention")  # the module (the package exports a function of that name)
    monkeypatch.setattr(A, "_attention_cuda", lambda *a, **kw: pytest.fail("the CUDA kernel ran on CPU tensors"))
    q, k, v, lengths = make_inputs(2, 4, 2, Lq, Lk, 64, padded=True)
    out = attention(q, k, v, lengths, kv_group=4)
    torch.testing.assert_close(out, attention_reference(q, k, v, lengths, kv_group=4), atol=1e-5, rtol=1e-5)


def test_cuda_backend_on_cpu_tensors_raises():
    q, k, v, _ = make_inputs(1, 1, 1, 2, 3, 32)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------- argument validation


def _bad(**changes):
    q, k, v, lengths = make_inputs(2, 3, 2, 4, 5, 32, padded=True)
    args = dict(q=q, k=k, v=v, key_lengths=lengths, kv_group=3)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, match", [
    (dict(q=torch.zeros(6, 2, 32)), "q: expected a 4-d tensor"),
    (dict(k=torch.zeros(3, 2, 5, 32)), r"k: expected shape \(Bkv, H, Lk, D\) with Bkv\*kv_group == q.shape\[0\]"),
    (dict(k=torch.zeros(2, 2, 5, 16)), "k: expected shape"),
    (dict(k=torch.zeros(2, 4, 5, 32)), "k: expected shape"),
    (dict(k=torch.zeros(2, 2, 0, 32), v=torch.zeros(2, 2, 0, 32)), "k: expected shape"),
    (dict(v=torch.zeros(2, 2, 6, 32)), "v: expected the shape of k"),
    (dict(v=torch.zeros(2, 2, 5, 32, dtype=torch.float64)), "v: expected dtype"),
    (dict(q=torch.zeros(6, 2, 4, 32, dtype=torch.int64)), "q: expected a floating-point dtype"),
    (dict(k=torch.zeros(2, 2, 32, 5).transpose(-1, -2)), "k: the last .* must be contiguous"),
    (dict(kv_group=0), "kv_group: expected a positive int"),
    (dict(kv_group=1.5), "kv_group: expected a positive int"),
    (dict(key_lengths=torch.tensor([5, 5, 5])), r"key_lengths: expected a tensor of shape \(Bkv,\)"),
    (dict(key_lengths=torch.tensor([5.0, 5.0])), "key_lengths: expected dtype int32 or int64"),
    (dict(key_lengths=torch.tensor([5, 6])), r"key_lengths: expected values in \[1, Lk=5\]"),
    (dict(key_lengths=torch.tensor([0, 5])), "key_lengths: expected values"),
    (dict(key_lengths=[5, 5]), "key_lengths: expected a tensor"),
])
def test_bad_arguments_raise_value_error_naming_them(changes, match):
    with pytest.raises(ValueError, match=match):
        attention(**_bad(**changes), backend="torch")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend: expected one of"):
        attention(**_bad(), backend="triton")


def test_reference_validates_too():
    with pytest.raises(ValueError, match="k: expected shape"):
        attention_reference(**_bad(k=torch.zeros(3, 2, 5, 32)))


# ---------------------------------------------------------------- CUDA: the fused kernel


def _max_err(x, ref):
    return (x.float() - ref).abs().max().item()


def _check_against_sdpa(q, k, v, lengths, kv_group):
    """Kernel error vs the fp32 reference is at most 2x PyTorch's own error in the same dtype."""
    ref = attention_reference(q, k, v, lengths, kv_group=kv_group)
    out = _attention_cuda(q, k, v, lengths, kv_group, q.shape[-1] ** -0.5)
    base = attention(q, k, v, lengths, kv_group=kv_group, backend="torch")
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err, base_err = _max_err(out, ref), _max_err(base, ref)
    assert err <= 2 * base_err + 1e-6, f"kernel error {err:.3g} > 2 x SDPA error {base_err:.3g}"


# (kv_group, Lq, Lk, padded): encoder self-attention, beam cross-attention, cached decoding.
CUDA_CASES = [
    (1, 1, 1, False), (1, 7, 7, True), (1, 97, 97, True), (1, 1025, 1025, True),
    (1, 1, 97, False), (1, 7, 1025, True), (1, 97, 1, False), (1, 1025, 7, False),
    (20, 1, 7, False), (20, 1, 97, True), (20, 1, 1025, True), (20, 7, 97, True),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kv_group, Lq, Lk, padded", CUDA_CASES)
def test_cuda_kernel_matches_reference(kv_group, Lq, Lk, padded, dtype, D):
    q, k, v, lengths = make_inputs(2, kv_group, 3, Lq, Lk, D, dtype, "cuda", padded)
    _check_against_sdpa(q, k, v, lengths, kv_group)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kv_group, Lq, Lk", [(1, 1, 97), (20, 1, 130), (3, 5, 65), (1, 70, 200)])
def test_cuda_kernel_on_every_shape(kv_group, Lq, Lk):
    """The one kernel (built for few rows) is also right where the dispatch would send SDPA."""
    q, k, v, lengths = make_inputs(3, kv_group, 2, Lq, Lk, 64, torch.bfloat16, "cuda", padded=True)
    _check_against_sdpa(q, k, v, lengths, kv_group)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("Lq", [1, 97])
def test_cuda_strided_blhd_views(Lq):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, Lq, 4, 64, generator=g).to("cuda", torch.float16)  # (B, L, H, D)
    kv = torch.randn(2, 33, 2, 4, 64, generator=g).to("cuda", torch.float16)  # (B, L, 2, H, D) fused K/V
    q, k, v = x.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    lengths = torch.tensor([33, 20], device="cuda")  # int64 is accepted
    _check_against_sdpa(q, k, v, lengths, 4)
    out = attention(q, k, v, lengths, kv_group=4, backend="cuda")
    torch.testing.assert_close(out, _attention_cuda(q.contiguous(), k.contiguous(), v.contiguous(),
                                                    lengths, 4, 64 ** -0.5))


@pytest.mark.cuda
@needs_cuda
def test_cuda_padding_keys_are_ignored_and_auto_picks_kernel():
    q, k, v, _ = make_inputs(2, 5, 2, 1, 40, 64, torch.float16, "cuda")
    lengths = torch.tensor([40, 3], dtype=torch.int32, device="cuda")
    out = attention(q, k, v, lengths, kv_group=5)
    k[1, :, 3:] = 1e4
    v[1, :, 3:] = float("nan")
    torch.testing.assert_close(attention(q, k, v, lengths, kv_group=5, backend="cuda"), out)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("Lq, Lk, kernel", [(1, 64, True), (1, 65, False), (7, 7, False), (97, 97, False)])
def test_auto_takes_the_kernel_only_where_it_measured_faster(Lq, Lk, kernel, monkeypatch):
    A = importlib.import_module("genrec_fast.kernels.attention")  # the module (the package exports a function of that name)
    calls, real = [], A._attention_cuda
    monkeypatch.setattr(A, "_attention_cuda", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, lengths = make_inputs(2, 3, 2, Lq, Lk, 64, torch.bfloat16, "cuda", padded=True)
    out = attention(q, k, v, lengths, kv_group=3)
    assert bool(calls) == kernel  # which path ran, not only what it returned
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, lengths, kv_group=3), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@needs_cuda
def test_cuda_runs_on_the_current_stream():
    q, k, v, lengths = make_inputs(4, 20, 2, 1, 64, 64, torch.bfloat16, "cuda", padded=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = attention(q, k, v, lengths, kv_group=20, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out.float(), attention_reference(q, k, v, lengths, kv_group=20), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("item_tokens", ["pieces", "whole"])
def test_recommend_on_cuda_matches_cpu(item_tokens):
    """The whole search on the GPU (CUDA attention, fp32) ranks as the CPU path does."""
    from genrec_fast import ModelConfig, Recommender
    items = list(range(1, 301))
    cfg = ModelConfig(d_model=64, encoder_layers=2, decoder_layers=2, n_heads=4, ffn_dim=128)
    rec = Recommender.random(items, cfg, vocab_size=300, seed=3, item_tokens=item_tokens)
    rng = torch.Generator().manual_seed(4)
    histories = [torch.randint(1, 301, (n,), generator=rng).tolist() for n in (1, 5, 20, 37, 3, 12)]
    cpu = rec.recommend(histories, k=10, num_beams=10)
    rec.model.to("cuda")
    gpu = rec.recommend(histories, k=10, num_beams=10)
    for c, g in zip(cpu, gpu):
        assert c.items == g.items
        torch.testing.assert_close(torch.tensor(g.scores), torch.tensor(c.scores), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the kernel on CPU threads (tests/cuda_emu)
# cuda/attention.cu compiled by g++ against the CUDA emulation (shared memory, __syncthreads, warp shuffles):
# the decode kernel's indexing, tiling, online softmax and output casts, checked in CI without a GPU.

_EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def attn_emu(tmp_path_factory):
    from emu import build  # tests/emu.py

    return build("attention_emu.cpp", tmp_path_factory)


def _emulated(lib, q, k, v, lengths, kv_group, scale):
    """The kernel on CPU threads: q, k, v CPU tensors of any strides (dim stride 1) -> out (Bq, H, Lq, D)."""
    import ctypes

    out = torch.empty(q.shape, dtype=q.dtype)
    lens = None if lengths is None else lengths.to(torch.int32).contiguous()
    strides = (ctypes.c_longlong * 16)(*[s for t in (q, k, v, out) for s in t.stride()])
    err = ctypes.create_string_buffer(256)
    ll = ctypes.c_longlong
    rc = lib.emu_attention(
        ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()), ctypes.c_void_p(v.data_ptr()),
        ctypes.c_void_p(out.data_ptr()), None if lens is None else ctypes.c_void_p(lens.data_ptr()),
        ctypes.c_int(_EMU_DTYPES[q.dtype]), ll(k.shape[0]), ll(q.shape[1]), ll(q.shape[2]), ll(k.shape[2]),
        ll(q.shape[3]), strides, ll(kv_group), ctypes.c_float(scale), err, ll(256))
    if rc:
        raise RuntimeError(err.value.decode())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("kv_group, Lq, Lk, padded", [(1, 1, 1, False), (20, 1, 7, True), (3, 2, 97, True),
                                                      (1, 40, 33, False)])
def test_emulated_kernel_matches_reference(attn_emu, kv_group, Lq, Lk, padded, dtype, D):
    """Error against the fp32 reference on the same rounded inputs: at most 2x the torch backend's own in
    that dtype (fp32: 1e-5), as the GPU tests ask."""
    q, k, v, lengths = make_inputs(2, kv_group, 2, Lq, Lk, D, dtype, padded=padded, seed=D + Lk)
    out = _emulated(attn_emu, q, k, v, lengths, kv_group, D ** -0.5)
    ref = attention_reference(q.float(), k.float(), v.float(), lengths, kv_group=kv_group)
    err = _max_err(out, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        base = attention(q.float(), k.float(), v.float(), lengths, kv_group=kv_group, backend="torch").to(dtype)
        assert err <= 2 * _max_err(base, ref) + 1e-6, (err, _max_err(base, ref))


def test_emulated_kernel_strided_views_and_empty_keys(attn_emu):
    """(B, L, H, D) storage passed as transposed views; a batch with key length 0 gets zeros."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 2, 64, generator=g)  # (B, L, H, D)
    kv = torch.randn(2, 9, 2, 2, 64, generator=g)  # (B, L, 2, H, D)
    q, k, v = x.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    lengths = torch.tensor([9, 0])
    out = _emulated(attn_emu, q, k, v, lengths, 3, 0.125)
    ref = attention_reference(q, k, v, torch.tensor([9, 1]), kv_group=3, scale=0.125)
    assert _max_err(out[:3], ref[:3]) <= 1e-5
    assert (out[3:] == 0).all()
