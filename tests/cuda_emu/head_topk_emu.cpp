// cuda/head_topk.cu compiled for the CPU emulation (include/), behind a C ABI for ctypes (test_head_topk.py).
#include <cstdio>

#include "../../cuda/head_topk.cu"

extern "C" {

long long emu_head_topk_splits(long long users, long long vocab) { return genrec::head_topk_splits(users, vocab, 0); }

// Returns 0 and fills the outputs, or 1 and copies the error message into err (err_len bytes).
int emu_head_topk(const void* x, const void* weight, int dtype_code, const float* bias, long long users, long long dim,
                  long long vocab, long long first_item, long long num_items, long long k,
                  const int64_t* exclude_ptr, const int64_t* exclude_items, const uint8_t* allow,
                  long long allow_stride, long long splits, float* out_values, int32_t* out_items, float* out_max,
                  float* out_sum, char* err, long long err_len) {
  genrec::HeadTopKParams p;
  p.x = x;
  p.weight = weight;
  p.bias = bias;
  p.dtype = static_cast<genrec::HeadDType>(dtype_code);
  p.users = users;
  p.dim = dim;
  p.vocab = vocab;
  p.first_item = first_item;
  p.num_items = num_items;
  p.k = k;
  p.exclude_ptr = exclude_ptr;
  p.exclude_items = exclude_items;
  p.allow = allow;
  p.allow_stride = allow_stride;
  p.splits = splits;
  p.out_values = out_values;
  p.out_items = out_items;
  p.out_max = out_max;
  p.out_sum = out_sum;
  const std::string msg = genrec::head_topk_forward(p, nullptr);
  if (msg.empty()) return 0;
  std::snprintf(err, static_cast<size_t>(err_len), "%s", msg.c_str());
  return 1;
}
}
