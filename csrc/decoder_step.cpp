#include "decoder_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "dense.h"
#include "dot.h"
#include "fast_exp.h"
#include "packed_attention.h"
#include "parallel.h"

namespace genrec {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void need(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("decoder_step: " + what);
}

// out (hd,) = sum_j softmax_j(scale q . k_j) v_j over n keys k_j, v_j (rows of hd floats, stride hd); p: n scratch.
void attend(const float* q, const float* k, const float* v, int64_t n, int64_t hd, float scale, float* out, float* p) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = dot(q, k + j * hd, hd) * scale;
    mx = p[j] > mx ? p[j] : mx;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - mx);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  std::fill(out, out + hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j] * inv;
    const float* vj = v + j * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) out[d] += pj * vj[d];
  }
}

// Rows [r0, r1) through the decoder (x (n, C) their embedded tokens, overwritten with the last layer's states).
void rows_step(const FirstStepModel& m, const DecoderCacheView& c, int64_t r0, int64_t r1, float* x) {
  const int64_t C = m.dim, H = m.heads, hd = C / H, n = r1 - r0, t = c.step;
  const int64_t width = c.rows / c.users;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> q(n * C), k(n * C), v(n * C), y(n * C), tmp(n * C), hid(n * m.ffn);
  std::vector<float> p(t + 1), scratch(attention_block_scratch(c.memory_len, hd));
  for (size_t l = 0; l < m.decoder.size(); ++l) {
    const DecoderLayerWeights& w = m.decoder[l];
    linear(x, n, C, C, w.self_q.w, w.self_q.b, C, q.data(), C);
    linear(x, n, C, C, w.self_k.w, w.self_k.b, C, k.data(), C);
    linear(x, n, C, C, w.self_v.w, w.self_v.b, C, v.data(), C);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = ((r0 + i) * H + h) * c.capacity;  // this row and head's slots
        float* ks = c.self_k[l] + at * hd;
        float* vs = c.self_v[l] + at * hd;
        std::copy(k.data() + i * C + h * hd, k.data() + i * C + (h + 1) * hd, ks + t * hd);
        std::copy(v.data() + i * C + h * hd, v.data() + i * C + (h + 1) * hd, vs + t * hd);
        attend(q.data() + i * C + h * hd, ks, vs, t + 1, hd, scale, y.data() + i * C + h * hd, p.data());
      }
    }
    linear(y.data(), n, C, C, w.self_out.w, w.self_out.b, C, tmp.data(), C);
    add_layer_norm(x, tmp.data(), n, C, w.self_norm.w, w.self_norm.b, m.eps);
    linear(x, n, C, C, w.cross_q.w, w.cross_q.b, C, q.data(), C);
    for (int64_t i0 = 0; i0 < n;) {  // each user's rows in this range together: its keys transposed once a head
      const int64_t u = (r0 + i0) / width, i1 = std::min(n, (u + 1) * width - r0);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = (u * H + h) * c.memory_len * hd;
        attention_block(q.data() + i0 * C + h * hd, C, i1 - i0, c.cross_k[l] + at, hd, c.cross_v[l] + at, hd,
                        c.lengths[u], hd, scale, y.data() + i0 * C + h * hd, C, scratch.data());
      }
      i0 = i1;
    }
    linear(y.data(), n, C, C, w.cross_out.w, w.cross_out.b, C, tmp.data(), C);
    add_layer_norm(x, tmp.data(), n, C, w.cross_norm.w, w.cross_norm.b, m.eps);
    feed_forward(m, w.fc1, w.fc2, w.final_norm, x, n, hid.data(), tmp.data());
  }
}

}  // namespace

void decoder_step(const FirstStepModel& m, const int64_t* tokens, const DecoderCacheView& c, float* hidden,
                  int threads) {
  m.check();
  const size_t layers = m.decoder.size();
  need(c.users > 0 && c.rows >= c.users && c.rows % c.users == 0, "rows must be a positive multiple of users");
  need(c.step >= 0 && c.step < c.capacity, "step must be below the cache capacity");
  need(c.step < m.max_positions, "input of " + std::to_string(c.step + 1) + " positions exceeds max_positions=" +
                                     std::to_string(m.max_positions));
  need(c.self_k.size() == layers && c.self_v.size() == layers && c.cross_k.size() == layers &&
           c.cross_v.size() == layers, "one cache buffer per decoder layer");
  for (size_t l = 0; l < layers; ++l) {
    need(c.self_k[l] && c.self_v[l] && c.cross_k[l] && c.cross_v[l], "a cache buffer is null");
  }
  for (int64_t u = 0; u < c.users; ++u) {
    need(c.lengths[u] > 0 && c.lengths[u] <= c.memory_len, "lengths must be in [1, S]");
  }
  for (int64_t r = 0; r < c.rows; ++r) {
    need(tokens[r] >= 0 && tokens[r] < m.vocab, "token id outside [0, " + std::to_string(m.vocab) + ")");
  }
  const int64_t C = m.dim;
  parallel_for(c.rows, threads, 16, [&](int64_t r0, int64_t r1) {
    float* x = hidden + r0 * C;
    const float* pos = m.decoder_positions + c.step * C;
    for (int64_t r = r0; r < r1; ++r) {
      const float* e = m.tokens + tokens[r] * C;
      float* xr = hidden + r * C;
#pragma omp simd
      for (int64_t d = 0; d < C; ++d) xr[d] = e[d] * m.embed_scale + pos[d];
    }
    add_layer_norm(x, nullptr, r1 - r0, C, m.decoder_embed_norm.w, m.decoder_embed_norm.b, m.eps);
    rows_step(m, c, r0, r1, x);
  });
}

}  // namespace genrec
