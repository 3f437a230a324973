// Self-attention of variable-length sequences stored back to back, without padding (the encoder at
// inference: only the real pieces of a batch, `GenRec._encode_packed`).
#pragma once

#include <cstdint>

namespace genrec {

// qkv: (rows, 3 * heads * head_dim) row-major, each row [q | k | v], the heads side by side within each part.
// Sequence b is rows [offsets[b], offsets[b + 1]) (offsets: num_seqs + 1 non-decreasing entries in
// [0, rows]). out: (rows, heads * head_dim) row-major; for a row i of sequence b and head h,
//   out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h]) v[j, h]   over the rows j of sequence b,
// NaN in, NaN out. Rows outside every sequence are left as they are. Sequences run on up to `threads` threads
// (<= 0: all cores). Throws std::invalid_argument on bad sizes or offsets.
void packed_attention(const float* qkv, int64_t rows, const int64_t* offsets, int64_t num_seqs, int64_t heads,
                      int64_t head_dim, float scale, float* out, int threads);

// One head's attention of nq query rows over nk key / value rows, on the calling thread: out row i (head_dim,) =
// sum_j softmax_j(scale q_i . k_j) v_j, q, k, v, out rows at strides ldq, ldk, ldv, ldo (nk >= 1). The keys are
// transposed once for all the queries, and 4 queries x 16 keys of scores sum in registers. scratch:
// `attention_block_scratch(nk, head_dim)` floats. (packed_attention's per-sequence kernel; the decoder step's
// cross-attention of a user's beams over its encoder rows.)
void attention_block(const float* q, int64_t ldq, int64_t nq, const float* k, int64_t ldk, const float* v,
                     int64_t ldv, int64_t nk, int64_t head_dim, float scale, float* out, int64_t ldo, float* scratch);
int64_t attention_block_scratch(int64_t nk, int64_t head_dim);

}  // namespace genrec
