// Dense layers on a few rows, for the C++ forward of small batches (first_step.cpp): row-major float32,
// one thread, no allocation.
#pragma once

#include <cstdint>

namespace genrec {

// y[i, o] = x[i, :] . w[o, :] + b[o] for rows i, outputs o: x (rows, in) with leading dimension ldx,
// w (out, in) row-major as nn.Linear stores it (read in place, never transposed), b (out,) or nullptr,
// y (rows, out) with leading dimension ldy. Each dot sums 16-lane partial sums: a matmul's value to float
// rounding, not bit for bit.
void linear(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
            float* y, int64_t ldy);

// x[i, :] = layer_norm(x[i, :] + r[i, :]) * w + b over `dim` columns (biased variance, as torch), r nullptr for none.
void add_layer_norm(float* x, const float* r, int64_t rows, int64_t dim, const float* w, const float* b, float eps);

// x = gelu(x) = x / 2 * (1 + erf(x / sqrt 2)) in place over n floats (erf: Abramowitz & Stegun 7.1.26,
// absolute error <= 1.5e-7, as PyTorch's vectorised CPU erf).
void gelu(float* x, int64_t n);

}  // namespace genrec
