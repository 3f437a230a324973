"""pytest-benchmark: the one-token model's recommend() against the SASRec-style full ranking, small sizes.

Run: python -m pytest benchmarks/ --benchmark-only. The full-size table (12,101 / 100,000 / 1,000,000 items,
peak RSS, the ratio): python benchmarks/bench_catalog.py --threads 2.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

import bench_catalog as bench  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-relative import)

N_ITEMS = 20_000


@pytest.fixture(scope="module")
def setup():
    rec, _ = bench.build(N_ITEMS)
    hist = bench.histories(N_ITEMS, 64)
    torch.manual_seed(0)
    codes, _ = bench.build(N_ITEMS, form="codes")
    cascade, _ = bench.build(N_ITEMS, form="cascade-20x20", levels=1, leaf=95)  # codes' top 20 reranked by one token
    hybrid, _ = bench.build(N_ITEMS, form="hybrid-50")  # one token with both biases + SASRec, each's top 50
    return (rec, bench.SASRec(N_ITEMS).eval(), hist, [[rec.catalog.item_ids[i] for i in h] for h in hist], codes,
            cascade, hybrid)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("path", ["genrec_fast one-step", "genrec_fast trie search", "genrec_fast codes",
                                  "genrec_fast cascade", "genrec_fast hybrid", "sasrec-style"])
def test_catalog_recommend(benchmark, setup, path, batch):
    rec, sasrec, hist, hist_ids, codes, cascade, hybrid = setup
    benchmark.group = f"catalog {N_ITEMS} items, batch {batch}"
    if path == "sasrec-style":
        fn = lambda: sasrec.recommend(bench.sasrec_batch(hist[:batch]), bench.TOP_K)  # noqa: E731
    elif path.endswith("codes"):  # collaborative codes: the C++ trie search over 2 levels + a unique token
        fn = lambda: codes.recommend(hist_ids[:batch], k=bench.TOP_K)  # noqa: E731
    elif path.endswith("cascade"):  # cascade.py: leaf-head codes with both biases, reranked by one token so
        fn = lambda: cascade.recommend(hist_ids[:batch], k=bench.TOP_K)  # noqa: E731
    elif path.endswith("hybrid"):  # hybrid.py: the one-token model with both biases and SASRec, each's top 50
        fn = lambda: hybrid.recommend(hist_ids[:batch], k=bench.TOP_K)  # noqa: E731
    else:
        backend = "auto" if path.endswith("one-step") else "cpp"
        fn = lambda: rec.recommend(hist_ids[:batch], k=bench.TOP_K, backend=backend)  # noqa: E731
    out = benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    assert len(out[0]) == batch if path == "sasrec-style" else len(out) == batch
