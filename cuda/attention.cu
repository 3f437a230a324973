// Flash-style fused attention forward (see attention.h): one pass over K/V tiles held in shared
// memory, online softmax in the exp2 domain, fp32 accumulation, output cast once at the end.
//
// The kernel works on "folded" query rows: for K/V batch b, row r in [0, kv_group * len_q) is
// query position r % len_q of query batch b * kv_group + r / len_q. A block of rows therefore holds
// the beams of one user, and every K/V tile loaded into shared memory serves all of them. A warp
// owns up to 8 rows, a lane owns one key of the tile for the scores and D/32 dims of the output.
// It is built for few rows per K/V batch (Lq = 1 beams, cached decoding), where it beat SDPA on an
// H100; many-row shapes (the encoder) are correct but slower than SDPA, and the Python dispatch
// sends them to PyTorch. (A 64-row tiled kernel for them lost to SDPA at every length measured,
// 0.1-0.6x, and was removed: no kernel stays that the dispatch never selects.)
#include "attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace genrec {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultSmem = 48 * 1024;  // above this a kernel must opt in to more shared memory

// Kernel arguments after host validation: lengths fit in int, offsets stay int64.
struct Args {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* key_lengths;
  int heads;
  int len_q;
  int len_k;
  int kv_group;
  int rows;  // kv_group * len_q folded query rows per K/V batch
  int64_t qs[4];
  int64_t ks[4];
  int64_t vs[4];
  int64_t os[4];
  float scale_log2;  // softmax scale * log2(e): scores live in the exp2 domain
  bool vec_q;        // q rows can be read with aligned 16-byte loads
  bool vec_kv;       // k and v rows can be read with aligned 16-byte loads
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements in one 16-byte load.
template <typename T>
__host__ __device__ constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

// Reads vec_width<T>() consecutive elements as fp32 into dst (shared memory), times `mul`.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, bool vec, float mul, float* dst) {
  constexpr int kN = vec_width<T>();
  if (vec) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = to_float(e[i]) * mul;
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = to_float(src[i]) * mul;
  }
}

// Copies keys [n0, n0 + tile_rows) of one (batch, head) slice into dst (row stride ld, fp32);
// keys at or beyond n_valid are zero so that masked keys add nothing to P @ V.
template <typename T, int D, int NT>
__device__ __forceinline__ void load_kv_tile(float* dst, int ld, const T* base, int64_t seq_stride,
                                             int n0, int n_valid, int tile_rows, bool vec) {
  constexpr int kN = vec_width<T>();
  constexpr int kChunks = D / kN;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < tile_rows * kChunks; i += NT) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * kN;
    float* d = dst + r * ld + c;
    if (n0 + r < n_valid) {
      load_chunk(base + static_cast<int64_t>(n0 + r) * seq_stride + c, vec, 1.0f, d);
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j) d[j] = 0.0f;
    }
  }
}

// Element offset of folded query row r of K/V batch b in a tensor shaped like q (strides s).
__device__ __forceinline__ int64_t row_offset(const int64_t (&s)[4], int b, int h, int r,
                                              int len_q, int kv_group) {
  const int g = r / len_q;
  const int pos = r - g * len_q;
  return (static_cast<int64_t>(b) * kv_group + g) * s[0] + static_cast<int64_t>(h) * s[1] +
         static_cast<int64_t>(pos) * s[2];
}

// Copies folded query rows [row0, row0 + n_rows) scaled by scale_log2 into dst (row stride ld);
// rows past a.rows are zero.
template <typename T, int D, int NT>
__device__ __forceinline__ void load_q_tile(float* dst, int ld, const Args& a, int b, int h,
                                            int row0, int n_rows) {
  constexpr int kN = vec_width<T>();
  constexpr int kChunks = D / kN;
  const T* q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < n_rows * kChunks; i += NT) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * kN;
    float* d = dst + r * ld + c;
    const int row = row0 + r;
    if (row < a.rows) {
      load_chunk(q + row_offset(a.qs, b, h, row, a.len_q, a.kv_group) + c, a.vec_q, a.scale_log2, d);
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j) d[j] = 0.0f;
    }
  }
}

// Number of keys batch b attends to.
__device__ __forceinline__ int key_count(const Args& a, int b) {
  if (a.key_lengths == nullptr) return a.len_k;
  return min(max(a.key_lengths[b], 0), a.len_k);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// The running max to subtract: a row that has seen only masked keys keeps m = -inf, and
// exp2(-inf - 0) = 0 then gives it p = 0 and alpha = 0 instead of NaN.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// ---------------------------------------------------------------------------------------------
// Decode kernel: grid (batch_kv * heads, ceil(rows / 32)), 4 warps, 8 folded rows per warp.
// ---------------------------------------------------------------------------------------------
constexpr int kDecWarps = 4;
constexpr int kDecThreads = kDecWarps * 32;
constexpr int kDecRowsPerWarp = 8;
constexpr int kDecRows = kDecWarps * kDecRowsPerWarp;  // folded rows per CTA
constexpr int kDecKeys = 32;                           // keys per tile: one per lane

template <int D>
__host__ __device__ constexpr int dec_ldk() { return D + 4; }  // float4 rows: a quarter warp hits 8 distinct bank groups

template <int D>
constexpr size_t dec_smem_bytes() {
  return sizeof(float) * (kDecRows * D + kDecKeys * dec_ldk<D>() + kDecKeys * D);
}

template <typename T, int D>
__global__ void __launch_bounds__(kDecThreads) attn_decode_kernel(const Args a) {
  constexpr int kLdk = dec_ldk<D>();
  constexpr int kDk = D / 32;  // output dims per lane
#ifdef GENREC_CUDA_EMU  // tests/cuda_emu: the block's dynamic shared memory
  float4* smem_raw = genrec_emu::dynamic_smem<float4>();
#else
  extern __shared__ float4 smem_raw[];
#endif
  float* q_s = reinterpret_cast<float*>(smem_raw);  // (kDecRows, D), scaled queries
  float* k_s = q_s + kDecRows * D;                  // (kDecKeys, kLdk)
  float* v_s = k_s + kDecKeys * kLdk;               // (kDecKeys, D)

  const int b = blockIdx.x / a.heads;
  const int h = blockIdx.x - b * a.heads;
  const int row0 = blockIdx.y * kDecRows;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n_end = key_count(a, b);
  const T* kb = static_cast<const T*>(a.k) + b * a.ks[0] + h * a.ks[1];
  const T* vb = static_cast<const T*>(a.v) + b * a.vs[0] + h * a.vs[1];

  // This warp's rows are row0 + warp + kDecWarps * i for i < n_mine (round robin over warps).
  const int avail = a.rows - row0 - warp;
  const int n_mine = avail <= 0 ? 0 : min(kDecRowsPerWarp, (avail + kDecWarps - 1) / kDecWarps);

  load_q_tile<T, D, kDecThreads>(q_s, D, a, b, h, row0, kDecRows);

  float m[kDecRowsPerWarp];
  float l[kDecRowsPerWarp];
  float acc[kDecRowsPerWarp][kDk];
#pragma unroll
  for (int i = 0; i < kDecRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int k = 0; k < kDk; ++k) acc[i][k] = 0.0f;
  }

  for (int n0 = 0; n0 < n_end; n0 += kDecKeys) {
    load_kv_tile<T, D, kDecThreads>(k_s, kLdk, kb, a.ks[2], n0, n_end, kDecKeys, a.vec_kv);
    load_kv_tile<T, D, kDecThreads>(v_s, D, vb, a.vs[2], n0, n_end, kDecKeys, a.vec_kv);
    __syncthreads();
    if (n_mine > 0) {  // warp-uniform
      // Scores: lane j holds key n0 + j for each of this warp's rows; one K read serves all rows.
      float s[kDecRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kDecRowsPerWarp; ++i) s[i] = 0.0f;
      const float* krow = k_s + lane * kLdk;
#pragma unroll 4
      for (int d = 0; d < D; d += 4) {
        const float4 kv = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
        for (int i = 0; i < kDecRowsPerWarp; ++i) {
          if (i < n_mine) {
            const float4 qv =
                *reinterpret_cast<const float4*>(q_s + (warp + kDecWarps * i) * D + d);
            s[i] = fmaf(qv.x, kv.x, s[i]);
            s[i] = fmaf(qv.y, kv.y, s[i]);
            s[i] = fmaf(qv.z, kv.z, s[i]);
            s[i] = fmaf(qv.w, kv.w, s[i]);
          }
        }
      }
      // Online softmax per row.
      const bool valid = n0 + lane < n_end;
      float p[kDecRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kDecRowsPerWarp; ++i) {
        p[i] = 0.0f;
        if (i < n_mine) {
          const float si = valid ? s[i] : -INFINITY;
          const float m_new = fmaxf(m[i], warp_max(si));
          const float m_use = safe_max(m_new);
          p[i] = exp2f(si - m_use);
          const float alpha = exp2f(m[i] - m_use);
          l[i] = l[i] * alpha + warp_sum(p[i]);
          m[i] = m_new;
#pragma unroll
          for (int k = 0; k < kDk; ++k) acc[i][k] *= alpha;
        }
      }
      // acc += P @ V: lane owns dims lane + 32 k; p of key j is broadcast from lane j.
      const int n_keys = min(kDecKeys, n_end - n0);
#pragma unroll 4
      for (int j = 0; j < n_keys; ++j) {
        float vv[kDk];
#pragma unroll
        for (int k = 0; k < kDk; ++k) vv[k] = v_s[j * D + lane + 32 * k];
#pragma unroll
        for (int i = 0; i < kDecRowsPerWarp; ++i) {
          if (i < n_mine) {
            const float pj = __shfl_sync(kFullMask, p[i], j);
#pragma unroll
            for (int k = 0; k < kDk; ++k) acc[i][k] = fmaf(pj, vv[k], acc[i][k]);
          }
        }
      }
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < kDecRowsPerWarp; ++i) {
    if (i < n_mine) {
      const int row = row0 + warp + kDecWarps * i;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      T* o = out + row_offset(a.os, b, h, row, a.len_q, a.kv_group);
#pragma unroll
      for (int k = 0; k < kDk; ++k) o[lane + 32 * k] = from_float<T>(acc[i][k] * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
std::string cuda_error(const char* what, cudaError_t err) {
  return std::string("genrec attention: ") + what + ": " + cudaGetErrorString(err);
}

template <typename Kernel>
std::string launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                   const Args& a) {
  if (smem > kDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return cuda_error("cudaFuncSetAttribute", err);
  }
#ifdef GENREC_CUDA_EMU  // tests/cuda_emu: the same kernel on CPU threads
  (void)stream;
  genrec_emu::launch(grid, dim3(threads), [&] { kernel(a); }, smem);
#else
  kernel<<<grid, threads, smem, stream>>>(a);
#endif
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_error("kernel launch", err);
}

template <typename T, int D>
std::string dispatch_kernel(const Args& a, int64_t blocks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((a.rows + kDecRows - 1) / kDecRows));
  return launch(attn_decode_kernel<T, D>, grid, kDecThreads, dec_smem_bytes<D>(), stream, a);
}

template <typename T>
std::string dispatch_dim(const Args& a, int64_t head_dim, int64_t blocks, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return dispatch_kernel<T, 32>(a, blocks, stream);
    case 64: return dispatch_kernel<T, 64>(a, blocks, stream);
    case 128: return dispatch_kernel<T, 128>(a, blocks, stream);
    default: return "genrec attention: head_dim must be 32, 64 or 128, got " + std::to_string(head_dim);
  }
}

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

// 16-byte loads need an aligned base and (batch, head, seq) strides in whole 16-byte chunks.
bool vec_ok(const void* p, const int64_t (&s)[4], int64_t width) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s[0] % width == 0 && s[1] % width == 0 &&
         s[2] % width == 0;
}

std::string check(const AttentionParams& p) {
  if (p.batch_kv < 0 || p.kv_group < 1 || p.heads < 0 || p.len_q < 0 || p.len_k < 0) {
    return "genrec attention: sizes must be non-negative and kv_group >= 1";
  }
  if (!fits_int(p.len_q * p.kv_group) || !fits_int(p.len_k) || !fits_int(p.heads) ||
      !fits_int(p.batch_kv * p.heads)) {
    return "genrec attention: sizes too large for 32-bit indexing";
  }
  if ((p.len_q * p.kv_group + kDecRows - 1) / kDecRows > 65535) {
    return "genrec attention: kv_group * len_q too large for the grid";
  }
  if (p.q_stride[3] != 1 || p.k_stride[3] != 1 || p.v_stride[3] != 1 || p.out_stride[3] != 1) {
    return "genrec attention: the head dim (last) stride of q, k, v and out must be 1";
  }
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr) {
    return "genrec attention: null q, k, v or out pointer";
  }
  return std::string();
}

}  // namespace

std::string attention_forward(const AttentionParams& p, void* stream) {
  if (p.batch_kv == 0 || p.heads == 0 || p.len_q == 0) return std::string();  // empty output
  std::string err = check(p);
  if (!err.empty()) return err;

  const int64_t elem = p.dtype == AttnDType::kFloat32 ? 4 : 2;
  const int64_t width = 16 / elem;
  Args a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.key_lengths = p.key_lengths;
  a.heads = static_cast<int>(p.heads);
  a.len_q = static_cast<int>(p.len_q);
  a.len_k = static_cast<int>(p.len_k);
  a.kv_group = static_cast<int>(p.kv_group);
  a.rows = static_cast<int>(p.len_q * p.kv_group);
  for (int i = 0; i < 4; ++i) {
    a.qs[i] = p.q_stride[i];
    a.ks[i] = p.k_stride[i];
    a.vs[i] = p.v_stride[i];
    a.os[i] = p.out_stride[i];
  }
  a.scale_log2 = p.scale * kLog2e;
  a.vec_q = vec_ok(p.q, p.q_stride, width);
  a.vec_kv = vec_ok(p.k, p.k_stride, width) && vec_ok(p.v, p.v_stride, width);

  const int64_t blocks = p.batch_kv * p.heads;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case AttnDType::kFloat32: return dispatch_dim<float>(a, p.head_dim, blocks, s);
    case AttnDType::kFloat16: return dispatch_dim<__half>(a, p.head_dim, blocks, s);
    case AttnDType::kBFloat16: return dispatch_dim<__nv_bfloat16>(a, p.head_dim, blocks, s);
  }
  return "genrec attention: unknown dtype code " + std::to_string(static_cast<int>(p.dtype));
}

}  // namespace genrec
