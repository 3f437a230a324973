// CUDA emulation for tests: the wmma API by its documented semantics (not its register layout). Each
// emulated thread holds the whole 16x16 tile of a fragment in float; loads read it all, mma_sync forms
// D = A B + C in float (the fp32 accumulation of tensor cores), and store_matrix_sync writes from lane 0
// of the warp only (the callers synchronise before reading it). Fragments of 16x16x16 only.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace nvcuda {
namespace wmma {
// The documented requirements a real GPU faults on: 256-bit aligned pointers, ldm a multiple of 16 bytes.
inline void check_operand(const void* p, unsigned ldm, unsigned elem_bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * elem_bytes) % 16 != 0) {
    std::fprintf(stderr, "wmma emulation: misaligned operand %p or ldm %u\n", p, ldm);
    std::abort();
  }
}

inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16x16x16 fragments only");
  float v[256];  // row-major (row, col) of the tile
};

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (float& e : f.v) e = x;
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm, sizeof(T));
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) f.v[m * 16 + k] = to_float(p[m * ldm + k]);
}

template <typename T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm, sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.v[k * 16 + n] = to_float(p[n * ldm + k]);
}

template <typename T, typename A, typename B>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, A>& a,
                     const fragment<matrix_b, 16, 16, 16, T, B>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += a.v[m * 16 + k] * b.v[k * 16 + n];
      out[m * 16 + n] = s;
    }
  for (int i = 0; i < 256; ++i) d.v[i] = out[i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm, 4);
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      if (layout == mem_row_major) p[m * ldm + n] = f.v[m * 16 + n];
      else p[n * ldm + m] = f.v[m * 16 + n];
    }
}
}  // namespace wmma
}  // namespace nvcuda
