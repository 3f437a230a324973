// cuda/attention.cu compiled for the CPU emulation (include/), behind a C ABI for ctypes (test_kernels.py).
#include <cstdio>

#include "../../cuda/attention.cu"

extern "C" {

// strides: q, k, v, out, 4 each (batch, head, seq, dim). Returns 0, or 1 with the message in err.
int emu_attention(const void* q, const void* k, const void* v, void* out, const int32_t* key_lengths, int dtype_code,
                  long long batch_kv, long long heads, long long len_q, long long len_k, long long head_dim,
                  const long long* strides, long long kv_group, float scale, char* err, long long err_len) {
  genrec::AttentionParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.key_lengths = key_lengths;
  p.dtype = static_cast<genrec::AttnDType>(dtype_code);
  p.batch_kv = batch_kv;
  p.kv_group = kv_group;
  p.heads = heads;
  p.len_q = len_q;
  p.len_k = len_k;
  p.head_dim = head_dim;
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = strides[i];
    p.k_stride[i] = strides[4 + i];
    p.v_stride[i] = strides[8 + i];
    p.out_stride[i] = strides[12 + i];
  }
  p.scale = scale;
  const std::string msg = genrec::attention_forward(p, nullptr);
  if (msg.empty()) return 0;
  std::snprintf(err, static_cast<size_t>(err_len), "%s", msg.c_str());
  return 1;
}
}
