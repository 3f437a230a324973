#!/usr/bin/env bash
# An older revision of genrec_fast as the package `genrec_old` in OUT, for benchmarks/ab_versions.py:
#   bash benchmarks/ab_build_old.sh REV OUT        (run from the repository; ~1-2 min: builds REV's C++ core)
# Its core is built under a pybind11 ABI tag of its own (PYBIND11_COMPILER_TYPE), so that both versions' classes
# can be registered in one process.
set -euo pipefail
rev=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
src=$(mktemp -d)
git worktree add -q --detach "$src" "$rev"
trap 'git worktree remove --force "$src"' EXIT
echo 'target_compile_definitions(_core PRIVATE [[PYBIND11_COMPILER_TYPE="_ab_old"]])' >> "$src/CMakeLists.txt"
python -m pip wheel -q --no-deps -w "$src/wheel" "$src"
(cd "$src/wheel" && python -m zipfile -e ./*.whl unpacked)
rm -rf "$out/genrec_old"
cp -r "$src/python/genrec_fast" "$out/genrec_old"
cp "$src"/wheel/unpacked/genrec_fast/_core*.so "$out/genrec_old/"
# every module, the kernels/ subpackage too (its `from genrec_fast import _core` would load the new core)
find "$out/genrec_old" -name '*.py' -exec sed -i 's/from genrec_fast import/from genrec_old import/; s/import genrec_fast$/import genrec_old/' {} +
echo "$out/genrec_old: genrec_fast at $(git rev-parse --short "$rev")"
