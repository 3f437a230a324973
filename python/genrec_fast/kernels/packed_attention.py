"""Self-attention of variable-length sequences stored back to back: the encoder's real pieces at inference on
a CPU (`EncoderLayer.packed`), with no padding, no gather into a padded layout and none back.

`packed_attention` runs the C++ op (csrc/packed_attention.cpp: per sequence and head, the scores of a query
against all keys at once over the keys' lanes, a softmax, the weighted sum of values); `packed_attention_reference`
is the definition in PyTorch, one softmax per sequence and head. Same outputs to float rounding (tested).
"""
from __future__ import annotations

import torch

from ..native import core


def packed_attention(qkv: torch.Tensor, lengths: torch.Tensor, heads: int, threads: int | None = None) -> torch.Tensor:
    """qkv (N, 3C) on the CPU, each row [q | k | v] (heads side by side), the rows of sequence b following those of
    b - 1 in order; lengths (B,) their counts, summing to N -> (N, C), in qkv's dtype (computed in float32)."""
    if qkv.device.type != "cpu" or qkv.dim() != 2 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"qkv: expected a CPU tensor (N, 3 * C) with C divisible by heads={heads}, got "
                         f"{tuple(qkv.shape)} on {qkv.device}")
    N, C = qkv.shape[0], qkv.shape[1] // 3
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)  # (B + 1,)
    torch.cumsum(lengths.long(), 0, out=offsets[1:])
    if int(offsets[-1]) != N or (len(lengths) and int(lengths.min()) < 0):
        raise ValueError(f"lengths: expected counts >= 0 summing to the {N} rows of qkv, got a sum of {int(offsets[-1])}")
    x = qkv.float().contiguous()
    out = torch.empty(N, C)
    threads = torch.get_num_threads() if threads is None else threads
    core().packed_attention(x.data_ptr(), N, offsets.data_ptr(), len(lengths), heads, C // heads,
                            (C // heads) ** -0.5, out.data_ptr(), threads)
    return out if qkv.dtype == torch.float32 else out.to(qkv.dtype)


def packed_attention_reference(qkv: torch.Tensor, lengths: torch.Tensor, heads: int) -> torch.Tensor:
    """The definition: per sequence, softmax(q k^T / sqrt(hd)) v for each head -> (N, C)."""
    C = qkv.shape[1] // 3
    out = []
    for part in qkv.float().split(lengths.tolist()):  # (L, 3C)
        q, k, v = (t.reshape(len(part), heads, C // heads).transpose(0, 1) for t in part.split(C, dim=1))  # (H, L, hd)
        p = torch.softmax(q @ k.transpose(1, 2) / (C // heads) ** 0.5, dim=-1)  # (H, L, L)
        out.append((p @ v).transpose(0, 1).reshape(len(part), C))
    return torch.cat(out) if out else qkv.new_zeros(0, C, dtype=torch.float32)
