#include "leaf_scores.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "dot.h"
#include "parallel.h"

namespace genrec {
namespace {

// h . the 16 vectors of each of `groups` groups, a group stored transposed (dim, 16): the 16 dots run in
// the vector lanes (a broadcast of h[c] times a row of 16), no sum across lanes; four partial sums over c
// keep the FMAs independent.
inline __attribute__((always_inline)) void group_dots_body(const float* __restrict h, const float* __restrict block,
                                                           int64_t groups, int64_t dim, float* __restrict out) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* b = block + g * dim * kLeafGroup;
    float acc[4][kLeafGroup] = {};
    int64_t c = 0;
    for (; c + 4 <= dim; c += 4) {
      for (int64_t p = 0; p < 4; ++p) {
        const float hc = h[c + p];
#pragma omp simd
        for (int64_t l = 0; l < kLeafGroup; ++l) acc[p][l] += hc * b[(c + p) * kLeafGroup + l];
      }
    }
    for (; c < dim; ++c) {
      const float hc = h[c];
#pragma omp simd
      for (int64_t l = 0; l < kLeafGroup; ++l) acc[0][l] += hc * b[c * kLeafGroup + l];
    }
#pragma omp simd
    for (int64_t l = 0; l < kLeafGroup; ++l) out[g * kLeafGroup + l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
  }
}

__attribute__((target("avx512f"))) void group_dots_avx512(const float* h, const float* block, int64_t groups,
                                                          int64_t dim, float* out) {
  group_dots_body(h, block, groups, dim, out);
}

__attribute__((target("avx2,fma"))) void group_dots_avx2(const float* h, const float* block, int64_t groups,
                                                         int64_t dim, float* out) {
  group_dots_body(h, block, groups, dim, out);
}

void group_dots(const float* h, const float* block, int64_t groups, int64_t dim, float* out) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return group_dots_avx512(h, block, groups, dim, out);
    case Isa::kAvx2Fma:
      return group_dots_avx2(h, block, groups, dim, out);
    default:
      return group_dots_body(h, block, groups, dim, out);
  }
}

// The last slot of a row that holds an item, -1 for none: a leaf-blocked row reads the groups up to it.
int64_t last_filled(const int64_t* s, int64_t width) {
  int64_t last = width - 1;
  while (last >= 0 && s[last] == 0) --last;
  return last;
}

void check_reads(int64_t weight_rows, const int64_t* slots, const int64_t* starts, int64_t rows, int64_t width) {
  if (starts != nullptr && weight_rows % kLeafGroup != 0) {
    throw std::invalid_argument("leaf_scores: a leaf-blocked table has a multiple of " + std::to_string(kLeafGroup) +
                                " rows, got " + std::to_string(weight_rows));
  }
  for (int64_t r = 0; r < rows; ++r) {  // every read first: the gather reads only in bounds
    const int64_t* s = slots + r * width;
    if (starts == nullptr) {
      for (int64_t m = 0; m < width; ++m) {
        if (s[m] < 0 || s[m] >= weight_rows) {
          throw std::invalid_argument("leaf_scores: slot " + std::to_string(s[m]) + " at " +
                                      std::to_string(r * width + m) + " is outside the table's " +
                                      std::to_string(weight_rows) + " rows");
        }
      }
      continue;
    }
    const int64_t last = last_filled(s, width);
    if (last < 0) continue;
    const int64_t start = starts[r], end = start + (last / kLeafGroup + 1) * kLeafGroup;
    if (start < 0 || start % kLeafGroup != 0 || end > weight_rows) {
      throw std::invalid_argument("leaf_scores: start " + std::to_string(start) + " of row " + std::to_string(r) +
                                  " with slot " + std::to_string(last) + " reads rows up to " +
                                  std::to_string(end) + " of a leaf-blocked table of " +
                                  std::to_string(weight_rows) + " (starts: multiples of " +
                                  std::to_string(kLeafGroup) + ")");
    }
  }
}

}  // namespace

void leaf_scores(const float* weight, int64_t weight_rows, int64_t dim, const int64_t* slots,
                 const int64_t* starts, const float* hidden, int64_t rows, int64_t width, float* out,
                 int threads) {
  if (weight_rows < 0 || dim < 0 || rows < 0 || width < 0) {
    throw std::invalid_argument("leaf_scores: negative sizes");
  }
  check_reads(weight_rows, slots, starts, rows, width);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Leaf-blocked: rows visited by their leaf's start, so rows of one leaf (beams and users that reached the
  // same cluster) follow each other and read its block from the cache after the first.
  std::vector<int64_t> visit;
  if (starts != nullptr) {
    visit.resize(static_cast<size_t>(rows));
    std::iota(visit.begin(), visit.end(), int64_t{0});
    std::sort(visit.begin(), visit.end(), [&](int64_t a, int64_t b) { return starts[a] < starts[b]; });
  }
  const int64_t groups = (width + kLeafGroup - 1) / kLeafGroup;
  constexpr int64_t kRowsPerThread = 64;  // ~6,000 dot products: below this a thread costs more than it saves
  parallel_for(rows, threads, kRowsPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> z(static_cast<size_t>(groups * kLeafGroup));  // a row's blocked dots
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = visit.empty() ? i : visit[static_cast<size_t>(i)];
      const float* h = hidden + r * dim;
      const int64_t* s = slots + r * width;
      float* o = out + r * width;
      if (starts != nullptr) {
        const int64_t last = last_filled(s, width);  // an empty row reads nothing (check_reads passed it)
        if (last >= 0) group_dots(h, weight + starts[r] * dim, last / kLeafGroup + 1, dim, z.data());
        for (int64_t m = 0; m < width; ++m) o[m] = s[m] == 0 ? kNegInf : z[m];
        continue;
      }
      for (int64_t m = 0; m < width; ++m) {
        if (s[m] == 0) {
          o[m] = kNegInf;
          continue;
        }
        if (m + 8 < width) prefetch(weight + s[m + 8] * dim, dim);  // rows are scattered over the table
        o[m] = dot(weight + s[m] * dim, h, dim);
      }
    }
  });
}

}  // namespace genrec
