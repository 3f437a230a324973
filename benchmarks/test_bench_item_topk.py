"""pytest-benchmark: the one-token head + top-k for a few users over 200,000 items, the fused C++ head (the
catalog split over the threads) against the matmul + C++ scan path and plain torch.

Run: python -m pytest benchmarks/test_bench_item_topk.py --benchmark-only. The table over sizes and user
counts: python benchmarks/bench_item_topk.py.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

import bench_item_topk as bench  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-relative import)
from genrec_fast.item_topk import Head, item_topk  # noqa: E402

N_ITEMS = 200_000


@pytest.fixture(scope="module")
def table():
    torch.manual_seed(0)
    return torch.randn(N_ITEMS, bench.DIM) * 0.1  # (V, d)


@pytest.mark.parametrize("users", [1, 4])
@pytest.mark.parametrize("path", ["fused", "matmul + scan", "torch"])
def test_item_topk_few_users(benchmark, table, path, users):
    benchmark.group = f"head + top-{bench.TOP_K}, {N_ITEMS:,} items, {users} users"
    x = torch.randn(users, bench.DIM)  # (U, d)
    if path == "torch":
        fn = lambda: bench.plain_torch(x, table)  # noqa: E731
    else:
        fn = lambda: item_topk([Head(x, table, None)], 0, N_ITEMS, bench.TOP_K, fused=path == "fused")  # noqa: E731
    items = benchmark.pedantic(fn, rounds=20, warmup_rounds=2)[0]
    assert tuple(items.shape) == (users, bench.TOP_K)


@pytest.mark.parametrize("users", [1, 256])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_item_topk_precision(benchmark, table, precision, users):
    """The fused head in float against the bfloat16 head (bf16_head.py; CPUs with AVX512-BF16): same items."""
    from genrec_fast import bf16_head
    if precision == "bfloat16" and not bf16_head.supported():
        pytest.skip("needs a CPU with AVX512-BF16")
    benchmark.group = f"head + top-{bench.TOP_K}, {N_ITEMS:,} items, {users} users: float32 / bfloat16"
    x = torch.randn(users, bench.DIM, generator=torch.Generator().manual_seed(users))  # (U, d)
    fn = lambda p: item_topk([Head(x, table, None)], 0, N_ITEMS, bench.TOP_K, precision=p)  # noqa: E731
    items = benchmark.pedantic(fn, args=(precision,), rounds=10, warmup_rounds=2)[0]
    assert (items == fn("float32")[0]).all()
