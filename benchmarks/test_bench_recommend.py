"""pytest-benchmark: genrec_fast (C++ and reference trie search) vs Hugging Face generate, small sizes.

Run: python -m pytest benchmarks/ --benchmark-only   (not collected by the normal `python -m pytest -q`,
whose testpaths is tests/). The full-size table: python benchmarks/bench_recommend.py. With a GPU, each
path also runs with both models on it (every path returns host lists, so each call ends synchronised).
"""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("pytest_benchmark")

import bench_recommend as bench  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-relative import)

PATHS = {
    "cpp": lambda s, h: bench.ours(s, h, "cpp"),
    "reference": lambda s, h: bench.ours(s, h, "reference"),
    "hf": lambda s, h: bench.hf_generate(s, h),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def setup(request):
    return bench.build(n_items=600, vocab=300, n_users=8, dims=bench.QUICK_DIMS, device=request.param)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("path", list(PATHS))
def test_recommend(benchmark, setup, path, batch):
    benchmark.group = f"recommend {setup.rec.device.type} batch {batch}"
    histories = setup.histories[:batch]
    out = benchmark.pedantic(PATHS[path], args=(setup, histories), rounds=5, warmup_rounds=1)
    assert len(out) == batch
