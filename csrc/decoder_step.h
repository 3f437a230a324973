// One decoder step of the trie search on the CPU, in one call (GenRec.decode_step_hidden with its cache): the
// new token of every beam row through the embedding and each decoder layer (self-attention over the row's cached
// keys and values, cross-attention over its user's encoder keys and values, FFN), the new keys and values written
// into the cache. python/genrec_fast/first_step.py wraps it; the PyTorch step is its reference.
#pragma once

#include <cstdint>
#include <vector>

#include "first_step.h"

namespace genrec {

// The decoder cache as GenRec's DecoderCache holds it, C-contiguous float32 (hd = dim / heads):
struct DecoderCacheView {
  int64_t rows = 0;      // R = users x width, user-major: row r belongs to user r / width
  int64_t users = 0;     // U
  int64_t step = 0;      // t: this step's position (decoder position t, cache slot t)
  int64_t capacity = 0;  // the self-attention buffers' slots, > step
  int64_t memory_len = 0;          // S: the cross buffers' positions
  const int64_t* lengths = nullptr;  // (U,) valid encoder positions of each user
  std::vector<float*> self_k, self_v;           // per layer (R, heads, capacity, hd): slots < step filled
  std::vector<const float*> cross_k, cross_v;  // per layer (U, heads, S, hd)
};

// tokens (R,) -> hidden (R, dim), the last layer's states; writes slot `step` of every layer's self K/V. Rows run
// on up to `threads` threads (<= 0: all cores). Throws std::invalid_argument on bad sizes, tokens or positions.
void decoder_step(const FirstStepModel& m, const int64_t* tokens, const DecoderCacheView& cache, float* hidden,
                  int threads);

}  // namespace genrec
