// A cascade's candidates (python/genrec_fast/cascade.py): the retriever's items joined by the ranker's bias items,
// and the ranker's logits at a few hundred candidates per user instead of the catalog: each candidate's row
// gathered and dotted in one pass, its bias offsets (the user's (item, offset) pairs, repeats summed) found in a
// per-user hash table.
#pragma once

#include <cstdint>

namespace genrec {

// out[u, n] = dot(weight[items[u, n]], hidden[u]) + bias[items[u, n]] (bias may be null) + the sum of
// pair_offsets[u, s] over every s with pair_items[u, s] == items[u, n]; -inf where items[u, n] < 0.
// weight (weight_rows, dim), hidden (users, dim), items and out (users, n), pair_items and pair_offsets
// (users, pairs) (pairs may be 0; -1 = no pair): row-major. Throws std::invalid_argument when an item or a pair
// item lies outside [-1, weight_rows). threads <= 0: all cores.
void candidate_logits(const float* weight, const float* bias, int64_t weight_rows, int64_t dim, const float* hidden,
                      const int64_t* items, int64_t users, int64_t n, const int64_t* pair_items,
                      const float* pair_offsets, int64_t pairs, float* out, int threads);

// out (users, n + extra_n): each row's items (n, distinct, -1 = none) and then, at their own positions, the row's
// extra items (extra_n, -1 = none) that are in neither items nor earlier in extra; -1 at every other position.
void append_new_items(const int64_t* items, int64_t n, const int64_t* extra, int64_t extra_n, int64_t users,
                      int64_t* out, int threads);

}  // namespace genrec
