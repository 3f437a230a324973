#include "packed_attention.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "fast_exp.h"
#include "parallel.h"

namespace genrec {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kKeys = 16;   // keys (and output lanes) per block: one AVX-512 register of accumulators
constexpr int64_t kQueries = 4;  // queries at a time: independent FMA chains over the same key / value loads

// One head: nq query rows attending over nk key / value rows (row strides ldq, ldk, ldv; ldo for out); kt: scratch
// (head_dim, padded), padded = nk rounded up to kKeys; p: scratch (kQueries, padded). Per group of kQueries queries
// (the last group repeats its last query), the scores run kKeys keys at a time over the key lanes (k transposed
// and scaled), in registers across the head dimension; then each query's softmax, and the outputs as the weighted
// sums of v rows, kKeys of the head's lanes at a time.
inline __attribute__((always_inline)) void block_body(const float* q, int64_t ldq, int64_t nq, const float* k,
                                                      int64_t ldk, const float* v, int64_t ldv, int64_t nk,
                                                      int64_t hd, float scale, float* out, int64_t ldo,
                                                      float* __restrict kt, float* __restrict p) {
  const int64_t padded = (nk + kKeys - 1) / kKeys * kKeys;
  for (int64_t c = 0; c < hd; ++c) {
    float* row = kt + c * padded;
    for (int64_t j = 0; j < nk; ++j) row[j] = k[j * ldk + c] * scale;
    for (int64_t j = nk; j < padded; ++j) row[j] = 0.0f;
  }
  for (int64_t i0 = 0; i0 < nq; i0 += kQueries) {
    const float* qs[kQueries];
    for (int64_t r = 0; r < kQueries; ++r) qs[r] = q + std::min(i0 + r, nq - 1) * ldq;
    for (int64_t j0 = 0; j0 < padded; j0 += kKeys) {
      float acc[kQueries][kKeys] = {};
      for (int64_t c = 0; c < hd; ++c) {
        const float* row = kt + c * padded + j0;
        for (int64_t r = 0; r < kQueries; ++r) {
          const float qc = qs[r][c];
#pragma omp simd
          for (int64_t l = 0; l < kKeys; ++l) acc[r][l] += qc * row[l];
        }
      }
      for (int64_t r = 0; r < kQueries; ++r) {
        for (int64_t l = 0; l < kKeys; ++l) p[r * padded + j0 + l] = acc[r][l];
      }
    }
    for (int64_t r = 0; r < kQueries; ++r) {  // softmax over the nk keys, in place
      float* pr = p + r * padded;
      float m = kNegInf;  // NaN scores never raise it; they make the sum NaN below
      for (int64_t j = 0; j < nk; ++j) m = pr[j] > m ? pr[j] : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nk; ++j) {
        pr[j] = exp_nonpositive(pr[j] - m);
        sum += pr[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < nk; ++j) pr[j] *= inv;
    }
    const int64_t rows = std::min(kQueries, nq - i0);
    for (int64_t c0 = 0; c0 < hd; c0 += kKeys) {
      const int64_t n = std::min(kKeys, hd - c0);
      float acc[kQueries][kKeys] = {};
      if (n == kKeys) {
        for (int64_t j = 0; j < nk; ++j) {
          const float* vj = v + j * ldv + c0;
          for (int64_t r = 0; r < kQueries; ++r) {
            const float w = p[r * padded + j];
#pragma omp simd
            for (int64_t l = 0; l < kKeys; ++l) acc[r][l] += w * vj[l];
          }
        }
      } else {  // a head dimension that is no multiple of kKeys: its last lanes
        for (int64_t j = 0; j < nk; ++j) {
          for (int64_t r = 0; r < kQueries; ++r) {
            for (int64_t l = 0; l < n; ++l) acc[r][l] += p[r * padded + j] * v[j * ldv + c0 + l];
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t l = 0; l < n; ++l) out[(i0 + r) * ldo + c0 + l] = acc[r][l];
      }
    }
  }
}

// The builds per instruction set (cpu_isa.h: `target_clones`' avx2 clone has no FMA).
__attribute__((target("avx512f"))) void block_avx512(const float* q, int64_t ldq, int64_t nq, const float* k,
                                                     int64_t ldk, const float* v, int64_t ldv, int64_t nk, int64_t hd,
                                                     float scale, float* out, int64_t ldo, float* kt, float* p) {
  block_body(q, ldq, nq, k, ldk, v, ldv, nk, hd, scale, out, ldo, kt, p);
}

__attribute__((target("avx2,fma"))) void block_avx2(const float* q, int64_t ldq, int64_t nq, const float* k,
                                                    int64_t ldk, const float* v, int64_t ldv, int64_t nk, int64_t hd,
                                                    float scale, float* out, int64_t ldo, float* kt, float* p) {
  block_body(q, ldq, nq, k, ldk, v, ldv, nk, hd, scale, out, ldo, kt, p);
}

void block_base(const float* q, int64_t ldq, int64_t nq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                int64_t nk, int64_t hd, float scale, float* out, int64_t ldo, float* kt, float* p) {
  block_body(q, ldq, nq, k, ldk, v, ldv, nk, hd, scale, out, ldo, kt, p);
}

}  // namespace

int64_t attention_block_scratch(int64_t nk, int64_t head_dim) {
  const int64_t padded = (nk + kKeys - 1) / kKeys * kKeys;
  return (head_dim + kQueries) * padded;
}

void attention_block(const float* q, int64_t ldq, int64_t nq, const float* k, int64_t ldk, const float* v,
                     int64_t ldv, int64_t nk, int64_t head_dim, float scale, float* out, int64_t ldo, float* scratch) {
  static const auto block = cpu_isa() == Isa::kAvx512    ? block_avx512
                            : cpu_isa() == Isa::kAvx2Fma ? block_avx2
                                                         : block_base;
  const int64_t padded = (nk + kKeys - 1) / kKeys * kKeys;
  block(q, ldq, nq, k, ldk, v, ldv, nk, head_dim, scale, out, ldo, scratch, scratch + head_dim * padded);
}

void packed_attention(const float* qkv, int64_t rows, const int64_t* offsets, int64_t num_seqs, int64_t heads,
                      int64_t head_dim, float scale, float* out, int threads) {
  if (rows < 0 || num_seqs < 0 || heads < 1 || head_dim < 1) {
    throw std::invalid_argument("packed_attention: expected rows >= 0, num_seqs >= 0, heads >= 1, head_dim >= 1");
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    if (offsets[b] < 0 || offsets[b + 1] < offsets[b] || offsets[b + 1] > rows) {
      throw std::invalid_argument("packed_attention: offsets must be non-decreasing within [0, " +
                                  std::to_string(rows) + "], got [" + std::to_string(offsets[b]) + ", " +
                                  std::to_string(offsets[b + 1]) + ") for sequence " + std::to_string(b));
    }
    longest = std::max(longest, offsets[b + 1] - offsets[b]);
  }
  const int64_t C = heads * head_dim, ld = 3 * C;
  const int64_t per_thread = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, longest * longest));
  parallel_for(num_seqs, threads, per_thread, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(attention_block_scratch(longest, head_dim));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = offsets[b], len = offsets[b + 1] - r0;
      for (int64_t h = 0; h < heads; ++h) {
        const float* q = qkv + r0 * ld + h * head_dim;
        attention_block(q, ld, len, q + C, ld, q + 2 * C, ld, len, head_dim, scale, out + r0 * C + h * head_dim, C,
                        scratch.data());
      }
    }
  });
}

}  // namespace genrec
