// The LM head fused with a constrained top-k on the GPU: logits z = x @ W.T + b are formed tile by tile
// in shared memory and never written to global memory. Plain C++: no CUDA types in this API.
//
// One launch covers (users x vocabulary): blocks own 64 users x one split of the vocabulary rows and
// write, per (user, split), the best k allowed items of their range and the log-sum-exp parts of all
// their vocabulary rows. The caller merges the splits (Python: kernels/head_topk.py):
//   items  best k of the (user, splits * k) candidates by (logit desc, item asc), item -1 = none;
//   lse    M + log(sum_s sum_part[s] * exp(max_part[s] - M)), M = max_s max_part[s] (NaN if any logit is).
#pragma once

#include <cstdint>
#include <string>

namespace genrec {

enum class HeadDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct HeadTopKParams {
  const void* x = nullptr;        // (users, dim) decoder states, C-contiguous
  const void* weight = nullptr;   // (vocab, dim) LM head, C-contiguous, dtype of x
  const float* bias = nullptr;    // (vocab,) float32; nullptr: none
  HeadDType dtype = HeadDType::kFloat32;
  int64_t users = 0;
  int64_t dim = 0;                // a multiple of 16
  int64_t vocab = 0;
  int64_t first_item = 0;         // item i is vocabulary row first_item + i
  int64_t num_items = 0;
  int64_t k = 0;                  // 1 .. kHeadTopKMaxK
  // Filters (item indices, device memory): a user's excluded items as CSR, each row sorted ascending,
  // and/or an allow mask (1 = allowed) of (num_items,) shared (allow_stride 0) or (users, num_items).
  const int64_t* exclude_ptr = nullptr;    // (users + 1,); nullptr: no exclusions
  const int64_t* exclude_items = nullptr;  // (exclude_ptr[users],)
  const uint8_t* allow = nullptr;          // nullptr: every item allowed
  int64_t allow_stride = 0;
  int64_t splits = 1;             // vocabulary splits (grid.y); see head_topk_splits
  // Outputs (device memory), per (user, split):
  float* out_values = nullptr;    // (users, splits, k) logits, best first; -inf padding
  int32_t* out_items = nullptr;   // (users, splits, k) item indices; -1 padding
  float* out_max = nullptr;       // (users, splits) max logit over the split's vocabulary rows
  float* out_sum = nullptr;       // (users, splits) sum of exp(z - max); NaN when a logit is NaN
};

constexpr int64_t kHeadTopKMaxK = 256;

// A split count that gives the device ~8 blocks per multiprocessor (at least one 64-row tile each).
int64_t head_topk_splits(int64_t users, int64_t vocab, int device);

// Launches on `stream` (a cudaStream_t; nullptr: the default stream) without synchronising.
// Returns "" on success, else a message: a bad argument, or the launch error (cudaGetLastError).
std::string head_topk_forward(const HeadTopKParams& params, void* stream);

}  // namespace genrec
