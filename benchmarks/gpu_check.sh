#!/usr/bin/env bash
# All GPU checks in one run (about 3-5 minutes on an H100): build with CUDA, kernel tests, attention
# benchmark. Logs and the markdown table go to OUTDIR.
# Usage: benchmarks/gpu_check.sh OUTDIR   (GENREC_CUDA_ARCHS=90 to pick the arch; default: this GPU's)
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -2
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Build only for this GPU's arch (faster than the default "80;90"), in a build dir of its own.
ARCHS=${GENREC_CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')}
echo "== build (CUDA archs $ARCHS)"
start=$(date +%s)
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" python -m pip install --no-build-isolation -v \
  --config-settings=build-dir=build/gpu_check . > "$OUT/build.log" 2>&1
echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
grep -E "genrec_fast:" "$OUT/build.log"
python -c "import torch, genrec_fast._core as c; assert torch.cuda.is_available(), 'torch sees no GPU'; \
assert c.has_cuda(), 'genrec_fast was built without the CUDA kernels'"

status=0
echo "== tests"
python -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_kernels.log" || status=1

echo "== attention benchmark"
python benchmarks/bench_attention.py --out "$OUT/bench_attention.md" 2>&1 | tee "$OUT/bench_attention.log" || status=1

# End-to-end recommend() on the GPU vs the CPU path.
if [[ -f benchmarks/bench_recommend_gpu.py ]]; then
  echo "== recommend() benchmark"
  python benchmarks/bench_recommend_gpu.py 2>&1 | tee "$OUT/bench_recommend_gpu.log" || status=1
fi

echo "== done (status $status); results in $OUT"
exit $status
