#include "item_filter.h"

#include <stdexcept>
#include <string>

namespace genrec {

void check_filter(const ItemFilter& f, int64_t num_users, int64_t num_items) {
  if (f.allow != nullptr && f.allow_rows != 1 && f.allow_rows != num_users) {
    throw std::invalid_argument("allow must have 1 row or num_users rows, got " +
                                std::to_string(f.allow_rows));
  }
  if (f.exclude_ptr == nullptr) return;
  if (f.exclude_items == nullptr) throw std::invalid_argument("exclude: items pointer is null");
  if (f.exclude_ptr[0] < 0) throw std::invalid_argument("exclude: offsets must start at >= 0");
  for (int64_t u = 0; u < num_users; ++u) {  // all offsets first: items are read only in bounds
    if (f.exclude_ptr[u + 1] < f.exclude_ptr[u]) {
      throw std::invalid_argument("exclude: offsets must be non-decreasing");
    }
  }
  for (int64_t u = 0; u < num_users; ++u) {
    for (int64_t i = f.exclude_ptr[u]; i < f.exclude_ptr[u + 1]; ++i) {
      if (f.exclude_items[i] < 0 || f.exclude_items[i] >= num_items) {
        throw std::invalid_argument("exclude[" + std::to_string(u) + "] holds item " +
                                    std::to_string(f.exclude_items[i]) + " outside [0, " +
                                    std::to_string(num_items) + ")");
      }
    }
  }
}

}  // namespace genrec
