#include "candidates.h"

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

// One user's items as an open-addressing hash table, each with a float sum: for the pairs, item -> its offsets
// summed in table order (as torch's index_add sums them). A sort per user and a binary search per candidate cost
// 3x more (a cascade's ~320 pairs and ~340 candidates a user).
class ItemTable {
 public:
  void reset(int64_t most) {  // room for `most` items, at most half full
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(most)) capacity <<= 1;
    keys_.assign(capacity, -1);
    sums_.assign(capacity, 0.0f);
    mask_ = capacity - 1;
  }

  // Adds value to item's sum (the item inserted if new; item >= 0); -> whether the item was new.
  bool add(int64_t item, float value = 0.0f) {
    const size_t at = slot(item);
    const bool fresh = keys_[at] != item;
    keys_[at] = item;
    sums_[at] += value;
    return fresh;
  }

  // The item's sum, 0 when it is absent.
  float sum(int64_t item) const {
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
    ItemTable table;  // this user's pairs
    for (int64_t u = begin; u < end; ++u) {
      table.reset(pairs);
      for (int64_t s = u * pairs; s < (u + 1) * pairs; ++s) {
        if (pair_items[s] >= 0) table.add(pair_items[s], pair_offsets[s]);
      }
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
        o[m] = pairs > 0 ? z + table.sum(c[m]) : z;
      }
    }
  });
}

void append_new_items(const int64_t* items, int64_t n, const int64_t* extra, int64_t extra_n, int64_t users,
                      int64_t* out, int threads) {
  if (n < 0 || extra_n < 0 || users < 0) throw std::invalid_argument("append_new_items: negative sizes");
  constexpr int64_t kUsersPerThread = 64;
  parallel_for(users, threads, kUsersPerThread, [&](int64_t begin, int64_t end) {
    ItemTable seen;  // this user's items so far
    for (int64_t u = begin; u < end; ++u) {
      seen.reset(n + extra_n);
      int64_t* o = out + u * (n + extra_n);
      for (int64_t m = 0; m < n; ++m) {
        o[m] = items[u * n + m];
        if (o[m] >= 0) seen.add(o[m]);
      }
      for (int64_t m = 0; m < extra_n; ++m) {
        const int64_t item = extra[u * extra_n + m];
        o[n + m] = item >= 0 && seen.add(item) ? item : -1;
      }
    }
  });
}

}  // namespace genrec
