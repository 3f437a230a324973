#include "topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include <immintrin.h>

// The AVX512-BF16 intrinsics: GCC 10 and Clang 10 on. An older compiler builds without the bfloat16 head
// (bf16_head_supported() false, add_head_bf16 throws).
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 10) || (!defined(__clang__) && __GNUC__ >= 10))
#define GENREC_BF16_HEAD 1
#else
#define GENREC_BF16_HEAD 0
#endif

#include "cpu_isa.h"
#include "dot.h"
#include "fast_exp.h"
#include "parallel.h"

namespace genrec {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 64;  // columns per block of the top-k scan: one max, then rare inserts
constexpr int kLanes = 16;      // users per tile of the fused head (one AVX-512 register of floats)
constexpr int kItems = 8;       // columns per tile at most (AVX-512: 8 accumulator registers)
constexpr int kAvx2Items = 6;   // AVX2 + FMA: 6 columns x 2 registers of users (12 of 16 registers)
constexpr int64_t kChunk = 512; // columns of w per pass over the users: 512 x 64 floats = 128 KB, in L2
constexpr int64_t kSpan = 2048;          // columns per block of the split head: (users x 2048) scores, in L2
constexpr int64_t kMinSplit = 1 << 14;   // columns per thread of the split head at least
constexpr int64_t kTileMinUsers = 12;   // fewer users: the split head's dots run over dim (tiles' lanes idle)

// Heap order: `a` ranks after `b` (lower score, or equal score and larger item).
bool worse(float av, int32_t ai, float bv, int32_t bi) { return av < bv || (av == bv && ai > bi); }

// One pass over row[0:n] in blocks of kBlock: block_max[b] = max of block b (NaN ignored, -inf if all
// NaN) and, if lse, the running (max, sum of exp(x - max)) updated block by block, so each block is read
// from memory once. Returns the max of the whole row.
__attribute__((target_clones("avx512f", "avx2", "default")))
float scan_row(const float* row, int64_t n, float* block_max, bool lse, float& run_max, double& run_sum) {
  float row_max = kNegInf;
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    const int64_t len = std::min(kBlock, n - lo);
    const float* x = row + lo;
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = x[j] > m ? x[j] : m;
    block_max[b] = m;
    row_max = m > row_max ? m : row_max;
    if (!lse || m == kNegInf) continue;
    if (m > run_max) {
      run_sum = run_max == kNegInf ? 0.0 : run_sum * std::exp(static_cast<double>(run_max) - m);
      run_max = m;
    }
    const float shift = run_max;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += exp_nonpositive(x[j] - shift);
    run_sum += s;
  }
  return row_max;
}

// Folds a tile's scores a[Items][kLanes] (its first n rows real) into tile / tile_max and, with lse, each lane's
// running (max, sum of exp(x - max)): the second half of every tile kernel.
template <int Items>
inline __attribute__((always_inline)) void tile_finish(const float (&a)[Items][kLanes], int32_t n, bool lse,
                                                       float* __restrict tile, float* __restrict tile_max,
                                                       float* __restrict lane_max, float* __restrict lane_sum) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = kNegInf;
  for (int jj = 0; jj < n; ++jj) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) m[l] = a[jj][l] > m[l] ? a[jj][l] : m[l];
  }
  std::memcpy(tile, a, sizeof a);
  std::memcpy(tile_max, m, sizeof m);
  if (!lse) return;
  float shift[kLanes], scale[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    shift[l] = m[l] > lane_max[l] ? m[l] : lane_max[l];
    // the old sum, rescaled to the new max (exp(0) = 1 when it did not move; a -inf max had sum 0)
    scale[l] = exp_nonpositive(lane_max[l] - shift[l]);
  }
  float s[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) s[l] = lane_sum[l] * scale[l];
  for (int jj = 0; jj < n; ++jj) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) s[l] += exp_nonpositive(a[jj][l] - shift[l]);
  }
  for (int l = 0; l < kLanes; ++l) {
    if (shift[l] == kNegInf) continue;  // every entry so far -inf (or NaN): nothing to add
    lane_max[l] = shift[l];
    lane_sum[l] = s[l];
  }
}

// One tile of the fused head: tile[jj][l] = bias[jj] + sum_c xt[c][l] * w[jj][c] for Items rows of w and
// kLanes users (xt: (dim, kLanes), users along the lanes); tile_max[l] = max over the first n rows (NaN
// ignored); with lse, each lane's running (max, sum of exp(x - max)) takes in those n entries. Items x kLanes
// accumulators: sized per instruction set (`head_tile_for`) so that they stay in registers.
template <int Items>
inline __attribute__((always_inline)) void head_tile_body(const float* __restrict xt, const float* __restrict w,
                                                          int64_t dim, const float* bias, int32_t n, bool lse,
                                                          float* __restrict tile, float* __restrict tile_max,
                                                          float* __restrict lane_max, float* __restrict lane_sum) {
  float a[Items][kLanes];
  for (int jj = 0; jj < Items; ++jj) {
    const float b0 = bias != nullptr ? bias[jj] : 0.0f;  // Items entries (a short last tile's padded by the caller)
    for (int l = 0; l < kLanes; ++l) a[jj][l] = b0;
  }
  for (int64_t c = 0; c < dim; ++c) {
    const float* xc = xt + c * kLanes;
    for (int jj = 0; jj < Items; ++jj) {
      const float wc = w[jj * dim + c];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) a[jj][l] += xc[l] * wc;
    }
  }
  tile_finish<Items>(a, n, lse, tile, tile_max, lane_max, lane_sum);
}

using HeadTile = void (*)(const float*, const float*, int64_t, const float*, int32_t, bool, float*, float*, float*,
                          float*);

__attribute__((target("avx512f"))) void head_tile_avx512(const float* xt, const float* w, int64_t dim,
                                                         const float* bias, int32_t n, bool lse, float* tile,
                                                         float* tile_max, float* lane_max, float* lane_sum) {
  head_tile_body<8>(xt, w, dim, bias, n, lse, tile, tile_max, lane_max, lane_sum);  // 8 of 32 registers
}

__attribute__((target("avx2,fma"))) void head_tile_avx2(const float* xt, const float* w, int64_t dim,
                                                        const float* bias, int32_t n, bool lse, float* tile,
                                                        float* tile_max, float* lane_max, float* lane_sum) {
  head_tile_body<kAvx2Items>(xt, w, dim, bias, n, lse, tile, tile_max, lane_max, lane_sum);
}

void head_tile_base(const float* xt, const float* w, int64_t dim, const float* bias, int32_t n, bool lse,
                    float* tile, float* tile_max, float* lane_max, float* lane_sum) {
  head_tile_body<kItems>(xt, w, dim, bias, n, lse, tile, tile_max, lane_max, lane_sum);
}

// The tile kernel this CPU runs (cpu_isa.h) and its rows of w a tile.
std::pair<HeadTile, int> head_tile_for() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {head_tile_avx512, 8};
    case Isa::kAvx2Fma:
      return {head_tile_avx2, kAvx2Items};
    default:
      return {head_tile_base, kItems};
  }
}

// ---- bfloat16 rows (add_head_bf16): AVX512-BF16 tiles, x rounded to bfloat16 pairs ----

constexpr int kBf16Items = 8;  // rows of w per bfloat16 tile (8 accumulator registers)

// float -> bfloat16 bits, rounded to nearest even (NaN stays NaN).
inline uint32_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

#if GENREC_BF16_HEAD
// `head_tile_body` over bfloat16 rows w (Items, dim) and xt2 (dim / 2, kLanes): each lane x's pair (x[2c],
// x[2c + 1]) rounded to bfloat16 in one 32-bit word, so one VDPBF16PS takes two columns for 16 users (float
// accumulators; the bias in float).
__attribute__((target("avx512f,avx512bf16"))) void head_tile_bf16(const uint32_t* xt2, const uint16_t* w,
                                                                 int64_t dim, const float* bias, int32_t n,
                                                                 bool lse, float* tile, float* tile_max,
                                                                 float* lane_max, float* lane_sum) {
  __m512 acc[kBf16Items];
  for (int jj = 0; jj < kBf16Items; ++jj) acc[jj] = _mm512_set1_ps(bias != nullptr ? bias[jj] : 0.0f);
  for (int64_t c2 = 0; c2 < dim / 2; ++c2) {
    const __m512i xv = _mm512_loadu_si512(xt2 + c2 * kLanes);
    for (int jj = 0; jj < kBf16Items; ++jj) {
      uint32_t pair;
      std::memcpy(&pair, w + jj * dim + 2 * c2, sizeof pair);
      acc[jj] = _mm512_dpbf16_ps(acc[jj], (__m512bh)xv, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
    }
  }
  alignas(64) float a[kBf16Items][kLanes];
  for (int jj = 0; jj < kBf16Items; ++jj) _mm512_store_ps(a[jj], acc[jj]);
  tile_finish<kBf16Items>(a, n, lse, tile, tile_max, lane_max, lane_sum);
}

// `column_dots` over bfloat16 rows, x rounded to bfloat16 too (as in the tiles): per row and user, VDPBF16PS over
// 32 columns at a time (the last chunk by a masked load), then one sum across the lanes. A few users' scan: bound
// by reading the table, half the bytes of the float rows.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void column_dots_bf16(const float* __restrict x, int64_t users, const uint16_t* __restrict w, const float* bias,
                      int64_t n, int64_t dim, float* __restrict z, int64_t ld) {
  constexpr int64_t kChunkCols = 32;  // bfloat16 columns per register
  const int64_t chunks = (dim + kChunkCols - 1) / kChunkCols;
  thread_local std::vector<uint16_t> xb;  // (users, chunks * 32) x rounded, zero-padded
  xb.assign(users * chunks * kChunkCols, 0);
  for (int64_t u = 0; u < users; ++u) {
    for (int64_t c = 0; c < dim; ++c) xb[u * chunks * kChunkCols + c] = static_cast<uint16_t>(to_bf16(x[u * dim + c]));
  }
  const int64_t rest = dim - (chunks - 1) * kChunkCols;
  const __mmask32 last = rest == kChunkCols ? ~__mmask32{0} : (__mmask32{1} << rest) - 1;
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* wj = w + j * dim;
    if (j + 8 < n) _mm_prefetch(reinterpret_cast<const char*>(w + (j + 8) * dim), _MM_HINT_T0);
    for (int64_t u = 0; u < users; ++u) {
      const uint16_t* xu = xb.data() + u * chunks * kChunkCols;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask32 m = c + 1 == chunks ? last : ~__mmask32{0};
        const __m512i wv = _mm512_maskz_loadu_epi16(m, wj + c * kChunkCols);
        const __m512i xv = _mm512_loadu_si512(xu + c * kChunkCols);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)wv, (__m512bh)xv);
      }
      const float dotv = _mm512_reduce_add_ps(acc);
      z[u * ld + j] = bias != nullptr ? dotv + bias[j] : dotv;
    }
  }
}
#else  // no AVX512-BF16 intrinsics: never called (bf16_head_supported() is false)
void head_tile_bf16(const uint32_t*, const uint16_t*, int64_t, const float*, int32_t, bool, float*, float*, float*,
                    float*) {}
void column_dots_bf16(const float*, int64_t, const uint16_t*, const float*, int64_t, int64_t, float*, int64_t) {}
#endif

// z[i] = bias[ids[i]] + x . w[ids[i]] for n rows of w scattered over the table (bias may be nullptr); the sum
// over dim runs in vector lanes, so it equals a matmul's to float rounding, not bit for bit.
__attribute__((target_clones("avx512f", "avx2", "default")))
void gather_dots(const float* __restrict x, const float* __restrict w, const float* bias, const int64_t* ids,
                 int64_t n, int64_t dim, float* __restrict z) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + 4 < n) prefetch(w + ids[i + 4] * dim);  // rows are scattered over the table
    const float acc = dot(x, w + ids[i] * dim, dim);
    z[i] = bias != nullptr ? acc + bias[ids[i]] : acc;
  }
}

// z[u * ld + j] = bias[j] + x[u] . w[j] for `users` rows of x and n rows of w (bias may be nullptr), four rows
// of w at a time (four independent sums in vector lanes): a matmul's values to float rounding.
__attribute__((target_clones("avx512f", "avx2", "default")))
void column_dots(const float* __restrict x, int64_t users, const float* __restrict w, const float* bias, int64_t n,
                 int64_t dim, float* __restrict z, int64_t ld) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* w0 = w + j * dim;
    const float* w1 = w0 + dim;
    const float* w2 = w1 + dim;
    const float* w3 = w2 + dim;
    for (int64_t u = 0; u < users; ++u) {
      const float* xu = x + u * dim;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t c = 0; c < dim; ++c) {
        a0 += xu[c] * w0[c];
        a1 += xu[c] * w1[c];
        a2 += xu[c] * w2[c];
        a3 += xu[c] * w3[c];
      }
      float* zu = z + u * ld + j;
      zu[0] = bias != nullptr ? a0 + bias[j] : a0;
      zu[1] = bias != nullptr ? a1 + bias[j + 1] : a1;
      zu[2] = bias != nullptr ? a2 + bias[j + 2] : a2;
      zu[3] = bias != nullptr ? a3 + bias[j + 3] : a3;
    }
  }
  for (; j < n; ++j) {
    for (int64_t u = 0; u < users; ++u) {
      const float acc = dot(x + u * dim, w + j * dim, dim);
      z[u * ld + j] = bias != nullptr ? acc + bias[j] : acc;
    }
  }
}

// sum of exp(x[i] - ref) over x[0:n] <= ref (NaN propagates), the terms in float as the scan's lse has them
__attribute__((target_clones("avx512f", "avx2", "default")))
double sum_exp(const float* x, int64_t n, float ref) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_nonpositive(x[i] - ref);
  return s;
}

}  // namespace

StreamingTopK::StreamingTopK(int64_t num_users, int32_t k, int64_t num_items, const ItemFilter& filter)
    : num_users_(num_users), k_(k), num_items_(num_items), allow_(filter.allow), allow_rows_(filter.allow_rows) {
  if (num_users < 0) throw std::invalid_argument("num_users must be >= 0, got " + std::to_string(num_users));
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  if (num_items < 0 || num_items > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("num_items must be in [0, 2**31), got " + std::to_string(num_items));
  }
  check_filter(filter, num_users, num_items);
  if (allow_ != nullptr && allow_rows_ != 1 && allow_rows_ != num_users) {
    throw std::invalid_argument("allow must have 1 row or num_users rows");
  }
  exclude_.resize(num_users);
  if (filter.exclude_ptr != nullptr) {
    for (int64_t u = 0; u < num_users; ++u) {
      exclude_[u].assign(filter.exclude_items + filter.exclude_ptr[u], filter.exclude_items + filter.exclude_ptr[u + 1]);
      std::sort(exclude_[u].begin(), exclude_[u].end());
    }
  }
  heap_.resize(num_users * k);
  size_.assign(num_users, 0);
  run_max_.assign(num_users, kNegInf);
  run_sum_.assign(num_users, 0.0);
}

void StreamingTopK::check_items(const char* who, int64_t first_item, int64_t cols) const {
  if (first_item < 0 || first_item + cols > num_items_) {
    throw std::invalid_argument(std::string(who) + ": items [" + std::to_string(first_item) + ", " +
                                std::to_string(first_item + cols) + ") outside the catalog [0, " +
                                std::to_string(num_items_) + ")");
  }
}

bool StreamingTopK::allowed(int64_t u, int64_t item) const {
  if (allow_ != nullptr && allow_[(allow_rows_ == 1 ? 0 : u) * num_items_ + item] == 0) return false;
  const auto& ex = exclude_[u];
  return ex.empty() || !std::binary_search(ex.begin(), ex.end(), item);
}

void StreamingTopK::add(const float* scores, int64_t ld, int64_t cols, int64_t first_item, bool topk,
                        bool lse, int threads) {
  if (cols < 0 || ld < cols) {
    throw std::invalid_argument("add: expected 0 <= cols <= ld, got cols=" + std::to_string(cols) +
                                " ld=" + std::to_string(ld));
  }
  if (topk) check_items("add", first_item, cols);
  offered_ = offered_ || topk;
  if (cols == 0 || num_users_ == 0) return;
  // ~16k columns per thread at least: below that a thread costs more than it saves
  const int64_t min_users = std::max<int64_t>(1, (1 << 14) / cols);
  parallel_for(num_users_, threads, min_users, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) add_user(u, scores + u * ld, cols, first_item, topk, lse);
  });
}

void StreamingTopK::add_user(int64_t u, const float* row, int64_t cols, int64_t first_item, bool topk,
                             bool lse) {
  thread_local std::vector<float> block_max;
  block_max.resize((cols + kBlock - 1) / kBlock);
  scan_row(row, cols, block_max.data(), lse, run_max_[u], run_sum_[u]);
  if (!topk) return;
  // Without filters the k-th largest block max bounds this chunk's k-th best score from below (each
  // block max is a distinct entry), so only the ~k blocks reaching it can hold a top-k entry.
  float bound = kNegInf;
  if (allow_ == nullptr && exclude_[u].empty() && block_max.size() > static_cast<size_t>(k_)) {
    thread_local std::vector<float> scratch;
    scratch.assign(block_max.begin(), block_max.end());
    std::nth_element(scratch.begin(), scratch.begin() + (k_ - 1), scratch.end(), std::greater<float>());
    bound = scratch[k_ - 1];
  }
  for (size_t b = 0; b < block_max.size(); ++b) {
    if (block_max[b] < bound) continue;
    const float threshold = size_[u] == k_ ? heap_[u * k_].value : kNegInf;
    // >=: an equal score may hold a smaller item; a heap not yet full takes anything but NaN
    if (block_max[b] >= threshold || size_[u] < k_) {
      const int64_t lo = static_cast<int64_t>(b) * kBlock;
      offer_block(u, row, lo, std::min(cols, lo + kBlock), first_item, bound);
    }
  }
}

// Offers row[lo:hi] to user u's heap (a min-heap by `worse`: the worst kept entry on top); entries
// below `bound` are known not to make the top k.
void StreamingTopK::offer_block(int64_t u, const float* row, int64_t lo, int64_t hi, int64_t first_item,
                                float bound) {
  for (int64_t j = lo; j < hi; ++j) {
    if (row[j] >= bound) offer(u, row[j], static_cast<int32_t>(first_item + j));
  }
}

// Offers one entry to user u's heap (NaN never enters).
void StreamingTopK::offer(int64_t u, float v, int32_t item) {
  Entry* heap = &heap_[u * k_];
  int32_t& size = size_[u];
  const auto cmp = [](const Entry& a, const Entry& b) { return worse(b.value, b.item, a.value, a.item); };
  if (std::isnan(v)) return;
  if (size == k_ && !worse(heap[0].value, heap[0].item, v, item)) return;
  if (!allowed(u, item)) return;
  if (size == k_) {
    std::pop_heap(heap, heap + size, cmp);
    --size;
  }
  heap[size++] = {v, item};
  std::push_heap(heap, heap + size, cmp);
}

float StreamingTopK::threshold(int64_t u) const { return size_[u] == k_ ? heap_[u * k_].value : kNegInf; }

// run (max, sum) of user u += a (lane_max, lane_sum) pair: sum of exp(x - lane_max) over some entries.
void StreamingTopK::fold_lse(int64_t u, float lane_max, double lane_sum) {
  if (lane_max == kNegInf) return;
  const float new_max = std::max(run_max_[u], lane_max);
  const double old = run_max_[u] == kNegInf ? 0.0 : run_sum_[u] * std::exp(static_cast<double>(run_max_[u]) - new_max);
  run_sum_[u] = old + lane_sum * std::exp(static_cast<double>(lane_max) - new_max);
  run_max_[u] = new_max;
}

// ---- offsets on (user, item) pairs: offered before the scan, which then skips them ----

void StreamingTopK::add_offsets(const int64_t* items, const float* offsets, int64_t n, const float* x,
                                const float* w, const float* bias, int64_t dim, int threads) {
  if (n < 0 || dim < 1) {
    throw std::invalid_argument("add_offsets: expected n >= 0 and dim >= 1, got n=" + std::to_string(n) +
                                " dim=" + std::to_string(dim));
  }
  if (offered_) throw std::invalid_argument("add_offsets: must come once, before any add to the top-k");
  offered_ = true;
  off_ref_.assign(num_users_, kNegInf);
  off_sub_.assign(num_users_, 0.0);
  off_add_.assign(num_users_, 0.0);
  parallel_for(num_users_, threads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) offsets_user(u, items, offsets, n, x, w, bias, dim);
  });
}

void StreamingTopK::offsets_user(int64_t u, const int64_t* items, const float* offsets, int64_t n, const float* x,
                                 const float* w, const float* bias, int64_t dim) {
  thread_local std::vector<uint64_t> keys;  // item * n + column: sorted, the repeats of an item side by side
  thread_local std::vector<int64_t> ids;    // the distinct items, ascending
  thread_local std::vector<double> o;       // their offsets, summed in column order
  thread_local std::vector<float> z, v;     // their logits, biased logits
  keys.clear();
  const int64_t* row = items + u * n;
  for (int64_t j = 0; j < n; ++j) {
    if (row[j] < 0) continue;
    if (row[j] >= num_items_) {
      throw std::invalid_argument("add_offsets: item " + std::to_string(row[j]) + " outside the catalog [0, " +
                                  std::to_string(num_items_) + ")");
    }
    keys.push_back(static_cast<uint64_t>(row[j]) * static_cast<uint64_t>(n) + static_cast<uint64_t>(j));
  }
  std::sort(keys.begin(), keys.end());
  ids.clear();
  o.clear();
  for (const uint64_t key : keys) {
    const auto item = static_cast<int64_t>(key / static_cast<uint64_t>(n));
    if (ids.empty() || ids.back() != item) {
      ids.push_back(item);
      o.push_back(0.0);
    }
    o.back() += offsets[u * n + static_cast<int64_t>(key % static_cast<uint64_t>(n))];
  }
  const auto m = static_cast<int64_t>(ids.size());
  z.resize(m);
  v.resize(m);
  gather_dots(x + u * dim, w, bias, ids.data(), m, dim, z.data());
  float ref = kNegInf;  // NaN ignored here: the scan's lse of that column is NaN already
  for (int64_t i = 0; i < m; ++i) {
    v[i] = static_cast<float>(z[i] + o[i]);
    ref = std::max(ref, std::max(z[i], v[i]));
  }
  if (ref != kNegInf) {
    off_ref_[u] = ref;
    off_sub_[u] = sum_exp(z.data(), m, ref);
    off_add_[u] = sum_exp(v.data(), m, ref);
  }
  for (int64_t i = 0; i < m; ++i) offer(u, v[i], static_cast<int32_t>(ids[i]));
  auto& ex = exclude_[u];  // the scan skips them from now on (offer's `allowed`)
  const auto old = static_cast<std::ptrdiff_t>(ex.size());
  ex.insert(ex.end(), ids.begin(), ids.end());
  if (old > 0) std::inplace_merge(ex.begin(), ex.begin() + old, ex.end());
}

// ---- the fused head: scores of 16 users x 6-8 columns per tile (per instruction set), never stored ----

void StreamingTopK::add_head(const float* x, const float* w, const float* bias, int64_t dim, int64_t cols,
                             int64_t first_item, bool topk, bool lse, int threads) {
  head(x, w, nullptr, bias, dim, cols, first_item, topk, lse, threads);
}

void StreamingTopK::add_head_bf16(const float* x, const uint16_t* w16, const float* bias, int64_t dim, int64_t cols,
                                  int64_t first_item, bool topk, bool lse, int threads) {
  if (!bf16_head_supported()) {
    throw std::invalid_argument("add_head_bf16: this CPU has no AVX512-BF16 (or GENREC_CPU_ISA asks for less)");
  }
  if (dim % 2 != 0) throw std::invalid_argument("add_head_bf16: expected an even dim, got " + std::to_string(dim));
  head(x, nullptr, w16, bias, dim, cols, first_item, topk, lse, threads);
}

// add_head / add_head_bf16: rows of w in float, or of w16 in bfloat16 (the other nullptr).
void StreamingTopK::head(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim,
                         int64_t cols, int64_t first_item, bool topk, bool lse, int threads) {
  if (dim < 1 || cols < 0) {
    throw std::invalid_argument("add_head: expected dim >= 1 and cols >= 0, got dim=" + std::to_string(dim) +
                                " cols=" + std::to_string(cols));
  }
  if (topk) check_items("add_head", first_item, cols);
  offered_ = offered_ || topk;
  if (cols == 0 || num_users_ == 0) return;
  threads = resolve_threads(threads);
  const int64_t blocks = (num_users_ + kLanes - 1) / kLanes;
  if (blocks < threads || num_users_ < kTileMinUsers) {  // too few users to go round: split the columns
    head_columns(x, w, w16, bias, dim, cols, first_item, topk, lse, threads, blocks);
    return;
  }
  parallel_for(blocks, threads, 1, [&](int64_t begin, int64_t end) {
    head_users(begin, end, x, w, w16, bias, dim, cols, first_item, topk, lse);
  });
}

// Too few users to give every thread a tile of them: up to `threads` spans of >= kMinSplit columns, each scanned
// for every user into a partial top-k and log-sum-exp that starts empty (a copy with this object's filters),
// merged here in span order. A span runs the tiles (kTileMinUsers users or more) or dots over dim.
void StreamingTopK::head_columns(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim,
                                 int64_t cols, int64_t first_item, bool topk, bool lse, int threads, int64_t blocks) {
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>(threads, cols / kMinSplit));
  const auto run = [&](StreamingTopK& part, int64_t lo, int64_t hi) {
    const float* b = bias == nullptr ? nullptr : bias + lo;
    const float* wl = w == nullptr ? nullptr : w + lo * dim;
    const uint16_t* w16l = w16 == nullptr ? nullptr : w16 + lo * dim;
    if (num_users_ >= kTileMinUsers) {
      part.head_users(0, blocks, x, wl, w16l, b, dim, hi - lo, first_item + lo, topk, lse);
    } else {
      part.head_span(x, wl, w16l, b, dim, hi - lo, first_item + lo, topk, lse);
    }
  };
  if (spans == 1) {
    run(*this, 0, cols);
    return;
  }
  std::vector<StreamingTopK> parts(spans, *this);
  for (auto& p : parts) {
    std::fill(p.size_.begin(), p.size_.end(), 0);
    std::fill(p.run_max_.begin(), p.run_max_.end(), kNegInf);
    std::fill(p.run_sum_.begin(), p.run_sum_.end(), 0.0);
  }
  parallel_for(spans, static_cast<int>(spans), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run(parts[i], cols * i / spans, cols * (i + 1) / spans);
  });
  for (const auto& p : parts) merge(p);
}

// Columns [0, cols) of the head (rows of w or w16, from first_item) for every user, kSpan at a time: the scores
// of a block into a buffer, then each user's row into the top-k and log-sum-exp (add_user).
void StreamingTopK::head_span(const float* x, const float* w, const uint16_t* w16, const float* bias, int64_t dim,
                              int64_t cols, int64_t first_item, bool topk, bool lse) {
  thread_local std::vector<float> z;
  z.resize(num_users_ * kSpan);  // (num_users, kSpan)
  for (int64_t j = 0; j < cols; j += kSpan) {
    const int64_t n = std::min(kSpan, cols - j);
    const float* b = bias == nullptr ? nullptr : bias + j;
    if (w16 != nullptr) {
      column_dots_bf16(x, num_users_, w16 + j * dim, b, n, dim, z.data(), kSpan);
    } else {
      column_dots(x, num_users_, w + j * dim, b, n, dim, z.data(), kSpan);
    }
    for (int64_t u = 0; u < num_users_; ++u) add_user(u, z.data() + u * kSpan, n, first_item + j, topk, lse);
  }
}

// Takes in a partial's entries and log-sum-exp (same users, filters and k).
void StreamingTopK::merge(const StreamingTopK& part) {
  for (int64_t u = 0; u < num_users_; ++u) {
    for (int32_t i = 0; i < part.size_[u]; ++i) {
      const Entry& e = part.heap_[u * k_ + i];
      offer(u, e.value, e.item);
    }
    fold_lse(u, part.run_max_[u], part.run_sum_[u]);
  }
}

void StreamingTopK::head_users(int64_t block_begin, int64_t block_end, const float* x, const float* w,
                               const uint16_t* w16, const float* bias, int64_t dim, int64_t cols, int64_t first_item,
                               bool topk, bool lse) {
  const int64_t nb = block_end - block_begin;
  const bool half = w16 != nullptr;
  const int64_t words = half ? dim / 2 : dim;  // per lane and block: floats, or bfloat16 pairs
  std::vector<float> xt(half ? 0 : nb * dim * kLanes, 0.0f);  // per block (dim, kLanes): users along the lanes
  std::vector<uint32_t> xt2(half ? nb * words * kLanes : 0, 0u);  // or (dim / 2, kLanes) bfloat16 pairs
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t u = (block_begin + b) * kLanes + l;
      if (u >= num_users_) break;
      const float* xu = x + u * dim;
      if (half) {
        for (int64_t c = 0; c < words; ++c) {
          xt2[(b * words + c) * kLanes + l] = to_bf16(xu[2 * c]) | (to_bf16(xu[2 * c + 1]) << 16);
        }
      } else {
        for (int64_t c = 0; c < dim; ++c) xt[(b * dim + c) * kLanes + l] = xu[c];
      }
    }
  }
  const auto [tile_fn, items] = half ? std::pair<HeadTile, int>{nullptr, kBf16Items} : head_tile_for();
  std::vector<float> tail(kItems * dim, 0.0f);      // the last cols % items rows of w, zero-padded
  std::vector<uint16_t> tail16(kItems * dim, 0u);   // (or of w16)
  float tail_bias[kItems];                           // and their biases
  std::vector<float> lane_max(kLanes), lane_sum(kLanes);
  alignas(64) float tile[kItems * kLanes];
  alignas(64) float tile_max[kLanes];
  float thr[kLanes];  // each lane's heap threshold (-inf until its heap is full), refreshed after offers
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {  // w rows c0.. stay in L2 while every block uses them
    const int64_t c1 = std::min(cols, c0 + kChunk);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t u0 = (block_begin + b) * kLanes;
      const int64_t lanes = std::min<int64_t>(kLanes, num_users_ - u0);
      std::fill(lane_max.begin(), lane_max.end(), kNegInf);
      std::fill(lane_sum.begin(), lane_sum.end(), 0.0f);
      for (int64_t l = 0; l < lanes; ++l) thr[l] = threshold(u0 + l);
      for (int64_t j = c0; j < c1; j += items) {
        const int32_t n = static_cast<int32_t>(std::min<int64_t>(items, c1 - j));
        const float* rows = half ? nullptr : w + j * dim;
        const uint16_t* rows16 = half ? w16 + j * dim : nullptr;
        const float* tile_bias = bias == nullptr ? nullptr : bias + j;
        if (n < items) {  // a short last tile: pad with zero rows, which are never read back
          if (half) {
            std::fill(tail16.begin(), tail16.end(), uint16_t{0});
            std::copy(rows16, rows16 + n * dim, tail16.begin());
            rows16 = tail16.data();
          } else {
            std::fill(tail.begin(), tail.end(), 0.0f);
            std::copy(rows, rows + n * dim, tail.begin());
            rows = tail.data();
          }
          if (bias != nullptr) {
            std::fill(tail_bias, tail_bias + kItems, 0.0f);
            std::copy(bias + j, bias + j + n, tail_bias);
            tile_bias = tail_bias;
          }
        }
        if (half) {
          head_tile_bf16(&xt2[b * words * kLanes], rows16, dim, tile_bias, n, lse, tile, tile_max, lane_max.data(),
                         lane_sum.data());
        } else {
          tile_fn(&xt[b * dim * kLanes], rows, dim, tile_bias, n, lse, tile, tile_max, lane_max.data(),
                  lane_sum.data());
        }
        if (!topk) continue;
        for (int64_t l = 0; l < lanes; ++l) {
          if (tile_max[l] < thr[l]) continue;  // the usual case once the heap is full
          for (int32_t jj = 0; jj < n; ++jj) {
            const float v = tile[jj * kLanes + l];
            if (v >= thr[l]) offer(u0 + l, v, static_cast<int32_t>(first_item + j + jj));  // >=: ties by item
          }
          thr[l] = threshold(u0 + l);
        }
      }
      if (lse) {
        for (int64_t l = 0; l < lanes; ++l) fold_lse(u0 + l, lane_max[l], lane_sum[l]);
      }
    }
  }
}

void StreamingTopK::results(int64_t* items, float* values, float* lse) const {
  std::vector<Entry> sorted;
  for (int64_t u = 0; u < num_users_; ++u) {
    sorted.assign(heap_.begin() + u * k_, heap_.begin() + u * k_ + size_[u]);
    std::sort(sorted.begin(), sorted.end(),
              [](const Entry& a, const Entry& b) { return worse(b.value, b.item, a.value, a.item); });
    for (int32_t j = 0; j < k_; ++j) {
      const bool found = j < static_cast<int32_t>(sorted.size());
      items[u * k_ + j] = found ? sorted[j].item : -1;
      values[u * k_ + j] = found ? sorted[j].value : kNegInf;
    }
    double norm = run_max_[u] == kNegInf ? -std::numeric_limits<double>::infinity()
                                         : run_max_[u] + std::log(run_sum_[u]);
    if (!off_ref_.empty() && off_ref_[u] != kNegInf) {  // the pairs' columns: z + o instead of z
      const double r = off_ref_[u], m = std::max(norm, r);
      const double rest = std::max(std::exp(norm - m) - off_sub_[u] * std::exp(r - m), 0.0);
      norm = m + std::log(rest + off_add_[u] * std::exp(r - m));
    }
    lse[u] = static_cast<float>(norm);
  }
}

bool bf16_head_supported() {
#if GENREC_BF16_HEAD
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace genrec
