// CUDA emulation for tests: no tensor cores (the kernels' wmma code is compiled out below sm_80).
#pragma once
