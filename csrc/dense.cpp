#include "dense.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_exp.h"

namespace genrec {
namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats
constexpr int64_t kOuts = 8;    // outputs per block of the row-vectorised kernel
constexpr int64_t kDots = 4;    // outputs per block of the dot kernel
constexpr int64_t kMinRows = 8;  // fewer rows run as dots: 16 lanes of rows would be mostly padding
constexpr int64_t kWide = 32;      // rows a block from kWideRows rows on (two vectors of lanes)
constexpr int64_t kWideOuts = 6;
constexpr int64_t kWideRows = 64;

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

// Many rows: 16 rows in the vector lanes (x transposed into xt (in, 16) per block), kOuts outputs at a time,
// each weight a scalar broadcast: no horizontal sums.
__attribute__((target_clones("avx512f", "avx2", "default")))
void linear_rows(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
                 float* y, int64_t ldy, float* __restrict xt) {
  for (int64_t i0 = 0; i0 < rows; i0 += kLanes) {
    const int64_t nr = std::min(kLanes, rows - i0);
    for (int64_t c = 0; c < in; ++c) {
      for (int64_t l = 0; l < kLanes; ++l) xt[c * kLanes + l] = l < nr ? x[(i0 + l) * ldx + c] : 0.0f;
    }
    for (int64_t o0 = 0; o0 < out; o0 += kOuts) {
      const float* ws[kOuts];
      for (int64_t o = 0; o < kOuts; ++o) ws[o] = w + std::min(o0 + o, out - 1) * in;
      float acc[kOuts][kLanes] = {};
      for (int64_t c = 0; c < in; ++c) {
        const float* xc = xt + c * kLanes;
        for (int64_t o = 0; o < kOuts; ++o) {
          const float wc = ws[o][c];
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[o][l] += wc * xc[l];
        }
      }
      for (int64_t o = 0; o < std::min(kOuts, out - o0); ++o) {
        const float bo = b ? b[o0 + o] : 0.0f;
        for (int64_t l = 0; l < nr; ++l) y[(i0 + l) * ldy + o0 + o] = acc[o][l] + bo;
      }
    }
  }
}

// Many more rows: 32 rows (two vectors) x kWideOuts outputs a block: 2 + kWideOuts loads feed 2 kWideOuts FMAs,
// so the FMAs, not the loads, bound it (1.4x the 16-row kernel's speed at 3,700 rows x 64 -> 256).
__attribute__((target_clones("avx512f", "avx2", "default")))
void linear_wide(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
                 float* y, int64_t ldy, float* __restrict xt) {
  for (int64_t i0 = 0; i0 < rows; i0 += kWide) {
    const int64_t nr = std::min(kWide, rows - i0);
    for (int64_t l = 0; l < kWide; ++l) {  // x rows read in order, written down xt's columns
      const float* xl = x + (i0 + std::min(l, nr - 1)) * ldx;
      for (int64_t c = 0; c < in; ++c) xt[c * kWide + l] = xl[c];
    }
    for (int64_t o0 = 0; o0 < out; o0 += kWideOuts) {
      const float* ws[kWideOuts];
      for (int64_t o = 0; o < kWideOuts; ++o) ws[o] = w + std::min(o0 + o, out - 1) * in;
      float acc[kWideOuts][kWide] = {};
      for (int64_t c = 0; c < in; ++c) {
        const float* xc = xt + c * kWide;
        for (int64_t o = 0; o < kWideOuts; ++o) {
          const float wc = ws[o][c];
#pragma omp simd
          for (int64_t l = 0; l < kWide; ++l) acc[o][l] += wc * xc[l];
        }
      }
      const int64_t no = std::min(kWideOuts, out - o0);
      float bo[kWideOuts];
      for (int64_t o = 0; o < kWideOuts; ++o) bo[o] = b && o < no ? b[o0 + o] : 0.0f;
      for (int64_t l = 0; l < nr; ++l) {  // each row's outputs side by side
        float* yl = y + (i0 + l) * ldy + o0;
        for (int64_t o = 0; o < no; ++o) yl[o] = acc[o][l] + bo[o];
      }
    }
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
  xt.resize(static_cast<size_t>(in * kWide));
  if (rows >= kWideRows) {
    linear_wide(x, rows, in, ldx, w, b, out, y, ldy, xt.data());
  } else {
    linear_rows(x, rows, in, ldx, w, b, out, y, ldy, xt.data());
  }
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
