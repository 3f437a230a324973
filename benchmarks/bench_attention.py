"""Times the fused attention kernel against PyTorch SDPA on the model's three attention shapes.

  encoder   self-attention, batch 256, 12 heads, dim 64, bf16, padded keys
  cross     64 users x 20 beams, one query per beam, sharing each user's K/V (length 64..256)
  decode    1280 beams, one new query over a KV cache of length 1..32

CUDA events, warm-up, median of repeats (each repeat times `--inner` back-to-back calls).
Usage: python benchmarks/bench_attention.py [--out results.md] [--repeats 30] [--warmup 10] [--inner 10]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from genrec_fast.kernels import attention

H, D, DTYPE = 12, 64, torch.bfloat16  # the model's heads, head dim and inference dtype
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_us(fn, warmup: int, repeats: int, inner: int) -> float:
    """Median microseconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(times)


def timed(fn, args, backend=None) -> float | None:
    """Median time, or None when the SDPA backend refuses these inputs (e.g. flash with a mask)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend is None:
                return time_us(fn, args.warmup, args.repeats, args.inner)
            with sdpa_kernel(backend):
                return time_us(fn, args.warmup, args.repeats, args.inner)
    except RuntimeError:
        return None


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def encoder_rows(args):
    rows = []
    for L in (64, 128, 256, 512):
        B = 256
        q, k, v = randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)
        lengths = torch.randint(L // 2, L + 1, (B,), device="cuda", dtype=torch.int32)
        mask = (torch.arange(L, device="cuda") < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        shape = f"B={B} L={L} H={H} D={D} padded"
        rows.append(("encoder", shape, "genrec", timed(lambda: attention(q, k, v, lengths, backend="cuda"), args)))
        rows.append(("encoder", shape, "sdpa-efficient (mask)", timed(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args, SDPBackend.EFFICIENT_ATTENTION)))
        rows.append(("encoder", shape, "sdpa-flash (no mask: lower bound)", timed(
            lambda: F.scaled_dot_product_attention(q, k, v), args, SDPBackend.FLASH_ATTENTION)))
    return rows


def cross_rows(args):
    rows = []
    U, G = 64, 20
    for Lk in (64, 128, 256):
        q, k, v = randn(U * G, H, 1, D), randn(U, H, Lk, D), randn(U, H, Lk, D)
        shape = f"{U} users x {G} beams, Lq=1, Lk={Lk}"

        def expanded(q=q, k=k, v=v, Lk=Lk):  # what a naive model does: copy K/V for every beam
            ke = k[:, None].expand(U, G, H, Lk, D).contiguous().view(U * G, H, Lk, D)
            ve = v[:, None].expand(U, G, H, Lk, D).contiguous().view(U * G, H, Lk, D)
            return F.scaled_dot_product_attention(q, ke, ve)

        rows.append(("cross", shape, "genrec", timed(lambda: attention(q, k, v, kv_group=G, backend="cuda"), args)))
        for name, backend in SDPA_BACKENDS.items():
            rows.append(("cross", shape, f"{name} expand+copy", timed(expanded, args, backend)))
            rows.append(("cross", shape, f"{name} fold", timed(
                lambda: attention(q, k, v, kv_group=G, backend="torch"), args, backend)))
    return rows


def decode_rows(args):
    rows = []
    B = 1280
    for Lk in (1, 8, 16, 32):
        q, k, v = randn(B, H, 1, D), randn(B, H, Lk, D), randn(B, H, Lk, D)
        shape = f"B={B} Lq=1 cache={Lk}"
        rows.append(("decode", shape, "genrec", timed(lambda: attention(q, k, v, backend="cuda"), args)))
        for name, backend in SDPA_BACKENDS.items():
            rows.append(("decode", shape, name, timed(lambda: F.scaled_dot_product_attention(q, k, v), args, backend)))
    return rows


def check_correctness() -> str:
    """One line per use: max |genrec - SDPA math| in bf16, so a fast but wrong kernel shows up here."""
    lines = []
    for name, (Bkv, G, Lq, Lk) in {"encoder": (8, 1, 77, 77), "cross": (4, 20, 1, 130), "decode": (64, 1, 1, 17)}.items():
        q, k, v = randn(Bkv * G, H, Lq, D), randn(Bkv, H, Lk, D), randn(Bkv, H, Lk, D)
        lengths = torch.randint(1, Lk + 1, (Bkv,), device="cuda", dtype=torch.int32)
        out = attention(q, k, v, lengths, kv_group=G, backend="cuda").float()
        with sdpa_kernel(SDPBackend.MATH):
            ref = attention(q.float(), k.float(), v.float(), lengths, kv_group=G, backend="torch")
        lines.append(f"- {name}: max |genrec - fp32 SDPA| = {(out - ref).abs().max().item():.3g}")
    return "\n".join(lines)


def table(rows) -> str:
    base = {(case, shape): t for case, shape, method, t in rows if method == "genrec"}
    out = ["| case | shape | method | median us | genrec speed-up |", "|---|---|---|---:|---:|"]
    for case, shape, method, t in rows:
        g = base.get((case, shape))
        us = "n/a" if t is None else f"{t:.1f}"
        speedup = "" if t is None or g is None or method == "genrec" else f"{t / g:.2f}x"
        out.append(f"| {case} | {shape} | {method} | {us} | {speedup} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--only", choices=["encoder", "cross", "decode"], help="run one group")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    groups = {"encoder": encoder_rows, "cross": cross_rows, "decode": decode_rows}
    rows = []
    for name, fn in groups.items():
        if args.only in (None, name):
            rows += fn(args)
    header = (f"# Attention benchmark\n\n{torch.cuda.get_device_name()}, torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}), {datetime.date.today()}; {DTYPE}, H={H}, D={D}; "
              f"median of {args.repeats} x {args.inner} calls after {args.warmup} warm-up calls.\n"
              f"Speed-up = method time / genrec time (> 1: genrec is faster).\n")
    report = f"{header}\n{table(rows)}\n\nCorrectness (bf16, random key lengths):\n{check_correctness()}\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
