#include "candidate_logits.h"

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dot.h"
#include "parallel.h"

namespace genrec {

namespace {

void check_items(const int64_t* items, int64_t count, int64_t weight_rows, const char* name) {
  for (int64_t i = 0; i < count; ++i) {  // every index first: the gather reads only in bounds
    if (items[i] < -1 || items[i] >= weight_rows) {
      throw std::invalid_argument(std::string("candidate_logits: ") + name + " " + std::to_string(items[i]) +
                                  " at " + std::to_string(i) + " is outside [-1, " + std::to_string(weight_rows) +
                                  ")");
    }
  }
}

// One user's pairs as an open-addressing hash table: item -> its offsets summed in table order (as torch's
// index_add sums them). A sort per user and a binary search per candidate cost 3x more (a cascade's ~320 pairs
// and ~340 candidates a user).
class PairTable {
 public:
  void build(const int64_t* items, const float* offsets, int64_t pairs) {
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(pairs)) capacity <<= 1;  // at most half full
    keys_.assign(capacity, -1);
    sums_.assign(capacity, 0.0f);
    mask_ = capacity - 1;
    for (int64_t s = 0; s < pairs; ++s) {
      if (items[s] < 0) continue;
      const size_t at = slot(items[s]);
      keys_[at] = items[s];
      sums_[at] += offsets[s];
    }
  }

  // The summed offsets of `item`, 0 when it is no pair.
  float offset(int64_t item) const {
    const size_t at = slot(item);
    return keys_[at] == item ? sums_[at] : 0.0f;
  }

 private:
  size_t slot(int64_t item) const {  // the item's slot, or the empty one where it would go
    size_t at = static_cast<size_t>((static_cast<uint64_t>(item) * 0x9E3779B97F4A7C15ull) >> 32) & mask_;
    while (keys_[at] != item && keys_[at] != -1) at = (at + 1) & mask_;
    return at;
  }

  std::vector<int64_t> keys_;  // -1 = empty
  std::vector<float> sums_;
  size_t mask_ = 0;
};

}  // namespace

void candidate_logits(const float* weight, const float* bias, int64_t weight_rows, int64_t dim, const float* hidden,
                      const int64_t* items, int64_t users, int64_t n, const int64_t* pair_items,
                      const float* pair_offsets, int64_t pairs, float* out, int threads) {
  if (weight_rows < 0 || dim < 0 || users < 0 || n < 0 || pairs < 0) {
    throw std::invalid_argument("candidate_logits: negative sizes");
  }
  check_items(items, users * n, weight_rows, "item");
  if (pairs > 0) check_items(pair_items, users * pairs, weight_rows, "pair item");
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t kUsersPerThread = 16;  // ~5,000 dot products: below this a thread costs more than it saves
  parallel_for(users, threads, kUsersPerThread, [&](int64_t begin, int64_t end) {
    PairTable table;  // this user's pairs
    for (int64_t u = begin; u < end; ++u) {
      table.build(pair_items + u * pairs, pair_offsets + u * pairs, pairs);
      const float* h = hidden + u * dim;
      const int64_t* c = items + u * n;
      float* o = out + u * n;
      for (int64_t m = 0; m < n; ++m) {
        if (c[m] < 0) {
          o[m] = kNegInf;
          continue;
        }
        if (m + 8 < n && c[m + 8] >= 0) prefetch(weight + c[m + 8] * dim, dim);  // rows are scattered over the table
        float z = dot(weight + c[m] * dim, h, dim) + (bias != nullptr ? bias[c[m]] : 0.0f);
        o[m] = pairs > 0 ? z + table.offset(c[m]) : z;
      }
    }
  });
}

}  // namespace genrec
