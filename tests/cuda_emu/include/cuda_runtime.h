// CUDA emulation for tests (tests/cuda_emu/README.md): just enough of the runtime to run a kernel's
// fp32, fp16 and bf16 paths on the CPU, one std::thread per CUDA thread, blocks one after another. Not a CUDA.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define GENREC_CUDA_EMU 1
#define __CUDA_ARCH__ 800  // an sm_80 device: the kernels' wmma paths run on the emulated wmma (mma.h)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static  // one copy, shared by the threads of the block that runs now
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) std::abort();  // a GPU faults on it
  return *p;
}
[[noreturn]] inline void __trap() { std::abort(); }

namespace genrec_emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// Runs kernel() for every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  block_dim = block;
  grid_dim = grid;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        block_barrier = &bar;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            block_idx = dim3(bx, by, bz);
            thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel();
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace genrec_emu

#define threadIdx (genrec_emu::thread_idx)
#define blockIdx (genrec_emu::block_idx)
#define blockDim (genrec_emu::block_dim)
#define gridDim (genrec_emu::grid_dim)
inline void __syncthreads() { genrec_emu::block_barrier->arrive_and_wait(); }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrComputeCapabilityMajor };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? 4 : 8;  // a small device of compute capability 8.x
  return cudaSuccess;
}
