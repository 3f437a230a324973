#include "dense.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_isa.h"
#include "fast_exp.h"

namespace genrec {
namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats
constexpr int64_t kDots = 4;    // outputs per block of the dot kernel
constexpr int64_t kMinRows = 8;  // fewer rows run as dots: 16 lanes of rows would be mostly padding
constexpr int64_t kMaxLanes = 32;  // the most rows a block of the row-vectorised kernel holds (`linear_many`)
constexpr int64_t kWideRows = 64;  // AVX-512: blocks of 32 rows from this many rows on

// Few rows: each output a dot over `in`, in 16 vector lanes summed at the end (kDots dots over one x row at a time).
__attribute__((target_clones("avx512f", "avx2", "default")))
void linear_dots(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
                 float* y, int64_t ldy) {
  const int64_t full = in / kLanes * kLanes;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * ldx;
    for (int64_t o0 = 0; o0 < out; o0 += kDots) {
      const float* ws[kDots];  // the last block repeats its last output (computed, not written)
      for (int64_t o = 0; o < kDots; ++o) ws[o] = w + std::min(o0 + o, out - 1) * in;
      float acc[kDots][kLanes] = {};
      for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
        for (int64_t o = 0; o < kDots; ++o) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[o][l] += xi[c0 + l] * ws[o][c0 + l];
        }
      }
      for (int64_t o = 0; o < std::min(kDots, out - o0); ++o) {
        float s = 0.0f;
        for (int64_t c = full; c < in; ++c) s += xi[c] * ws[o][c];
#pragma omp simd reduction(+ : s)
        for (int64_t l = 0; l < kLanes; ++l) s += acc[o][l];
        y[i * ldy + o0 + o] = b ? s + b[o0 + o] : s;
      }
    }
  }
}

// Many rows: Lanes rows in the vector lanes (x transposed into xt (in, Lanes) per block), Outs outputs at a
// time, each weight a scalar broadcast: no horizontal sums. Lanes x Outs accumulators, sized per instruction set
// (`linear_many`) so that they stay in registers.
template <int64_t Lanes, int64_t Outs>
inline __attribute__((always_inline)) void lanes_block(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                       const float* w, const float* b, int64_t out, float* y,
                                                       int64_t ldy, float* __restrict xt) {
  for (int64_t i0 = 0; i0 < rows; i0 += Lanes) {
    const int64_t nr = std::min(Lanes, rows - i0);
    for (int64_t l = 0; l < Lanes; ++l) {  // x rows read in order, written down xt's columns
      const float* xl = x + (i0 + std::min(l, nr - 1)) * ldx;
      for (int64_t c = 0; c < in; ++c) xt[c * Lanes + l] = xl[c];
    }
    for (int64_t o0 = 0; o0 < out; o0 += Outs) {
      const float* ws[Outs];  // the last block repeats its last output (computed, not written)
      for (int64_t o = 0; o < Outs; ++o) ws[o] = w + std::min(o0 + o, out - 1) * in;
      float acc[Outs][Lanes] = {};
      for (int64_t c = 0; c < in; ++c) {
        const float* xc = xt + c * Lanes;
        for (int64_t o = 0; o < Outs; ++o) {
          const float wc = ws[o][c];
#pragma omp simd
          for (int64_t l = 0; l < Lanes; ++l) acc[o][l] += wc * xc[l];
        }
      }
      const int64_t no = std::min(Outs, out - o0);
      float bo[Outs];
      for (int64_t o = 0; o < Outs; ++o) bo[o] = b && o < no ? b[o0 + o] : 0.0f;
      for (int64_t l = 0; l < nr; ++l) {  // each row's outputs side by side
        float* yl = y + (i0 + l) * ldy + o0;
        for (int64_t o = 0; o < no; ++o) yl[o] = acc[o][l] + bo[o];
      }
    }
  }
}

// AVX-512 (32 registers): 32 rows (two vectors) x 6 outputs from kWideRows rows on (2 + 6 loads feed 12 FMAs, so
// the FMAs bound it: 1.4x 16 rows x 8 outputs at 3,700 rows x 64 -> 256), else 16 x 8. AVX2 + FMA (16
// registers): 16 rows (two vectors) x 6 outputs, 12 accumulators (32 x 6 spilled: 1.3-1.4x slower on an AMD
// EPYC, 5,120 rows). Baseline SSE: 8 x 6.
__attribute__((target("avx512f"))) void many_avx512(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                    const float* w, const float* b, int64_t out, float* y,
                                                    int64_t ldy, float* __restrict xt) {
  if (rows >= kWideRows) {
    lanes_block<32, 6>(x, rows, in, ldx, w, b, out, y, ldy, xt);
  } else {
    lanes_block<16, 8>(x, rows, in, ldx, w, b, out, y, ldy, xt);
  }
}

__attribute__((target("avx2,fma"))) void many_avx2(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                   const float* w, const float* b, int64_t out, float* y,
                                                   int64_t ldy, float* __restrict xt) {
  lanes_block<16, 6>(x, rows, in, ldx, w, b, out, y, ldy, xt);
}

void many_base(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
               float* y, int64_t ldy, float* __restrict xt) {
  lanes_block<8, 6>(x, rows, in, ldx, w, b, out, y, ldy, xt);
}

void linear_many(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b,
                 int64_t out, float* y, int64_t ldy, float* __restrict xt) {
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512) {
    many_avx512(x, rows, in, ldx, w, b, out, y, ldy, xt);
  } else if (isa == Isa::kAvx2Fma) {
    many_avx2(x, rows, in, ldx, w, b, out, y, ldy, xt);
  } else {
    many_base(x, rows, in, ldx, w, b, out, y, ldy, xt);
  }
}

}  // namespace

void linear(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
            float* y, int64_t ldy) {
  if (rows < kMinRows) {
    linear_dots(x, rows, in, ldx, w, b, out, y, ldy);
    return;
  }
  thread_local std::vector<float> xt;
  xt.resize(static_cast<size_t>(in * kMaxLanes));
  linear_many(x, rows, in, ldx, w, b, out, y, ldy, xt.data());
}

void add_layer_norm(float* x, const float* r, int64_t rows, int64_t dim, const float* w, const float* b, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    float* xi = x + i * dim;
    if (r) {
      const float* ri = r + i * dim;
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) xi[c] += ri[c];
    }
    float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < dim; ++c) mean += xi[c];
    mean /= static_cast<float>(dim);
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < dim; ++c) var += (xi[c] - mean) * (xi[c] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(dim) + eps);
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) xi[c] = (xi[c] - mean) * inv * w[c] + b[c];
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void gelu(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float z = std::fabs(x[i]) * 0.70710678118654752f;  // |x| / sqrt 2
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                        t * 1.061405429f))));
    const float erf_abs = 1.0f - poly * exp_nonpositive(-z * z);
    const float erf = x[i] < 0.0f ? -erf_abs : erf_abs;
    x[i] = 0.5f * x[i] * (1.0f + erf);
  }
}

}  // namespace genrec
