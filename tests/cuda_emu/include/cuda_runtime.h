// CUDA emulation for tests (tests/cuda_emu/README.md): just enough of the runtime to run a kernel's
// fp32, fp16 and bf16 paths on the CPU, one std::thread per CUDA thread, blocks one after another. Not a CUDA.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;  // one per warp of the running block
inline std::vector<uint64_t> shfl_slots;                            // one per thread: shuffle exchange
inline std::vector<unsigned char> dynamic_smem_bytes;               // the block's dynamic shared memory

// Runs kernel() for every thread of every block of the grid, with `smem` bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel, size_t smem = 0) {
  block_dim = block;
  grid_dim = grid;
  const unsigned n = block.x * block.y * block.z;
  if (n % 32 != 0) std::abort();  // the emulated warps are whole
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        block_barrier = &bar;
        warp_barriers.clear();
        for (unsigned w = 0; w < n / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        shfl_slots.assign(n, 0);
        dynamic_smem_bytes.assign(smem + 16, 0);
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

// The dynamic shared memory of the running block (16-byte aligned), for `extern __shared__ T name[]`.
template <typename T>
T* dynamic_smem() {
  auto p = reinterpret_cast<std::uintptr_t>(dynamic_smem_bytes.data());
  return reinterpret_cast<T*>((p + 15) / 16 * 16);
}

// A warp shuffle: every lane of the warp publishes v, then reads lane src's (1-D blocks).
template <typename T>
T shuffle(T v, unsigned src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffled value fits 8 bytes");
  const unsigned t = thread_idx.x, warp = t / 32;
  std::memcpy(&shfl_slots[t], &v, sizeof(T));
  warp_barriers[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &shfl_slots[warp * 32 + (src & 31)], sizeof(T));
  warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return out;
}
}  // namespace genrec_emu

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return genrec_emu::shuffle(v, (genrec_emu::thread_idx.x % 32) ^ static_cast<unsigned>(lane_mask));
}
template <typename T>
T __shfl_sync(unsigned /*mask*/, T v, int src_lane) {
  return genrec_emu::shuffle(v, static_cast<unsigned>(src_lane));
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#define threadIdx (genrec_emu::thread_idx)
#define blockIdx (genrec_emu::block_idx)
#define blockDim (genrec_emu::block_dim)
#define gridDim (genrec_emu::grid_dim)
inline void __syncthreads() { genrec_emu::block_barrier->arrive_and_wait(); }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrComputeCapabilityMajor };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? 4 : 8;  // a small device of compute capability 8.x
  return cudaSuccess;
}
