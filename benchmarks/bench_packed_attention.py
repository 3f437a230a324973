"""The encoder's self-attention at inference on a CPU: `kernels.packed_attention` (C++, sequences back to back)
against the padded PyTorch forms it replaced.

Shapes of the benchmark model (d_model 64, 2 heads) over histories of 5-20 items plus the mask piece (as
bench_catalog.py's): packed rows (N, 3C) in, (N, C) out. Peers, each from the same packed qkv:
  padded bmm   gather into (B, S, 3C), per head baddbmm + softmax + bmm on strided views, gather the real rows
               back (the code before 2026-12-06)
  padded SDPA  the same gathers around `F.scaled_dot_product_attention` with a key mask
Medians of --repeats calls, the three timed call by call in turn.

Usage: python benchmarks/bench_packed_attention.py [--threads 2] [--repeats 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from genrec_fast.kernels.packed_attention import packed_attention

H, C = 2, 64


def padded_inputs(lengths: torch.Tensor):
    B, S = len(lengths), int(lengths.max())
    mask = torch.arange(S)[None] < lengths[:, None]  # (B, S)
    rows = mask.reshape(-1).nonzero()[:, 0]  # (N,)
    slots = torch.zeros(B * S, dtype=torch.long)
    slots[rows] = torch.arange(len(rows))
    return B, S, mask, rows, slots


def padded_bmm(qkv, lengths, B, S, mask, rows, slots):
    t = qkv.index_select(0, slots).view(B, S, 3, H, C // H)
    bias = torch.zeros(B, 1, S).masked_fill_(~mask[:, None, :], float("-inf"))  # (B, 1, S)
    out = []
    for h in range(H):
        q, k, v = t[:, :, 0, h], t[:, :, 1, h], t[:, :, 2, h]  # 3 x (B, S, hd)
        p = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=(C // H) ** -0.5).softmax(dim=-1)  # (B, S, S)
        out.append(torch.bmm(p, v).view(B * S, -1).index_select(0, rows))
    return torch.cat(out, dim=1)  # (N, C)


def padded_sdpa(qkv, lengths, B, S, mask, rows, slots):
    t = qkv.index_select(0, slots).view(B, S, 3, H, C // H)
    q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return y.transpose(1, 2).reshape(B * S, C).index_select(0, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print("| users | rows | packed C++ ms | padded bmm ms | padded SDPA ms | bmm / C++ |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B in (1, 32, 256):
        lengths = torch.randint(6, 22, (B,), generator=g)
        qkv = torch.randn(int(lengths.sum()), 3 * C, generator=g)
        pad = padded_inputs(lengths)
        fns = {"packed": lambda: packed_attention(qkv, lengths, H), "bmm": lambda: padded_bmm(qkv, lengths, *pad),
               "sdpa": lambda: padded_sdpa(qkv, lengths, *pad)}
        ref = fns["bmm"]()
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), ref, atol=1e-4, rtol=1e-4)
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        m = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"| {B} | {len(qkv)} | {m['packed']:.3f} | {m['bmm']:.3f} | {m['sdpa']:.3f} | {m['bmm'] / m['packed']:.1f}x |")


if __name__ == "__main__":
    main()
