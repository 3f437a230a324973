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
constexpr int64_t kMaxLanes = 16;  // the most rows a block of the row-vectorised kernel holds (`linear_many`)
constexpr int64_t kTransposeRows = 16;  // AVX2 + FMA, AVX-512: from this many rows on, w transposed once per call
constexpr int64_t kTileRows = 144;  // `outs_block`'s rows a tile (256 inputs: 144 kB)

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

// Many rows, weights transposed: Outs outputs in the vector lanes, Rows rows at a time, each x entry a scalar
// broadcast. wt (in, Outs) per block of Outs outputs (`transpose_weights`: once per call, the same for every row),
// so no x row is copied and each row's outputs are stored side by side; Rows x Outs accumulators in registers.
template <int64_t Rows, int64_t Outs>
inline __attribute__((always_inline)) void outs_block(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                      const float* __restrict wt, const float* __restrict bp,
                                                      int64_t out, float* y, int64_t ldy) {
  for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {  // a tile of x rows stays in cache over the output blocks
    const int64_t t1 = std::min(rows, t0 + kTileRows);
    for (int64_t o0 = 0; o0 < out; o0 += Outs) {
      const float* wb = wt + o0 * in;  // (in, Outs)
      const int64_t no = std::min(Outs, out - o0);
      for (int64_t i0 = t0; i0 < t1; i0 += Rows) {
        const int64_t nr = std::min(Rows, t1 - i0);
        const float* xs[Rows];  // the last block repeats its last row (computed, not written)
        for (int64_t r = 0; r < Rows; ++r) xs[r] = x + (i0 + std::min(r, nr - 1)) * ldx;
        float acc[Rows][Outs];
        for (int64_t r = 0; r < Rows; ++r) {
#pragma omp simd
          for (int64_t l = 0; l < Outs; ++l) acc[r][l] = bp[o0 + l];
        }
        for (int64_t c = 0; c < in; ++c) {
          const float* wc = wb + c * Outs;
          for (int64_t r = 0; r < Rows; ++r) {
            const float xv = xs[r][c];
#pragma omp simd
            for (int64_t l = 0; l < Outs; ++l) acc[r][l] += xv * wc[l];
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          float* yr = y + (i0 + r) * ldy + o0;
          if (no == Outs) {
#pragma omp simd
            for (int64_t l = 0; l < Outs; ++l) yr[l] = acc[r][l];
          } else {
            for (int64_t l = 0; l < no; ++l) yr[l] = acc[r][l];
          }
        }
      }
    }
  }
}

// wt (ceil(out / Outs) blocks of (in, Outs)) = w (out, in) transposed block by block, zero past `out`; bp the bias
// zero-padded to the blocks' width (zeros without one).
void transpose_weights(const float* w, const float* b, int64_t in, int64_t out, int64_t outs, float* wt, float* bp) {
  const int64_t padded = (out + outs - 1) / outs * outs;
  for (int64_t o0 = 0; o0 < padded; o0 += outs) {
    float* wb = wt + o0 * in;
    for (int64_t l = 0; l < outs; ++l) {
      const int64_t o = o0 + l;
      if (o < out) {
        const float* wo = w + o * in;
        for (int64_t c = 0; c < in; ++c) wb[c * outs + l] = wo[c];
      } else {
        for (int64_t c = 0; c < in; ++c) wb[c * outs + l] = 0.0f;
      }
    }
  }
  for (int64_t o = 0; o < padded; ++o) bp[o] = b && o < out ? b[o] : 0.0f;
}

// Weights transposed (`outs_block`), from kTransposeRows rows: AVX2 + FMA (16 registers) 6 rows x 16 outputs (two
// vectors), 12 accumulators; AVX-512 (32 registers) 5 rows x 32 outputs (two vectors), 10 accumulators (on an AMD
// EPYC with AVX-512, 5,120 rows: 102-112 GFLOP/s, against 98-110 for the AVX2 kernel and 70-82 for the AVX-512
// row-vectorised one; 8 x 32 gains 1-3% there and loses 10% on one user's 20 rows).
__attribute__((target("avx2,fma"))) void outs_avx2(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                   const float* wt, const float* bp, int64_t out, float* y,
                                                   int64_t ldy) {
  outs_block<6, 16>(x, rows, in, ldx, wt, bp, out, y, ldy);
}

__attribute__((target("avx512f,fma"))) void outs_avx512(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                       const float* wt, const float* bp, int64_t out, float* y,
                                                       int64_t ldy) {
  outs_block<5, 32>(x, rows, in, ldx, wt, bp, out, y, ldy);
}

// Rows in the lanes (`lanes_block`), kMinRows to kTransposeRows rows and the baseline build: AVX-512 16 rows x 8
// outputs, AVX2 + FMA 16 x 6 (12 accumulators), baseline SSE 8 x 6.
__attribute__((target("avx512f"))) void many_avx512(const float* x, int64_t rows, int64_t in, int64_t ldx,
                                                    const float* w, const float* b, int64_t out, float* y,
                                                    int64_t ldy, float* __restrict xt) {
  lanes_block<16, 8>(x, rows, in, ldx, w, b, out, y, ldy, xt);
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
  const Isa isa = cpu_isa();
  if (isa != Isa::kBase && rows >= kTransposeRows) {  // (the baseline kernel gained nothing so)
    const int64_t kOuts = isa == Isa::kAvx512 ? 32 : 16;  // two vectors of outputs
    thread_local std::vector<float> wt, bp;
    const int64_t padded = (out + kOuts - 1) / kOuts * kOuts;
    wt.resize(static_cast<size_t>(in * padded));
    bp.resize(static_cast<size_t>(padded));
    transpose_weights(w, b, in, out, kOuts, wt.data(), bp.data());
    if (isa == Isa::kAvx512) {
      outs_avx512(x, rows, in, ldx, wt.data(), bp.data(), out, y, ldy);
    } else {
      outs_avx2(x, rows, in, ldx, wt.data(), bp.data(), out, y, ldy);
    }
    return;
  }
  thread_local std::vector<float> xt;
  xt.resize(static_cast<size_t>(in * kMaxLanes));
  linear_many(x, rows, in, ldx, w, b, out, y, ldy, xt.data());
}

namespace {

inline __attribute__((always_inline)) void add_layer_norm_body(float* x, const float* r, int64_t rows, int64_t dim,
                                                               const float* w, const float* b, float eps) {
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

inline __attribute__((always_inline)) void gelu_body(float* x, int64_t n) {
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

__attribute__((target("avx2,fma"))) void add_layer_norm_avx2(float* x, const float* r, int64_t rows, int64_t dim,
                                                             const float* w, const float* b, float eps) {
  add_layer_norm_body(x, r, rows, dim, w, b, eps);
}

__attribute__((target("avx2,fma"))) void gelu_avx2(float* x, int64_t n) { gelu_body(x, n); }

// GELU on AVX-512: 1.43x the AVX2 build on an AMD EPYC (5,120 x 256, one thread: 954 -> 669 us); LayerNorm gained
// nothing there (its sums across lanes bound it), so it keeps the AVX2 build.
__attribute__((target("avx512f,fma"))) void gelu_avx512(float* x, int64_t n) { gelu_body(x, n); }

}  // namespace

// The AVX2 + FMA builds where the CPU has them (cpu_isa.h; LayerNorm on AVX-512 CPUs too, GELU there its own): the
// baseline build is SSE2.
void add_layer_norm(float* x, const float* r, int64_t rows, int64_t dim, const float* w, const float* b, float eps) {
  if (cpu_isa() == Isa::kBase) {
    add_layer_norm_body(x, r, rows, dim, w, b, eps);
  } else {
    add_layer_norm_avx2(x, r, rows, dim, w, b, eps);
  }
}

void gelu(float* x, int64_t n) {
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512) {
    gelu_avx512(x, n);
  } else if (isa == Isa::kAvx2Fma) {
    gelu_avx2(x, n);
  } else {
    gelu_body(x, n);
  }
}

}  // namespace genrec
