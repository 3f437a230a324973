// The leaf head's scores (python/genrec_fast/leaf_head.py): each decoder row scores the items of its
// leaf with their own vectors, gathered and dotted in one pass (the (rows, width, dim) gather is never
// written).
#pragma once

#include <cstdint>

namespace genrec {

// out[r, m] = dot(weight[slots[r, m]], hidden[r]) where slots[r, m] > 0, -inf where it is 0 (an empty
// slot). weight (weight_rows, dim), slots (rows, width), hidden (rows, dim), out (rows, width): row-major.
// Throws std::invalid_argument when a slot lies outside [0, weight_rows). threads <= 0: all cores.
void leaf_scores(const float* weight, int64_t weight_rows, int64_t dim, const int64_t* slots,
                 const float* hidden, int64_t rows, int64_t width, float* out, int threads);

}  // namespace genrec
