"""Builds a kernel file of cuda/ for the CPU emulation (tests/cuda_emu) into a shared library for ctypes."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

EMU_DIR = Path(__file__).parent / "cuda_emu"


def build(wrapper: str, tmp_path_factory) -> ctypes.CDLL:
    """g++ tests/cuda_emu/<wrapper> (which includes a cuda/*.cu) -> the loaded library; skips without g++."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    lib = tmp_path_factory.mktemp("emu") / (Path(wrapper).stem + ".so")
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{EMU_DIR / 'include'}",
                          "-x", "c++", str(EMU_DIR / wrapper), "-o", str(lib)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"building the CUDA emulation of {wrapper} failed:\n{res.stderr[-3000:]}")
    return ctypes.CDLL(str(lib))
