// Streaming top-k over item scores that arrive in column chunks, with a running log-sum-exp.
//
// One-token items are ranked by one softmax over the catalog: the caller computes the logits of a
// chunk of items for all users (a matmul), hands the chunk here, and never holds (users x catalog).
// Per user this keeps the best k allowed items by (score desc, item asc) and, optionally, the
// log-sum-exp of every column seen (the softmax normaliser, filters ignored).
#pragma once

#include <cstdint>
#include <vector>

#include "item_filter.h"

namespace genrec {

class StreamingTopK {
 public:
  // Throws std::invalid_argument on bad sizes or out-of-range excluded items.
  StreamingTopK(int64_t num_users, int32_t k, int64_t num_items, const ItemFilter& filter);

  int64_t num_users() const { return num_users_; }
  int32_t k() const { return k_; }

  // scores: (num_users, cols) row-major with leading dimension ld >= cols; column j is item
  // first_item + j when first_item >= 0 (items outside [0, num_items) throw). topk: offer the
  // columns to the top-k (filters applied; NaN never enters). lse: fold them into the log-sum-exp.
  // Runs users on up to `threads` threads (<= 0: all cores).
  void add(const float* scores, int64_t ld, int64_t cols, int64_t first_item, bool topk, bool lse,
           int threads);

  // The same as `add` of the scores x @ w.T (+ bias) without storing them: x (num_users, dim) and
  // w (cols, dim) row-major, bias (cols,) or nullptr. A fused kernel (16 users x 6-8 columns per tile,
  // vectorised across users) computes each tile in registers and folds it into the top-k and the
  // log-sum-exp at once; w is streamed in L2-sized chunks. Threads take blocks of 16 users; with fewer
  // blocks than threads (a request or a few) they take spans of the columns instead, each scanned into a
  // partial top-k and log-sum-exp merged at the end (under 12 users, dots vectorised over dim instead of
  // tiles). Scores equal a matmul's to float rounding, not bit for bit.
  void add_head(const float* x, const float* w, const float* bias, int64_t dim, int64_t cols, int64_t first_item,
                bool topk, bool lse, int threads);

  // `add_head` over w16, w's rows rounded to bfloat16 (cols, dim), dim even: each score is x . w16 (+ bias, in
  // float) with x rounded to bfloat16 too, float sums (VDPBF16PS: tiles of 16 users x 8 rows; under 12 users, per
  // row and user over 32 columns at a time). Twice the tiles' arithmetic of add_head, half its memory traffic, and
  // scores within a bound of the float ones (item_topk's `precision="bfloat16"` re-scores its candidates in
  // float). Throws where `bf16_head_supported()` is false.
  void add_head_bf16(const float* x, const uint16_t* w16, const float* bias, int64_t dim, int64_t cols,
                     int64_t first_item, bool topk, bool lse, int threads);

  // Offsets o on some logits, before any add with topk: items (num_users, n) row-major item indices (-1 = none;
  // repeats sum their offsets), offsets (num_users, n); x (num_users, dim), w (num_items, dim) row-major (row i =
  // item i), bias (num_items,) or nullptr. Each distinct pair's biased logit z + o (z = x_u . w_i + b_i, summed in
  // vector lanes: add_head's value to float rounding) is offered now (filters applied; NaN never enters), the later
  // adds skip those items in the top-k, and results() corrects the log-sum-exp: those columns count as z + o
  // instead of the z the adds fold in. Once per object; throws on items outside the catalog.
  void add_offsets(const int64_t* items, const float* offsets, int64_t n, const float* x, const float* w,
                   const float* bias, int64_t dim, int threads);

  // items, values: (num_users, k) best first, padded with -1 / -inf; lse: (num_users,) the
  // log-sum-exp of every column added with lse=true (-inf if none).
  void results(int64_t* items, float* values, float* lse) const;

 private:
  struct Entry {
    float value;
    int32_t item;
  };
  void add_user(int64_t u, const float* row, int64_t cols, int64_t first_item, bool topk, bool lse);
  void offer_block(int64_t u, const float* row, int64_t lo, int64_t hi, int64_t first_item, float bound);
  void check_items(const char* who, int64_t first_item, int64_t cols) const;  // throws when outside the catalog
  bool allowed(int64_t u, int64_t item) const;
  void offer(int64_t u, float v, int32_t item);
  float threshold(int64_t u) const;
  void fold_lse(int64_t u, float lane_max, double lane_sum);
  void head(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim, int64_t cols,
            int64_t first_item, bool topk, bool lse, int threads);
  void head_columns(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim,
                    int64_t cols, int64_t first_item, bool topk, bool lse, int threads, int64_t blocks);
  void head_span(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim, int64_t cols,
                 int64_t first_item, bool topk, bool lse);
  void merge(const StreamingTopK& part);
  void offsets_user(int64_t u, const int64_t* items, const float* offsets, int64_t n, const float* x,
                    const float* w, const float* bias, int64_t dim);
  void head_users(int64_t block_begin, int64_t block_end, const float* x, const float* w, const uint16_t* w16,
                  const float* bias, int64_t dim, int64_t cols, int64_t first_item, bool topk, bool lse);

  int64_t num_users_;
  int32_t k_;
  int64_t num_items_;
  const uint8_t* allow_;  // view, as in ItemFilter: the caller keeps it alive until the last add
  int64_t allow_rows_;
  std::vector<std::vector<int64_t>> exclude_;  // (num_users,) sorted
  std::vector<Entry> heap_;      // (num_users, k): a min-heap of the kept entries (worst on top)
  std::vector<int32_t> size_;    // (num_users,)
  std::vector<float> run_max_;   // (num_users,) running max of the lse columns
  std::vector<double> run_sum_;  // (num_users,) sum of exp(score - run_max)
  bool offered_ = false;          // add_offsets ran (once), or an add offered to the top-k (then it may not)
  std::vector<float> off_ref_;    // (num_users,) add_offsets: max of the pairs' z and z + o (-inf: none)
  std::vector<double> off_sub_;   // (num_users,) sum of exp(z - off_ref) over the pairs: out of the lse
  std::vector<double> off_add_;   // (num_users,) sum of exp(z + o - off_ref): into it
};

// True where add_head_bf16 runs: AVX-512 chosen (cpu_isa.h) and the CPU has AVX512-BF16.
bool bf16_head_supported();

}  // namespace genrec
