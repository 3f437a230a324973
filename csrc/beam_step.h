// Trie-constrained beam search state machine (docs/beam_search_spec.md, "Search state").
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "item_filter.h"
#include "trie.h"

namespace genrec {


// For each new row: the previous row it extends and the token it just appended.
struct StepOutput {
  std::vector<int64_t> parent_rows;
  std::vector<int64_t> tokens;
};

// Not thread-safe: one caller at a time (step itself runs users in parallel).
class BeamSearch {
 public:
  // Throws std::invalid_argument on bad sizes or out-of-range item ids.
  BeamSearch(std::shared_ptr<const Trie> trie, int64_t num_users, int32_t num_beams, int32_t k,
             float length_penalty, const ItemFilter& filter);

  int64_t num_users() const { return num_users_; }
  int32_t num_beams() const { return num_beams_; }
  int32_t k() const { return k_; }
  const std::vector<int64_t>& active_users() const { return active_; }
  int64_t width() const { return width_; }
  // Threads `step` may use (<= 0: all cores); the caller passes its framework's thread count.
  void set_threads(int threads) { threads_ = threads; }
  int64_t num_rows() const { return static_cast<int64_t>(active_.size()) * width_; }
  bool done() const { return active_.empty(); }

  // Step number: tokens appended so far (the depth of every live beam).
  int32_t steps() const { return num_steps_; }

  // logprobs: (rows, columns) row-major for the current rows, column j = token offset + j; the
  // columns must cover the step's window trie.step_lo[steps()]..step_hi[steps()] (offset 0 and
  // columns = vocab: every token). Throws std::invalid_argument when done() or when the shape does not
  // match the row layout and the window.
  StepOutput step(const float* logprobs, int64_t rows, int64_t columns, int64_t offset = 0);

  // items, scores: (num_users, k) row-major; padded with -1 / -inf.
  void results(int64_t* items, float* scores) const;

 private:
  struct Beam {
    int32_t node;
    float score;
  };
  struct Finished {
    int32_t item;
    float score;
  };
  struct Candidate {
    float score;
    int32_t slot;
    int32_t token;
    int32_t node;
  };
  // (score desc with NaN last, slot asc, token asc): a strict total order over one user's candidates.
  static bool candidate_before(const Candidate& a, const Candidate& b);
  // Allowed items of one user in a leaf range: base count + sign * (#exceptions in the range).
  struct UserFilter {
    enum class Base : uint8_t { kNone, kAll, kShared };
    Base base = Base::kAll;
    int32_t sign = -1;
    std::vector<int32_t> exceptions;  // sorted unique leaf positions
  };

  void build_filters(const ItemFilter& filter);
  void build_shared_filters(const ItemFilter& filter);
  void build_per_user_filters(const ItemFilter& filter);
  int64_t allowed_count(int64_t user, int32_t lo, int32_t hi) const;
  bool usable(int64_t user, int32_t node) const;

  void step_users(const float* logprobs, int64_t columns, int64_t offset, float divisor, int64_t begin,
                  int64_t end);
  bool step_user(int64_t local, const float* logprobs, int64_t columns, int64_t offset, float divisor,
                 std::vector<Candidate>& candidates);
  void offer(int64_t user, int32_t item, float score);
  StepOutput collect_rows();

  std::shared_ptr<const Trie> trie_;
  int64_t num_users_;
  int32_t num_beams_;
  int32_t k_;
  float length_penalty_;

  std::vector<UserFilter> filters_;     // (num_users,)
  std::vector<int64_t> shared_prefix_;  // (num_items + 1,) prefix sums of the shared allow mask

  std::vector<Beam> beams_;             // (num_users, num_beams): live beams first
  std::vector<int32_t> num_live_;       // (num_users,)
  std::vector<int64_t> beam_parent_;    // (num_users, num_beams): previous row of each new beam
  std::vector<int32_t> beam_token_;     // (num_users, num_beams): token each new beam appended
  std::vector<Finished> pool_;          // (num_users, k): best finished, best first
  std::vector<int32_t> pool_size_;      // (num_users,)
  std::vector<int64_t> active_;         // users of the current rows, increasing
  std::vector<uint8_t> stays_active_;   // (active_.size(),) scratch of step
  int64_t width_ = 1;
  int threads_ = 0;
  int32_t num_steps_ = 0;
};

}  // namespace genrec
