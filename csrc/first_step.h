// The one-token model's encoder and first decoder step on the CPU, in one call (GenRec.encode, then
// GenRec.first_heads and GenRec.bias_pairs): what `item_decode` needs before its top-k, without the ~900
// PyTorch ops (and their dispatch) a small batch spends on it. python/genrec_fast/first_step.py holds the
// weights' order and the PyTorch reference it is tested against.
#pragma once

#include <cstdint>
#include <vector>

namespace genrec {

struct LinearWeights {
  const float* w = nullptr;  // (out, in) row-major, as nn.Linear
  const float* b = nullptr;  // (out,) or nullptr
};

struct NormWeights {
  const float* w = nullptr;  // (dim,)
  const float* b = nullptr;  // (dim,)
};

struct EncoderLayerWeights {
  LinearWeights q, k, v, out;
  NormWeights attn_norm;
  LinearWeights fc1, fc2;
  NormWeights final_norm;
};

struct DecoderLayerWeights {
  LinearWeights self_q, self_k;    // self-attention: the first step needs only out(v(x)) (one query)
  LinearWeights self_v, self_out;
  NormWeights self_norm;
  LinearWeights cross_q, cross_k, cross_v, cross_out;
  NormWeights cross_norm;
  LinearWeights fc1, fc2;
  NormWeights final_norm;
};

struct FirstStepModel {
  int64_t dim = 0, heads = 0, ffn = 0, max_positions = 0;
  float embed_scale = 1.0f, eps = 1e-5f;
  bool positions_from_end = false;  // model.encoder_positions == "end"
  int64_t vocab = 0, n_users = 0, n_items = 0, bos = 0;
  const float* tokens = nullptr;  // (vocab, dim) shared token embeddings
  const float* users = nullptr;   // (n_users + 1, dim), row 0 = none
  const float* items = nullptr;   // (n_items + 1, dim), row 0 = none
  const float* encoder_positions = nullptr;  // (max_positions, dim)
  NormWeights encoder_embed_norm;
  std::vector<EncoderLayerWeights> encoder;
  const float* decoder_positions = nullptr;  // (max_positions, dim)
  NormWeights decoder_embed_norm;
  std::vector<DecoderLayerWeights> decoder;
  // history bias (query.w == nullptr: none): s_j = (W_q h + b_q) . (W_k m_j + b_k) / sqrt(dim) + recency[r_j]
  LinearWeights history_query, history_key;
  const float* recency = nullptr;  // (recency_len,)
  int64_t recency_len = 0;
  // transition bias (table_items == nullptr: none): rows n_items + 1 (the last: no item) x width
  const int32_t* table_items = nullptr;
  const float* table_counts = nullptr;
  int64_t width = 0, neighbors = 0, context = 0;
  const float* weight = nullptr;          // (context,) successor columns
  const float* reverse_weight = nullptr;  // (context,) predecessor columns (width = 2 neighbors), or nullptr

  // Throws std::invalid_argument when a size or pointer is inconsistent.
  void check() const;
  // Offsets per user: S history positions (if any) + context x width transition pairs (if any).
  int64_t pairs(int64_t S) const;
};

// x (n, dim) = LayerNorm(x + fc2(gelu(fc1 x))), a layer's post-norm feed-forward block; hid (n, ffn) and
// tmp (n, dim) scratch.
void feed_forward(const FirstStepModel& m, const LinearWeights& fc1, const LinearWeights& fc2,
                  const NormWeights& norm, float* x, int64_t n, float* hid, float* tmp);

// Inputs (B, S) row-major, right-padded: tokens, user_ids, item_ids int64 (ids 0 = none), mask uint8 (1 = piece;
// every row a prefix of ones, at least one). Outputs: memory (B, S, dim) the encoder states, zeros at the padding
// (`GenRec.encode`), or nullptr; heads (B, dim) the first decoder states, or nullptr to stop after the encoder;
// pair_items, pair_offsets (B, pairs(S)) the biases' item indices (-1 = none) and logit offsets, history positions
// first (`GenRec.bias_pairs`), unwritten when pairs(S) == 0 or heads is nullptr. Users run on up to `threads`
// threads (<= 0: all cores). Throws std::invalid_argument on bad ids, masks or positions past max_positions.
void first_step(const FirstStepModel& m, const int64_t* tokens, const int64_t* user_ids, const int64_t* item_ids,
                const uint8_t* mask, int64_t B, int64_t S, float* memory, float* heads, int64_t* pair_items,
                float* pair_offsets, int threads);

}  // namespace genrec
