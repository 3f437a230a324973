#include "first_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "dense.h"
#include "dot.h"
#include "fast_exp.h"
#include "fast_log.h"
#include "packed_attention.h"
#include "parallel.h"

namespace genrec {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void need(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("first_step: " + what);
}

void check_linear(const LinearWeights& l, const char* name) {
  need(l.w != nullptr, std::string(name) + " weight is null");
}

void check_norm(const NormWeights& n, const char* name) {
  need(n.w != nullptr && n.b != nullptr, std::string(name) + " weight or bias is null");
}

// x (n, dim) += the embedding rows of one sequence's pieces, then the embedding LayerNorm.
void embed(const FirstStepModel& m, const int64_t* tokens, const int64_t* users, const int64_t* items, int64_t n,
           float* x) {
  const int64_t C = m.dim;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = m.positions_from_end ? n - 1 - j : j;
    const float* t = m.tokens + tokens[j] * C;
    const float* p = m.encoder_positions + pos * C;
    const float* it = m.items + items[j] * C;
    float* xj = x + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) xj[c] = t[c] * m.embed_scale + p[c] + it[c];
    if (users[j] > 0) {  // as GenRec._encode_packed: row 0 (no user) adds nothing
      const float* u = m.users + users[j] * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) xj[c] += u[c];
    }
  }
  add_layer_norm(x, nullptr, n, C, m.encoder_embed_norm.w, m.encoder_embed_norm.b, m.eps);
}

// The encoder over N packed rows x (N, dim) of sequences at offsets (nseq + 1,); scratch of 6 N dim + N ffn floats.
void encode(const FirstStepModel& m, float* x, int64_t N, const int64_t* offsets, int64_t nseq, float* scratch) {
  const int64_t C = m.dim, hd = C / m.heads;
  float* qkv = scratch;          // (N, 3C)
  float* att = qkv + 3 * N * C;  // (N, C)
  float* tmp = att + N * C;      // (N, C)
  float* hid = tmp + N * C;      // (N, ffn)
  for (const EncoderLayerWeights& l : m.encoder) {
    linear(x, N, C, C, l.q.w, l.q.b, C, qkv, 3 * C);
    linear(x, N, C, C, l.k.w, l.k.b, C, qkv + C, 3 * C);
    linear(x, N, C, C, l.v.w, l.v.b, C, qkv + 2 * C, 3 * C);
    packed_attention(qkv, N, offsets, nseq, m.heads, hd, 1.0f / std::sqrt(static_cast<float>(hd)), att, 1);
    linear(att, N, C, C, l.out.w, l.out.b, C, tmp, C);
    add_layer_norm(x, tmp, N, C, l.attn_norm.w, l.attn_norm.b, m.eps);
    feed_forward(m, l.fc1, l.fc2, l.final_norm, x, N, hid, tmp);
  }
}

// g (dim,) = scale * W[rows r0 .. r0 + n)^T q (n,): W (out, dim) row-major.
void transposed_rows(const float* w, int64_t r0, int64_t n, int64_t dim, const float* q, float scale, float* g) {
  std::fill(g, g + dim, 0.0f);
  for (int64_t d = 0; d < n; ++d) {
    const float* row = w + (r0 + d) * dim;
    const float qd = q[d] * scale;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) g[c] += qd * row[c];
  }
}

// One decoder layer's cross-attention for one user: query q (dim,) over its memory rows mem (n, dim) ->
// y (dim,), before out_proj (DecoderLayer.first_step: W_k and W_v act on q and on the weighted memory, never
// on every memory row). scratch: 2 dim + n floats.
void cross_attention(const FirstStepModel& m, const DecoderLayerWeights& l, const float* q, const float* mem,
                     int64_t n, float* y, float* scratch) {
  const int64_t C = m.dim, hd = C / m.heads;
  float* g = scratch;        // (C,)
  float* ctx = g + C;        // (C,)
  float* p = ctx + C;        // (n,)
  for (int64_t h = 0; h < m.heads; ++h) {
    transposed_rows(l.cross_k.w, h * hd, hd, C, q + h * hd, 1.0f / std::sqrt(static_cast<float>(hd)), g);
    float mx = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = dot(mem + j * C, g, C);
      mx = p[j] > mx ? p[j] : mx;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = exp_nonpositive(p[j] - mx);
      sum += p[j];
    }
    std::fill(ctx, ctx + C, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j] / sum;
      const float* mj = mem + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ctx[c] += pj * mj[c];
    }
    for (int64_t d = 0; d < hd; ++d) {
      const int64_t o = h * hd + d;
      y[o] = dot(l.cross_v.w + o * C, ctx, C) + (l.cross_v.b ? l.cross_v.b[o] : 0.0f);
    }
  }
}

// The first decoder step of U users from BOS: heads (U, dim); memory rows of user u at offsets[u] .. offsets[u + 1]
// of mem. scratch: U (2 dim + ffn) + 3 dim + max length floats.
void decode_first(const FirstStepModel& m, const float* mem, const int64_t* offsets, int64_t U, float* heads,
                  float* scratch) {
  const int64_t C = m.dim;
  float* t1 = scratch;        // (U, C)
  float* t2 = t1 + U * C;     // (U, C)
  float* hid = t2 + U * C;    // (U, ffn)
  float* one = hid + U * m.ffn;  // cross-attention scratch
  float* x0 = heads;  // BOS embedding, the same for every user
  const float* t = m.tokens + m.bos * C;
  for (int64_t c = 0; c < C; ++c) x0[c] = t[c] * m.embed_scale + m.decoder_positions[c];
  add_layer_norm(x0, nullptr, 1, C, m.decoder_embed_norm.w, m.decoder_embed_norm.b, m.eps);
  for (int64_t u = 1; u < U; ++u) std::copy(x0, x0 + C, heads + u * C);
  for (const DecoderLayerWeights& l : m.decoder) {
    linear(heads, U, C, C, l.self_v.w, l.self_v.b, C, t1, C);  // self-attention over the query alone
    linear(t1, U, C, C, l.self_out.w, l.self_out.b, C, t2, C);
    add_layer_norm(heads, t2, U, C, l.self_norm.w, l.self_norm.b, m.eps);
    linear(heads, U, C, C, l.cross_q.w, l.cross_q.b, C, t2, C);
    for (int64_t u = 0; u < U; ++u) {
      cross_attention(m, l, t2 + u * C, mem + offsets[u] * C, offsets[u + 1] - offsets[u], t1 + u * C, one);
    }
    linear(t1, U, C, C, l.cross_out.w, l.cross_out.b, C, t2, C);
    add_layer_norm(heads, t2, U, C, l.cross_norm.w, l.cross_norm.b, m.eps);
    feed_forward(m, l.fc1, l.fc2, l.final_norm, heads, U, hid, t2);
  }
}

// One user's history bias at its S padded positions (HistoryBias.offsets): items (S,) item index or -1,
// offsets (S,) 0 off the history. scratch: 2 dim floats.
void history_pairs(const FirstStepModel& m, const float* h, const float* mem, const int64_t* item_ids, int64_t n,
                   int64_t S, int64_t* items, float* offsets, float* scratch) {
  const int64_t C = m.dim;
  float* q = scratch;  // (C,) W_q h + b_q
  float* g = q + C;    // (C,) W_k^T q: q . (W_k m + b_k) = m . g + q . b_k
  linear(h, 1, C, C, m.history_query.w, m.history_query.b, C, q, C);
  transposed_rows(m.history_key.w, 0, C, C, q, 1.0f, g);
  const float qb = m.history_key.b ? dot(q, m.history_key.b, C) : 0.0f;
  const float inv = 1.0f / std::sqrt(static_cast<float>(C));
  int64_t after = 0;  // history items after position j
  for (int64_t j = S - 1; j >= 0; --j) {
    items[j] = -1;
    offsets[j] = 0.0f;
    if (j >= n || item_ids[j] <= 0) continue;
    items[j] = item_ids[j] - 1;
    offsets[j] = (dot(mem + j * C, g, C) + qb) * inv + m.recency[std::min(after, m.recency_len - 1)];
    ++after;
  }
}

// One user's transition pairs (TransitionBias.pairs): context x width items (-1 = none) and offsets.
void transition_pairs(const FirstStepModel& m, const int64_t* item_ids, int64_t n, int64_t* items, float* offsets) {
  int64_t j = n;
  for (int64_t r = 0; r < m.context; ++r) {  // the most recent items first
    do --j;
    while (j >= 0 && item_ids[j] <= 0);
    const int64_t row = j >= 0 ? item_ids[j] - 1 : m.n_items;  // a shorter history: the last row, no item
    for (int64_t w = 0; w < m.width; ++w) {
      const int32_t it = m.table_items[row * m.width + w];
      const float a = w < m.neighbors ? m.weight[r] : m.reverse_weight[r];
      items[r * m.width + w] = it;
      const float count = m.table_counts[row * m.width + w];  // sums of 1 / d: >= 0 but for an edited table
      const float feature = count >= 0.0f ? log_positive(1.0f + count) : std::log1p(count);
      offsets[r * m.width + w] = it < 0 ? 0.0f : a * feature;
    }
  }
}

}  // namespace

void feed_forward(const FirstStepModel& m, const LinearWeights& fc1, const LinearWeights& fc2,
                  const NormWeights& norm, float* x, int64_t n, float* hid, float* tmp) {
  linear(x, n, m.dim, m.dim, fc1.w, fc1.b, m.ffn, hid, m.ffn);
  gelu(hid, n * m.ffn);
  linear(hid, n, m.ffn, m.ffn, fc2.w, fc2.b, m.dim, tmp, m.dim);
  add_layer_norm(x, tmp, n, m.dim, norm.w, norm.b, m.eps);
}

void FirstStepModel::check() const {
  need(dim > 0 && heads > 0 && dim % heads == 0, "dim must be a positive multiple of heads");
  need(ffn > 0 && max_positions > 0 && vocab > 0 && n_users >= 0 && n_items >= 0, "bad sizes");
  need(bos >= 0 && bos < vocab, "bos outside the vocabulary");
  need(tokens && items && users && encoder_positions && decoder_positions, "an embedding table is null");
  check_norm(encoder_embed_norm, "encoder embedding norm");
  check_norm(decoder_embed_norm, "decoder embedding norm");
  need(!encoder.empty() && !decoder.empty(), "needs at least one encoder and one decoder layer");
  for (const auto& l : encoder) {
    for (const auto* w : {&l.q, &l.k, &l.v, &l.out, &l.fc1, &l.fc2}) check_linear(*w, "encoder linear");
    check_norm(l.attn_norm, "encoder norm");
    check_norm(l.final_norm, "encoder norm");
  }
  for (const auto& l : decoder) {
    for (const auto* w : {&l.self_q, &l.self_k, &l.self_v, &l.self_out, &l.cross_q, &l.cross_k, &l.cross_v,
                          &l.cross_out, &l.fc1, &l.fc2}) {
      check_linear(*w, "decoder linear");
    }
    for (const auto* n : {&l.self_norm, &l.cross_norm, &l.final_norm}) check_norm(*n, "decoder norm");
  }
  if (history_query.w) {
    need(history_key.w && recency && recency_len > 0, "history bias: key or recency missing");
  }
  if (table_items) {
    need(table_counts && weight && context > 0 && neighbors > 0, "transition bias: a table or weight is missing");
    need(width == neighbors || (width == 2 * neighbors && reverse_weight), "transition bias: width must be "
         "neighbors, or twice that with reverse weights");
  }
}

int64_t FirstStepModel::pairs(int64_t S) const {
  return (history_query.w ? S : 0) + (table_items ? context * width : 0);
}

void first_step(const FirstStepModel& m, const int64_t* tokens, const int64_t* user_ids, const int64_t* item_ids,
                const uint8_t* mask, int64_t B, int64_t S, float* memory, float* heads, int64_t* pair_items,
                float* pair_offsets, int threads) {
  m.check();
  need(B >= 0 && S > 0, "expected B >= 0 rows of S > 0 positions");
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* row = mask + b * S;
    int64_t n = 0;
    while (n < S && row[n]) ++n;
    for (int64_t j = n; j < S; ++j) need(!row[j], "mask row " + std::to_string(b) + " is not right-padded");
    need(n > 0, "mask row " + std::to_string(b) + " has no piece");
    if (n > m.max_positions) {
      throw std::invalid_argument("input of " + std::to_string(n) + " positions exceeds max_positions=" +
                                  std::to_string(m.max_positions));
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = b * S + j;
      need(tokens[i] >= 0 && tokens[i] < m.vocab, "token id outside [0, " + std::to_string(m.vocab) + ")");
      need(item_ids[i] >= 0 && item_ids[i] <= m.n_items, "item id outside [0, " + std::to_string(m.n_items) + "]");
      need(user_ids[i] >= 0 && user_ids[i] <= m.n_users, "user id outside [0, " + std::to_string(m.n_users) + "]");
    }
    lengths[b] = n;
  }
  const int64_t C = m.dim, P = m.pairs(S);
  parallel_for(B, threads, 4, [&](int64_t begin, int64_t end) {
    const int64_t U = end - begin;
    std::vector<int64_t> offsets(U + 1, 0);
    int64_t longest = 0;
    for (int64_t u = 0; u < U; ++u) {
      offsets[u + 1] = offsets[u] + lengths[begin + u];
      longest = std::max(longest, lengths[begin + u]);
    }
    const int64_t N = offsets[U];
    std::vector<float> x(N * C);
    std::vector<float> scratch(std::max(N * (5 * C + m.ffn), U * (2 * C + m.ffn) + 3 * C + longest));
    for (int64_t u = 0; u < U; ++u) {
      const int64_t at = (begin + u) * S;
      embed(m, tokens + at, user_ids + at, item_ids + at, lengths[begin + u], x.data() + offsets[u] * C);
    }
    encode(m, x.data(), N, offsets.data(), U, scratch.data());
    for (int64_t u = 0; memory && u < U; ++u) {  // padded (B, S, C): the user's rows, then zeros
      float* out = memory + (begin + u) * S * C;
      const int64_t n = offsets[u + 1] - offsets[u];
      std::copy(x.data() + offsets[u] * C, x.data() + offsets[u + 1] * C, out);
      std::fill(out + n * C, out + S * C, 0.0f);
    }
    if (!heads) return;
    decode_first(m, x.data(), offsets.data(), U, heads + begin * C, scratch.data());
    for (int64_t u = 0; u < U; ++u) {
      const int64_t b = begin + u, n = lengths[b];
      const float* mem = x.data() + offsets[u] * C;
      int64_t* items = pair_items + b * P;
      float* offs = pair_offsets + b * P;
      if (m.history_query.w) {
        history_pairs(m, heads + b * C, mem, item_ids + b * S, n, S, items, offs, scratch.data());
        items += S;
        offs += S;
      }
      if (m.table_items) transition_pairs(m, item_ids + b * S, n, items, offs);
    }
  });
}

}  // namespace genrec
