// Which items each user may receive: the filters shared by the trie search and the top-k scan.
#pragma once

#include <cstdint>

namespace genrec {

// Views, read only by the constructors that take them.
struct ItemFilter {
  // User u never gets exclude_items[exclude_ptr[u]:exclude_ptr[u+1]]; nullptr: nothing excluded.
  const int64_t* exclude_ptr = nullptr;  // (num_users + 1,)
  const int64_t* exclude_items = nullptr;
  // (allow_rows, num_items), nonzero = allowed; nullptr: everything allowed. allow_rows is 1
  // (one row shared by all users) or num_users (one row per user).
  const uint8_t* allow = nullptr;
  int64_t allow_rows = 0;
};

// Throws std::invalid_argument unless the offsets are non-decreasing and every excluded item is
// in [0, num_items); offsets are all checked before any item is read.
void check_filter(const ItemFilter& f, int64_t num_users, int64_t num_items);

}  // namespace genrec
