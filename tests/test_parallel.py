"""csrc/parallel.h in both builds: the OpenMP region (what CMake builds where the compiler has OpenMP) and the
std::thread fork-join (compilers without it), compiled here with g++ from tests/cpp/parallel_check.cpp."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode, flags", [("openmp", ["-fopenmp"]), ("threads", [])])
def test_parallel_for_covers_every_index_once_and_rethrows(mode, flags, tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / f"parallel_{mode}"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-pthread", *flags, f"-I{ROOT / 'csrc'}",
                            str(ROOT / "tests" / "cpp" / "parallel_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode and flags and "omp" in build.stderr.lower():
        pytest.skip(f"the compiler has no OpenMP: {build.stderr[-200:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split() == [mode, "ok"], run.stdout + run.stderr
