"""Attention for the encoder, beam cross-attention and cached decoding, with a PyTorch reference.

q (Bq, H, Lq, D) attends to k, v (Bkv, H, Lk, D) with Bq = Bkv * kv_group: query batch b reads
K/V batch b // kv_group, so the beams of one user share that user's K/V and it is never copied per
beam. key_lengths (Bkv,) masks the padding keys of each K/V batch.

backend="cuda" runs the fused kernel of cuda/attention.cu (fp16/bf16/fp32, head dims 32/64/128);
backend="torch" runs F.scaled_dot_product_attention with the beams folded into the query length;
backend="auto" takes the kernel where it measured faster than SDPA on an H100 (one query row per
batch over at most `KERNEL_MAX_KEYS` keys: cached decoding and beam cross-attention over short
histories) and PyTorch otherwise (encoder self-attention, long inputs, CPU tensors).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_reference", "cuda_kernels_available"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda/attention.h AttnDType
_HEAD_DIMS = (32, 64, 128)  # head dims the kernel is compiled for
_BACKENDS = ("auto", "cuda", "torch")
# H100, bf16, 12 heads of 64 (benchmarks/README.md, 2026-11-27): with one query row the kernel beat
# SDPA up to 64 keys (decode 1.3-3.9x, 20-beam cross-attention 1.2-1.4x), tied at 128 and lost at 256
# (0.5x). A tiled kernel for many query rows lost to SDPA at every length measured (0.1-0.6x) and was
# removed; backend="cuda" runs the one kernel on any shape (correct, slower than SDPA on the encoder).
KERNEL_MAX_KEYS = 64


def _native():
    """The compiled extension, imported on first use; None when it is missing."""
    try:
        from genrec_fast import _core
    except ImportError:
        return None
    return _core


def cuda_kernels_available() -> bool:
    """True when the extension was built with the CUDA attention kernels."""
    native = _native()
    return native is not None and bool(native.has_cuda())


def _check(q, k, v, key_lengths, kv_group) -> None:
    """Validates the arguments once; raises ValueError naming the bad one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-d tensor (batch, H, L, D), got {got}")
    if isinstance(kv_group, bool) or not isinstance(kv_group, int) or kv_group < 1:
        raise ValueError(f"kv_group: expected a positive int, got {kv_group!r}")
    Bq, H, _, D = q.shape
    Bkv, Hk, Lk, Dk = k.shape
    if Bkv * kv_group != Bq or Hk != H or Dk != D or Lk < 1:
        raise ValueError(
            f"k: expected shape (Bkv, H, Lk, D) with Bkv*kv_group == q.shape[0], H == {H}, D == {D} "
            f"and Lk >= 1; got {tuple(k.shape)} with kv_group={kv_group}, q.shape={tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q: expected a floating-point dtype, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dim must be contiguous (stride 1), got strides "
                             f"{t.stride()}; call .contiguous()")
    if key_lengths is not None:
        _check_key_lengths(key_lengths, Bkv, Lk, q.device)


def _check_key_lengths(key_lengths, Bkv: int, Lk: int, device: torch.device) -> None:
    if not isinstance(key_lengths, torch.Tensor) or key_lengths.shape != (Bkv,):
        got = tuple(key_lengths.shape) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
        raise ValueError(f"key_lengths: expected a tensor of shape (Bkv,) = ({Bkv},), got {got}")
    if key_lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_lengths: expected dtype int32 or int64, got {key_lengths.dtype}")
    if key_lengths.device != device:
        raise ValueError(f"key_lengths: expected device {device} (the device of q), got {key_lengths.device}")
    if device.type == "cpu" and Bkv > 0:  # on a GPU this check would synchronise; the kernel clamps
        lo, hi = int(key_lengths.min()), int(key_lengths.max())
        if lo < 1 or hi > Lk:
            raise ValueError(f"key_lengths: expected values in [1, Lk={Lk}], got min {lo}, max {hi}")


def _cuda_unsupported(q: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot run on q (None when it can)."""
    if q.device.type != "cuda":
        return f"q is on {q.device}, not a CUDA device"
    if q.dtype not in _DTYPE_CODES:
        return f"dtype {q.dtype} is not one of float32, float16, bfloat16"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {_HEAD_DIMS}"
    if not cuda_kernels_available():
        return "genrec_fast._core was built without the CUDA kernels (no nvcc at build time)"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
              kv_group: int = 1, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale) v, query batch b attending to K/V batch b // kv_group.

    q: (Bq, H, Lq, D); k, v: (Bkv, H, Lk, D) with Bq = Bkv * kv_group; key_lengths: int (Bkv,) or
    None, keys at positions >= key_lengths[b] are masked (values in [1, Lk]); scale defaults to
    1 / sqrt(D). Any strides are accepted as long as the last dim is contiguous, so (B, L, H, D)
    tensors can be passed as .transpose(1, 2) views. Returns (Bq, H, Lq, D) in q's dtype.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    _check(q, k, v, key_lengths, kv_group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        return _attention_torch(q, k, v, key_lengths, kv_group, scale)
    reason = _cuda_unsupported(q)
    if reason is None and (backend == "cuda" or (q.shape[2] == 1 and k.shape[2] <= KERNEL_MAX_KEYS)):
        return _attention_cuda(q, k, v, key_lengths, kv_group, scale)
    if backend == "cuda":
        raise RuntimeError(f"attention(backend='cuda') is unavailable: {reason}")
    return _attention_torch(q, k, v, key_lengths, kv_group, scale)


BMM_MAX_KEYS = 128  # CPU: up to here one baddbmm + softmax + bmm beat SDPA's kernel (22 keys: 0.8 vs 1.7 ms)


def _attention_torch(q, k, v, key_lengths, kv_group: int, scale: float) -> torch.Tensor:
    """SDPA (or, for short keys on a CPU, batched matmuls) with the group folded into the query length:
    K/V are never copied per beam."""
    Bq, H, Lq, D = q.shape
    Bkv, _, Lk, _ = k.shape
    qf = q.reshape(Bkv, kv_group, H, Lq, D).transpose(1, 2).reshape(Bkv, H, kv_group * Lq, D)
    if q.device.type == "cpu" and Lk <= BMM_MAX_KEYS:
        o = _attention_bmm(qf, k, v, key_lengths, scale)
    else:
        mask = None
        if key_lengths is not None:
            keep = torch.arange(Lk, device=q.device) < key_lengths[:, None]  # (Bkv, Lk)
            mask = keep[:, None, None, :]  # (Bkv, 1, 1, Lk)
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)  # (Bkv, H, G*Lq, D)
    return o.reshape(Bkv, H, kv_group, Lq, D).transpose(1, 2).reshape(Bq, H, Lq, D)


def _attention_bmm(q, k, v, key_lengths, scale: float) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, H, S, D) -> (B, H, L, D): scores, masked softmax and values as 3-D bmm."""
    B, H, L, D = q.shape
    S = k.shape[2]
    if key_lengths is None:
        s = torch.bmm(q.reshape(B * H, L, D), k.reshape(B * H, S, D).transpose(1, 2)).mul_(scale)  # (BH, L, S)
    else:
        pad = torch.zeros(B, S, dtype=q.dtype, device=q.device).masked_fill_(
            torch.arange(S, device=q.device) >= key_lengths[:, None], float("-inf"))  # (B, S)
        bias = pad[:, None, None, :].expand(B, H, L, S).reshape(B * H, L, S)
        s = torch.baddbmm(bias, q.reshape(B * H, L, D), k.reshape(B * H, S, D).transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(s, dim=-1), v.reshape(B * H, S, D)).view(B, H, L, D)


def _attention_cuda(q, k, v, key_lengths, kv_group: int, scale: float) -> torch.Tensor:
    """The fused kernel on raw pointers, on the current stream of q's device."""
    Bq, H, Lq, D = q.shape
    Bkv, _, Lk, _ = k.shape
    out = torch.empty((Bq, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    lengths = None if key_lengths is None else key_lengths.to(torch.int32).contiguous()
    with torch.cuda.device(q.device):
        _native().attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            0 if lengths is None else lengths.data_ptr(), _DTYPE_CODES[q.dtype],
            Bkv, H, Lq, Lk, D, q.stride(), k.stride(), v.stride(), out.stride(),
            kv_group, scale, torch.cuda.current_stream(q.device).cuda_stream)
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
                        kv_group: int = 1, scale: float | None = None) -> torch.Tensor:
    """The same attention by plain fp32 matmul + softmax, for tests; returns fp32 (Bq, H, Lq, D)."""
    _check(q, k, v, key_lengths, kv_group)
    Bq, H, Lq, D = q.shape
    Bkv, _, Lk, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = q.float().reshape(Bkv, kv_group, H, Lq, D)
    s = torch.matmul(qf, k.float()[:, None].transpose(-1, -2)) * scale  # (Bkv, G, H, Lq, Lk)
    if key_lengths is not None:
        pad = torch.arange(Lk, device=q.device) >= key_lengths[:, None]  # (Bkv, Lk)
        s = s.masked_fill(pad[:, None, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.float()[:, None]).reshape(Bq, H, Lq, D)  # (Bq, H, Lq, D)
