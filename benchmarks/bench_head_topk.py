"""The CUDA LM head + constrained top-k (kernels/head_topk.py) against torch: matmul, mask, topk.

Issue 22's target: >= 2x torch (matmul + topk) at 1M items. Per shape (users U, hidden C, vocabulary V,
dtype), k = 20, each user excluding 20 random items (its "history"), random weights; median of --repeats
calls after warm-up, timed with CUDA events, everything on the device (no host copies on either side):

  torch      logits = x @ W.T + b (U, V) in the dtype (the bias broadcast), excluded items set to -inf by a
             scatter, log-sum-exp and torch.topk over the item columns
  kernel     kernels.head_topk.head_topk: one launch + the torch merge of the splits (the logits never
             written); its exclusions as a CSR of device tensors, as torch's are on the device (item_topk
             uploads host arrays on every call, for its torch loop as for the kernel)

Both return the same k items (checked: agreement printed). Needs a GPU; on a CPU it says so and exits.

Usage: python benchmarks/bench_head_topk.py [--repeats 20] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import sys

import numpy as np
import torch

K, HISTORY = 20, 20
SHAPES = [  # (users, hidden, vocabulary)
    (32, 64, 12_101), (256, 64, 12_101), (256, 256, 12_101),
    (32, 64, 1_000_000), (256, 64, 1_000_000), (256, 256, 1_000_000),
]
QUICK = [(256, 64, 12_101), (256, 64, 1_000_000)]


def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls after 3 warm-up calls, by CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def run_shape(U: int, C: int, V: int, dtype: torch.dtype, repeats: int) -> dict:
    from genrec_fast.kernels.head_topk import head_topk

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(U, C, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, C, device="cuda", generator=g) / C**0.5).to(dtype)
    b = torch.randn(V, device="cuda", generator=g).to(dtype)
    ex = torch.randint(0, V, (U, HISTORY), device="cuda", generator=g)  # (U, H) excluded items
    ptr = torch.arange(0, U * HISTORY + 1, HISTORY, device="cuda")  # (U + 1,) the exclude CSR
    ex_items = ex.flatten()

    def torch_path():
        z = torch.addmm(b, x, w.t())  # (U, V)
        lse = z.logsumexp(1)
        z = z.scatter(1, ex, float("-inf"))
        top = torch.topk(z, K, dim=1)
        return top.indices, top.values, lse

    def kernel_path():
        return head_topk(x, w, b, 0, V, K, ptr, ex_items)

    t_torch, t_kernel = cuda_ms(torch_path, repeats), cuda_ms(kernel_path, repeats)
    agree = (torch_path()[0].sort(1).values == kernel_path()[0].sort(1).values).float().mean().item()
    return dict(U=U, C=C, V=V, dtype=str(dtype).replace("torch.", ""), torch_ms=t_torch, kernel_ms=t_kernel,
                speedup=t_torch / t_kernel, agree=agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="two shapes, bf16 only")
    args = ap.parse_args()
    from genrec_fast.kernels.head_topk import head_topk_available

    if not torch.cuda.is_available() or not head_topk_available():
        print("bench_head_topk: needs a CUDA GPU and genrec_fast built with the CUDA kernels; nothing to time")
        sys.exit(0)
    print(f"{datetime.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}; k={K}, "
          f"{HISTORY} excluded items per user; median of {args.repeats}")
    print("| users | hidden | items | dtype | torch matmul+topk ms | kernel ms | speedup | same items |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    dtypes = [torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16]
    for U, C, V in QUICK if args.quick else SHAPES:
        for dtype in dtypes:
            r = run_shape(U, C, V, dtype, args.repeats)
            print(f"| {r['U']} | {r['C']} | {r['V']:,} | {r['dtype']} | {r['torch_ms']:.3f} | {r['kernel_ms']:.3f} | "
                  f"{r['speedup']:.2f}x | {r['agree']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
