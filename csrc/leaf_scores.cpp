#include "leaf_scores.h"

#include <limits>
#include <stdexcept>
#include <string>

#include "dot.h"
#include "parallel.h"

namespace genrec {

void leaf_scores(const float* weight, int64_t weight_rows, int64_t dim, const int64_t* slots,
                 const float* hidden, int64_t rows, int64_t width, float* out, int threads) {
  if (weight_rows < 0 || dim < 0 || rows < 0 || width < 0) {
    throw std::invalid_argument("leaf_scores: negative sizes");
  }
  for (int64_t i = 0; i < rows * width; ++i) {  // every index first: the gather reads only in bounds
    if (slots[i] < 0 || slots[i] >= weight_rows) {
      throw std::invalid_argument("leaf_scores: slot " + std::to_string(slots[i]) + " at " + std::to_string(i) +
                                  " is outside the table's " + std::to_string(weight_rows) + " rows");
    }
  }
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t kRowsPerThread = 64;  // ~6,000 dot products: below this a thread costs more than it saves
  parallel_for(rows, threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* h = hidden + r * dim;
      const int64_t* s = slots + r * width;
      for (int64_t m = 0; m < width; ++m) {
        if (s[m] == 0) {
          out[r * width + m] = kNegInf;
          continue;
        }
        if (m + 8 < width) prefetch(weight + s[m + 8] * dim, dim);  // rows are scattered over the table
        out[r * width + m] = dot(weight + s[m] * dim, h, dim);
      }
    }
  });
}

}  // namespace genrec
