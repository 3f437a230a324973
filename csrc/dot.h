// Small inline helpers for scattered row dot products (leaf_scores.cpp, topk.cpp's add_offsets).
#pragma once

#include <cstdint>

namespace genrec {

// a . b over n floats, summed in vector lanes: a matmul's value to float rounding, not bit for bit.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

// Asks the cache for a row a later iteration reads (rows scattered over a table): every 64-byte line of its
// n floats (n = 64: four lines; one line alone left the other three to miss).
inline void prefetch(const float* p, int64_t n = 16) {
#if defined(__GNUC__)
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + c);
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace genrec
