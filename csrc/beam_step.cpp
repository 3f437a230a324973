#include "beam_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "parallel.h"

namespace genrec {
namespace {

// Higher scores first; NaN after every number, so the order is total and both backends agree.
bool score_before(float a, float b) { return !std::isnan(a) && (std::isnan(b) || a > b); }

void check_sizes(const Trie* trie, int64_t num_users, int32_t num_beams, int32_t k,
                 float length_penalty) {
  if (trie == nullptr) throw std::invalid_argument("trie must not be null");
  if (num_users < 0) throw std::invalid_argument("num_users must be >= 0");
  if (num_beams < 1) throw std::invalid_argument("num_beams must be >= 1");
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  if (k > num_beams) {
    throw std::invalid_argument("k (" + std::to_string(k) + ") must be <= num_beams (" +
                                std::to_string(num_beams) + ")");
  }
  if (!std::isfinite(length_penalty)) throw std::invalid_argument("length_penalty must be finite");
}


}  // namespace

BeamSearch::BeamSearch(std::shared_ptr<const Trie> trie, int64_t num_users, int32_t num_beams,
                       int32_t k, float length_penalty, const ItemFilter& filter)
    : trie_(std::move(trie)),
      num_users_(num_users),
      num_beams_(num_beams),
      k_(k),
      length_penalty_(length_penalty) {
  check_sizes(trie_.get(), num_users, num_beams, k, length_penalty);
  check_filter(filter, num_users, trie_->num_items());
  build_filters(filter);
  beams_.resize(num_users * num_beams);
  num_live_.assign(num_users, 0);
  beam_parent_.resize(num_users * num_beams);
  beam_token_.resize(num_users * num_beams);
  pool_.resize(num_users * k);
  pool_size_.assign(num_users, 0);
  for (int64_t u = 0; u < num_users; ++u) {
    if (allowed_count(u, 0, static_cast<int32_t>(trie_->num_items())) == 0) continue;
    beams_[u * num_beams] = {0, 0.0f};  // the root
    num_live_[u] = 1;
    active_.push_back(u);
  }
}

// ---- filters: allowed items per leaf range ----

void BeamSearch::build_filters(const ItemFilter& filter) {
  filters_.assign(num_users_, UserFilter{});
  if (filter.allow != nullptr && filter.allow_rows != 1) {
    build_per_user_filters(filter);
  } else {
    build_shared_filters(filter);
  }
}

// Shared (or no) allow mask: prefix sums once, minus each user's allowed excluded leaves.
void BeamSearch::build_shared_filters(const ItemFilter& filter) {
  const Trie& t = *trie_;
  const auto base = filter.allow != nullptr ? UserFilter::Base::kShared : UserFilter::Base::kAll;
  if (filter.allow != nullptr) {
    shared_prefix_.assign(t.num_items() + 1, 0);
    for (int64_t p = 0; p < t.num_items(); ++p) {
      shared_prefix_[p + 1] = shared_prefix_[p] + (filter.allow[t.leaf_order[p]] != 0);
    }
  }
  for (int64_t u = 0; u < num_users_; ++u) {
    UserFilter& f = filters_[u];
    f.base = base;
    f.sign = -1;
    if (filter.exclude_ptr == nullptr) continue;
    for (int64_t i = filter.exclude_ptr[u]; i < filter.exclude_ptr[u + 1]; ++i) {
      const int64_t item = filter.exclude_items[i];
      if (filter.allow == nullptr || filter.allow[item] != 0) f.exceptions.push_back(t.leaf_pos[item]);
    }
    std::sort(f.exceptions.begin(), f.exceptions.end());
    f.exceptions.erase(std::unique(f.exceptions.begin(), f.exceptions.end()), f.exceptions.end());
  }
}

// One allow row per user: keep whichever of the allowed / disallowed leaf lists is shorter.
void BeamSearch::build_per_user_filters(const ItemFilter& filter) {
  const Trie& t = *trie_;
  const int64_t n = t.num_items();
  std::vector<uint8_t> allowed(n);  // by leaf position
  for (int64_t u = 0; u < num_users_; ++u) {
    const uint8_t* row = filter.allow + u * n;
    for (int64_t p = 0; p < n; ++p) allowed[p] = row[t.leaf_order[p]] != 0;
    if (filter.exclude_ptr != nullptr) {
      for (int64_t i = filter.exclude_ptr[u]; i < filter.exclude_ptr[u + 1]; ++i) {
        allowed[t.leaf_pos[filter.exclude_items[i]]] = 0;
      }
    }
    const int64_t count = std::count(allowed.begin(), allowed.end(), uint8_t{1});
    const bool list_allowed = 2 * count <= n;
    UserFilter& f = filters_[u];
    f.base = list_allowed ? UserFilter::Base::kNone : UserFilter::Base::kAll;
    f.sign = list_allowed ? 1 : -1;
    for (int64_t p = 0; p < n; ++p) {
      if ((allowed[p] != 0) == list_allowed) f.exceptions.push_back(static_cast<int32_t>(p));
    }
  }
}

int64_t BeamSearch::allowed_count(int64_t user, int32_t lo, int32_t hi) const {
  const UserFilter& f = filters_[user];
  int64_t base = 0;
  if (f.base == UserFilter::Base::kAll) base = hi - lo;
  if (f.base == UserFilter::Base::kShared) base = shared_prefix_[hi] - shared_prefix_[lo];
  if (f.exceptions.empty()) return base;
  const auto first = std::lower_bound(f.exceptions.begin(), f.exceptions.end(), lo);
  const auto last = std::lower_bound(first, f.exceptions.end(), hi);
  return base + f.sign * (last - first);
}

bool BeamSearch::usable(int64_t user, int32_t node) const {
  return allowed_count(user, trie_->leaf_lo[node], trie_->leaf_hi[node]) > 0;
}

// ---- step ----

StepOutput BeamSearch::step(const float* logprobs, int64_t rows, int64_t columns, int64_t offset) {
  if (done()) throw std::invalid_argument("step: the search is done (no active user)");
  if (rows != num_rows()) {
    throw std::invalid_argument("logprobs has " + std::to_string(rows) + " rows, expected " +
                                std::to_string(active_.size()) + " active users x width " +
                                std::to_string(width_) + " = " + std::to_string(num_rows()));
  }
  // Not done: some beam has children, so this step has a window.
  const int32_t lo = trie_->step_lo[num_steps_], hi = trie_->step_hi[num_steps_];
  if (offset < 0 || offset > lo || offset + columns <= hi) {
    throw std::invalid_argument("logprobs has " + std::to_string(columns) + " columns from token " +
                                std::to_string(offset) + " but step " + std::to_string(num_steps_) +
                                " reads tokens " + std::to_string(lo) + ".." + std::to_string(hi));
  }
  const int64_t length = num_steps_ + 1;  // tokens generated so far, EOS included
  // Same float32 divisor as the Python reference: pow in double, rounded once to float32.
  const auto divisor = static_cast<float>(std::pow(static_cast<double>(length),
                                                   static_cast<double>(length_penalty_)));
  stays_active_.assign(active_.size(), 0);
  constexpr int64_t kUsersPerThread = 32;  // below this a thread costs more than it saves
  parallel_for(static_cast<int64_t>(active_.size()), threads_, kUsersPerThread, [&](int64_t begin, int64_t end) {
    step_users(logprobs, columns, offset, divisor, begin, end);
  });
  return collect_rows();
}

void BeamSearch::step_users(const float* logprobs, int64_t columns, int64_t offset, float divisor,
                            int64_t begin, int64_t end) {
  std::vector<Candidate> candidates;
  for (int64_t local = begin; local < end; ++local) {
    stays_active_[local] = step_user(local, logprobs, columns, offset, divisor, candidates);
  }
}

bool BeamSearch::candidate_before(const Candidate& a, const Candidate& b) {
  if (score_before(a.score, b.score)) return true;
  if (score_before(b.score, a.score)) return false;
  return a.slot != b.slot ? a.slot < b.slot : a.token < b.token;
}

// Steps the user of active_[local]; returns whether it stays active.
bool BeamSearch::step_user(int64_t local, const float* logprobs, int64_t columns, int64_t offset,
                           float divisor, std::vector<Candidate>& candidates) {
  const Trie& t = *trie_;
  const int64_t user = active_[local];
  const int64_t first_row = local * width_;
  Beam* beams = &beams_[user * num_beams_];
  const UserFilter& filter = filters_[user];
  const bool unfiltered = filter.base == UserFilter::Base::kAll && filter.exceptions.empty();
  // Candidates are offered in (row asc, token asc) order, so one that does not beat the current
  // num_beams-th best strictly can never enter the best num_beams: once `candidates` fills up it is
  // cut to the best num_beams, whose last score then bounds the rest (wide nodes: a 1M-item catalog's
  // first code level has thousands of children).
  const size_t limit = std::max<size_t>(256, 4 * static_cast<size_t>(num_beams_));
  bool bounded = false;
  float bound = 0.0f;
  candidates.clear();
  for (int32_t slot = 0; slot < num_live_[user]; ++slot) {
    const float* row = logprobs + (first_row + slot) * columns;  // column j: token offset + j
    const Beam beam = beams[slot];
    for (int64_t e = t.child_ptr[beam.node]; e < t.child_ptr[beam.node + 1]; ++e) {
      const int32_t token = t.child_token[e];
      const float score = beam.score + row[token - offset];
      if (token == t.eos_id) {
        const int32_t child = t.child_node[e];
        if (usable(user, child)) offer(user, t.leaf_item[child], length_penalty_ == 0.0f ? score : score / divisor);
        continue;
      }
      if (bounded && !score_before(score, bound)) continue;
      const int32_t child = t.child_node[e];
      if (!unfiltered && !usable(user, child)) continue;
      candidates.push_back({score, slot, token, child});
      if (candidates.size() == limit) {
        const auto nth = candidates.begin() + (num_beams_ - 1);
        std::nth_element(candidates.begin(), nth, candidates.end(), candidate_before);
        candidates.resize(num_beams_);
        bounded = true;
        bound = candidates.back().score;  // the num_beams-th best so far
      }
    }
  }
  // Best num_beams by (score desc, row asc, token asc); rows of one user follow its slots.
  const auto kept = std::min<int64_t>(static_cast<int64_t>(candidates.size()), num_beams_);
  std::partial_sort(candidates.begin(), candidates.begin() + kept, candidates.end(), candidate_before);
  for (int64_t s = 0; s < kept; ++s) {
    beams[s] = {candidates[s].node, candidates[s].score};
    beam_parent_[user * num_beams_ + s] = first_row + candidates[s].slot;
    beam_token_[user * num_beams_ + s] = candidates[s].token;
  }
  num_live_[user] = static_cast<int32_t>(kept);
  if (kept == 0) return false;
  // Without a length penalty scores only fall, so a full pool at least as good as the best
  // live beam is final.
  const bool pool_full = pool_size_[user] == k_;
  return !(length_penalty_ == 0.0f && pool_full && beams[0].score <= pool_[user * k_ + k_ - 1].score);
}

// Inserts a finished item into the user's pool (best k by score desc, item asc).
void BeamSearch::offer(int64_t user, int32_t item, float score) {
  Finished* pool = &pool_[user * k_];
  int32_t& size = pool_size_[user];
  const auto before = [](const Finished& a, const Finished& b) {
    if (score_before(a.score, b.score)) return true;
    if (score_before(b.score, a.score)) return false;
    return a.item < b.item;
  };
  const Finished f{item, score};
  if (size == k_ && !before(f, pool[k_ - 1])) return;
  int32_t pos = size < k_ ? size++ : k_ - 1;
  for (; pos > 0 && before(f, pool[pos - 1]); --pos) pool[pos] = pool[pos - 1];
  pool[pos] = f;
}

// Lays out the next rows: users that stay active (increasing) x num_beams slots.
StepOutput BeamSearch::collect_rows() {
  StepOutput out;
  std::vector<int64_t> next_active;
  for (size_t local = 0; local < active_.size(); ++local) {
    if (!stays_active_[local]) continue;
    const int64_t user = active_[local];
    next_active.push_back(user);
    for (int32_t s = 0; s < num_beams_; ++s) {
      const bool live = s < num_live_[user];
      out.parent_rows.push_back(live ? beam_parent_[user * num_beams_ + s]
                                     : static_cast<int64_t>(local) * width_);
      out.tokens.push_back(live ? beam_token_[user * num_beams_ + s] : trie_->eos_id);
    }
  }
  active_.swap(next_active);
  width_ = num_beams_;
  ++num_steps_;
  return out;
}

void BeamSearch::results(int64_t* items, float* scores) const {
  for (int64_t u = 0; u < num_users_; ++u) {
    for (int32_t j = 0; j < k_; ++j) {
      const bool found = j < pool_size_[u];
      items[u * k_ + j] = found ? pool_[u * k_ + j].item : -1;
      scores[u * k_ + j] = found ? pool_[u * k_ + j].score : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace genrec
