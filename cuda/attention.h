// Fused attention forward on the GPU: K/V tiles in shared memory, online softmax, fp32 accumulation.
// Plain C++: no CUDA types in this API; the stream travels as an opaque pointer.
//
// One kernel, built for few query rows per K/V batch (beams and cached decoding, where it beats SDPA on
// an H100); it is correct on every shape, and the Python dispatch sends many-row shapes to SDPA.
// One entry point covers the three uses of the model:
//   encoder self-attention   kv_group = 1, len_q = len_k, key_lengths masks the padding keys;
//   beam cross-attention     kv_group = beams: query batch b reads K/V batch b / kv_group, and the
//                            beams of one user are folded into one block of query rows, so each
//                            K/V tile is read once for all of them (never copied per beam);
//   cached decoding          len_q = 1 over the KV cache (no causal mask needed).
#pragma once

#include <cstdint>
#include <string>

namespace genrec {

enum class AttnDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Strides are in elements, ordered (batch, head, seq, dim); the dim stride must be 1, so callers can
// pass (B, H, L, D) tensors or (B, L, H, D) tensors viewed as (B, H, L, D).
struct AttentionParams {
  const void* q = nullptr;               // (batch_kv * kv_group, heads, len_q, head_dim)
  const void* k = nullptr;               // (batch_kv, heads, len_k, head_dim)
  const void* v = nullptr;               // (batch_kv, heads, len_k, head_dim)
  void* out = nullptr;                   // (batch_kv * kv_group, heads, len_q, head_dim)
  const int32_t* key_lengths = nullptr;  // (batch_kv,) on the device; nullptr: all len_k keys
  AttnDType dtype = AttnDType::kFloat32;  // q, k, v and out share it
  int64_t batch_kv = 0;
  int64_t kv_group = 1;
  int64_t heads = 0;
  int64_t len_q = 0;
  int64_t len_k = 0;
  int64_t head_dim = 0;  // 32, 64 or 128
  int64_t q_stride[4] = {0, 0, 0, 1};
  int64_t k_stride[4] = {0, 0, 0, 1};
  int64_t v_stride[4] = {0, 0, 0, 1};
  int64_t out_stride[4] = {0, 0, 0, 1};
  float scale = 1.0f;  // softmax scale, usually 1 / sqrt(head_dim)
};

// Launches on `stream` (a cudaStream_t; nullptr is the default stream) without synchronising.
// Key lengths are clamped to [0, len_k]; a query with no key gets zeros.
// Returns "" on success, else a message: a bad argument, or the launch error (cudaGetLastError).
std::string attention_forward(const AttentionParams& params, void* stream);

}  // namespace genrec
