// The leaf head's scores (python/genrec_fast/leaf_head.py): each decoder row scores the items of its
// leaf with their own vectors, gathered and dotted in one pass (the (rows, width, dim) gather is never
// written).
#pragma once

#include <cstdint>

namespace genrec {

// Rows of a leaf-blocked table come in groups of this many, each group stored transposed: (dim, kLeafGroup).
constexpr int64_t kLeafGroup = 16;

// out[r, m] = dot(vector(r, m), hidden[r]) where slots[r, m] > 0, -inf where it is 0 (an empty slot).
// starts null: vector(r, m) = weight[slots[r, m]], the item table itself (weight_rows, dim), rows scattered.
// Else weight is leaf-blocked (a copy of the table laid out leaf by leaf, `LeafHead.ordered`): vector(r, m) is
// row starts[r] + m of it, row j stored at group j / kLeafGroup (dim x kLeafGroup floats), lane j % kLeafGroup;
// starts are multiples of kLeafGroup and a row reads the whole groups up to its last filled slot. slots
// (rows, width), starts (rows,), hidden (rows, dim), out (rows, width): row-major. Throws
// std::invalid_argument when a read lies outside the table. threads <= 0: all cores.
void leaf_scores(const float* weight, int64_t weight_rows, int64_t dim, const int64_t* slots,
                 const int64_t* starts, const float* hidden, int64_t rows, int64_t width, float* out,
                 int threads);

}  // namespace genrec
