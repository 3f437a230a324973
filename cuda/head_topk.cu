// LM head + constrained top-k (see head_topk.h). A block of 64 threads owns 64 users and one split of
// the vocabulary; per tile of 64 vocabulary rows it
//   1. forms the (64 users x 64 rows) logits in shared memory, `dim` in chunks of 64 (a single chunk of
//      the users' states is loaded once per block and stays): tensor-core wmma
//      (16x16x16, fp32 accumulation) for fp16/bf16, CUDA-core float4 FMAs for fp32;
//   2. then each thread walks its own user's row of the tile once: the online log-sum-exp (every
//      vocabulary row), its sorted exclusion list (as a 64-bit mask of the tile's columns), the allow
//      mask, and a running top-k kept sorted in its slot of the output (an insert only when a logit beats
//      the k-th best).
// Threads read their rows with a per-thread rotation, (q + thread) mod 64, so the 32 lanes of a warp hit
// 32 different banks; the order of a row does not matter, since ties are broken by item index.
#include "head_topk.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace genrec {
namespace {

constexpr int kRows = 64;            // users per block = threads per block
constexpr int kTile = 64;            // vocabulary rows per tile
constexpr int kChunk = 64;           // dims per shared-memory chunk
constexpr int kScoreLd = kTile + 4;  // float stride of the score tile rows (wmma store: a multiple of 4)
constexpr int kScoreBytes = kRows * kScoreLd * 4;

__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }

// Shared-memory rows of a chunk: 16-byte aligned, and a multiple of 8 elements for wmma's 16-bit loads.
template <typename T>
__host__ __device__ constexpr int chunk_ld() { return kChunk + (sizeof(T) == 4 ? 4 : 8); }
// Shared memory: the x chunk, then the W chunk, whose bytes the score tile reuses once the products are
// formed. With dim <= kChunk the x chunk stays there for every tile of the block.
template <typename T>
__host__ __device__ constexpr int chunk_bytes() { return kRows * chunk_ld<T>() * static_cast<int>(sizeof(T)); }
template <typename T>
__host__ __device__ constexpr int smem_bytes() { return chunk_bytes<T>() + max_int(chunk_bytes<T>(), kScoreBytes); }

struct Args {
  const void* x;
  const void* weight;
  const float* bias;
  int64_t users, dim, vocab, first_item, num_items, split_rows;
  int k;
  const int64_t* exclude_ptr;
  const int64_t* exclude_items;
  const uint8_t* allow;
  int64_t allow_stride;
  float* out_values;
  int32_t* out_items;
  float* out_max;
  float* out_sum;
};


// (a, ia) ranks before (b, ib): larger logit, then smaller item.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// Rows [row0, row0 + 64) x dims [c0, c0 + width) of src (n_rows, dim) -> dst (64, ld); rows past n_rows
// and dims past width are zero. 16-byte loads: dim and width are multiples of 16, src is 16-byte aligned.
template <typename T>
__device__ void load_chunk(const T* src, int64_t n_rows, int64_t row0, int64_t dim, int64_t c0, int width,
                           T* dst) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = kChunk / kVec;
  constexpr int kLd = chunk_ld<T>();
  for (int e = threadIdx.x; e < kRows * kPerRow; e += blockDim.x) {
    const int r = e / kPerRow, c = (e % kPerRow) * kVec;
    const int64_t row = row0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < n_rows && c < width) v = __ldg(reinterpret_cast<const uint4*>(src + row * dim + c0 + c));
    *reinterpret_cast<uint4*>(dst + r * kLd + c) = v;
  }
}

// Loads chunk c0 of the tile's W rows, of the block's users unless their single chunk is already there
// (x_resident), and the tile's bias with the first chunk.
template <typename T>
__device__ void load_tile_chunk(const Args& a, int64_t user0, int64_t t0, int64_t t_end, int64_t c0, T* xs, T* ws,
                                float* bias_s, bool x_resident) {
  const int width = static_cast<int>(min64(kChunk, a.dim - c0));
  if (!x_resident) load_chunk(static_cast<const T*>(a.x), a.users, user0, a.dim, c0, width, xs);
  load_chunk(static_cast<const T*>(a.weight), t_end, t0, a.dim, c0, width, ws);
  if (c0 == 0 && threadIdx.x < kTile) {
    const int64_t v = t0 + threadIdx.x;
    bias_s[threadIdx.x] = (a.bias != nullptr && v < t_end) ? a.bias[v] : 0.f;
  }
}

// fp32: thread r forms row r of the tile, kTile accumulators in registers; W is read as a broadcast.
__device__ void score_tile(const Args& a, int64_t user0, int64_t t0, int64_t t_end, unsigned char* smem,
                           float* bias_s, bool x_resident, float /*tag*/) {
  constexpr int kLd = chunk_ld<float>();
  float* xs = reinterpret_cast<float*>(smem);
  float* ws = reinterpret_cast<float*>(smem + chunk_bytes<float>());
  float acc[kTile];
#pragma unroll
  for (int j = 0; j < kTile; ++j) acc[j] = 0.f;
  for (int64_t c0 = 0; c0 < a.dim; c0 += kChunk) {
    __syncthreads();  // the previous chunk's products, or the previous tile's row phase, are done
    load_tile_chunk(a, user0, t0, t_end, c0, xs, ws, bias_s, x_resident);
    __syncthreads();
    const int width = static_cast<int>(min64(kChunk, a.dim - c0));
    const float* xr = xs + threadIdx.x * kLd;
    for (int c = 0; c < width; c += 4) {
      const float4 xv = *reinterpret_cast<const float4*>(xr + c);
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        const float4 wv = *reinterpret_cast<const float4*>(ws + j * kLd + c);
        acc[j] = fmaf(xv.x, wv.x, fmaf(xv.y, wv.y, fmaf(xv.z, wv.z, fmaf(xv.w, wv.w, acc[j]))));
      }
    }
  }
  __syncthreads();  // every thread is done with the chunks before the score tile overwrites them
  float* row = reinterpret_cast<float*>(smem + chunk_bytes<float>()) + threadIdx.x * kScoreLd;
#pragma unroll
  for (int j = 0; j < kTile; ++j) row[j] = acc[j];
  __syncthreads();
}

// fp16 / bf16: warp w forms rows [32w, 32w + 32) of the tile as 2 x 4 wmma accumulators (fp32).
template <typename T>
__device__ void score_tile(const Args& a, int64_t user0, int64_t t0, int64_t t_end, unsigned char* smem,
                           float* bias_s, bool x_resident, T /*tag*/) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host refuses 16-bit inputs below compute capability 8.0
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kLd = chunk_ld<T>();
  T* xs = reinterpret_cast<T*>(smem);
  T* ws = reinterpret_cast<T*>(smem + chunk_bytes<T>());
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t c0 = 0; c0 < a.dim; c0 += kChunk) {
    __syncthreads();
    load_tile_chunk(a, user0, t0, t_end, c0, xs, ws, bias_s, x_resident);
    __syncthreads();
    const int width = static_cast<int>(min64(kChunk, a.dim - c0));
    for (int c = 0; c < width; c += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> xa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(xa[i], xs + (warp * 32 + i * 16) * kLd + c, kLd);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> wb;  // W rows = B's columns
        wmma::load_matrix_sync(wb, ws + j * 16 * kLd + c, kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], xa[i], wb, acc[i][j]);
      }
    }
  }
  __syncthreads();
  float* scores = reinterpret_cast<float*>(smem + chunk_bytes<T>());
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wmma::store_matrix_sync(scores + (warp * 32 + i * 16) * kScoreLd + j * 16, acc[i][j], kScoreLd,
                              wmma::mem_row_major);
  __syncthreads();
#endif
}

// One user's running state across the tiles of its split.
struct RowState {
  float max = -INFINITY;  // log-sum-exp parts
  float sum = 0.f;
  bool nan = false;
  int n = 0;              // filled top-k slots
  float worst = -INFINITY;
  int worst_item = INT_MAX;
  int64_t ex = 0, ex_end = 0;  // exclusion list cursor
};

// The row phase of one tile for this thread's user: log-sum-exp, exclusions, allow mask, top-k.
__device__ void row_phase(const Args& a, int64_t user, int64_t t0, int len, const float* z, const float* bias_s,
                          RowState& st, float* values, int32_t* items) {
  const int64_t item0 = t0 - a.first_item;  // item index of column 0
  const bool has_items = item0 + len > 0 && item0 < a.num_items;
  uint64_t excluded = 0;  // bit j: column j is excluded for this user
  for (; has_items && st.ex < st.ex_end && a.exclude_items[st.ex] < item0 + len; ++st.ex) {
    const int64_t j = a.exclude_items[st.ex] - item0;
    if (j >= 0) excluded |= uint64_t{1} << j;
  }
  const int rot = threadIdx.x;
  for (int q = 0; q < kTile; ++q) {
    const int j = (q + rot) & (kTile - 1);
    if (j >= len) continue;
    const float v = z[j] + bias_s[j];
    if (v != v) {  // NaN: the normaliser becomes NaN; never chosen
      st.nan = true;
      continue;
    }
    if (v > st.max) {  // online log-sum-exp: one exp per logit, one more when the max moves
      st.sum = st.sum * expf(st.max - v) + 1.f;
      st.max = v;
    } else if (v > -INFINITY) {
      st.sum += expf(v - st.max);
    }
    const int64_t item = item0 + j;
    if (!has_items || item < 0 || item >= a.num_items || ((excluded >> j) & 1)) continue;
    const int it = static_cast<int>(item);
    if (!(v > -INFINITY) || (st.n == a.k && !better(v, it, st.worst, st.worst_item))) continue;
    if (a.allow != nullptr && !a.allow[user * a.allow_stride + item]) continue;
    int p = st.n < a.k ? st.n : a.k - 1;
    for (; p > 0 && better(v, it, values[p - 1], items[p - 1]); --p) {
      values[p] = values[p - 1];
      items[p] = items[p - 1];
    }
    values[p] = v;
    items[p] = it;
    if (st.n < a.k) ++st.n;
    if (st.n == a.k) {
      st.worst = values[a.k - 1];
      st.worst_item = items[a.k - 1];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRows) head_topk_kernel(Args a) {
  __shared__ __align__(128) unsigned char smem[smem_bytes<T>()];
  __shared__ float bias_s[kTile];
  const int64_t user0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t user = user0 + threadIdx.x;
  const bool live = user < a.users;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t v_begin = min64(split * a.split_rows, a.vocab);
  const int64_t v_end = min64(v_begin + a.split_rows, a.vocab);
  const int64_t slot = (live ? user : 0) * splits + split;
  float* values = a.out_values + slot * a.k;
  int32_t* items = a.out_items + slot * a.k;

  RowState st;
  if (live && a.exclude_ptr != nullptr) {  // the first excluded item at or after the split's start
    int64_t lo = a.exclude_ptr[user], hi = a.exclude_ptr[user + 1];
    const int64_t first = v_begin - a.first_item;
    st.ex_end = hi;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.exclude_items[mid] < first) lo = mid + 1;
      else hi = mid;
    }
    st.ex = lo;
  }
  for (int64_t t0 = v_begin; t0 < v_end; t0 += kTile) {
    score_tile(a, user0, t0, v_end, smem, bias_s, a.dim <= kChunk && t0 != v_begin, T());
    if (live) {
      const int len = static_cast<int>(min64(kTile, v_end - t0));
      float* z = reinterpret_cast<float*>(smem + chunk_bytes<T>()) + threadIdx.x * kScoreLd;
      row_phase(a, user, t0, len, z, bias_s, st, values, items);
    }
  }
  if (!live) return;
  for (int p = st.n; p < a.k; ++p) {
    values[p] = -INFINITY;
    items[p] = -1;
  }
  a.out_max[slot] = st.max;
  a.out_sum[slot] = st.nan ? NAN : st.sum;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

std::string check(const HeadTopKParams& p) {
  const std::string pre = "genrec head_topk: ";
  if (p.x == nullptr || p.weight == nullptr || p.out_values == nullptr || p.out_items == nullptr ||
      p.out_max == nullptr || p.out_sum == nullptr)
    return pre + "x, weight and the four outputs must be device pointers, got a null one";
  if (p.dim < 16 || p.dim % 16 != 0)
    return pre + "dim: expected a positive multiple of 16, got " + std::to_string(p.dim);
  if (p.vocab < 1 || p.users < 0) return pre + "vocab: expected >= 1 and users >= 0";
  if (p.first_item < 0 || p.num_items < 0 || p.first_item + p.num_items > p.vocab || p.num_items >= INT_MAX)
    return pre + "items [" + std::to_string(p.first_item) + ", " + std::to_string(p.first_item + p.num_items) +
           ") do not fit a vocabulary of " + std::to_string(p.vocab);
  if (p.k < 1 || p.k > kHeadTopKMaxK)
    return pre + "k: expected 1.." + std::to_string(kHeadTopKMaxK) + ", got " + std::to_string(p.k);
  if (p.splits < 1 || p.splits > 65535) return pre + "splits: expected 1..65535, got " + std::to_string(p.splits);
  if (p.exclude_ptr != nullptr && p.exclude_items == nullptr) return pre + "exclude_ptr given without exclude_items";
  if (!aligned16(p.x) || !aligned16(p.weight)) return pre + "x and weight must be 16-byte aligned";
  if ((p.users + kRows - 1) / kRows > INT_MAX) return pre + "users: too many";
  return "";
}

template <typename T>
std::string launch(const HeadTopKParams& p, void* stream) {
  Args a{p.x, p.weight, p.bias, p.users, p.dim, p.vocab, p.first_item, p.num_items, 0, static_cast<int>(p.k),
         p.exclude_ptr, p.exclude_items, p.allow, p.allow_stride, p.out_values, p.out_items, p.out_max, p.out_sum};
  const int64_t tiles = (p.vocab + kTile - 1) / kTile;
  a.split_rows = (tiles + p.splits - 1) / p.splits * kTile;
  const dim3 grid(static_cast<unsigned>((p.users + kRows - 1) / kRows), static_cast<unsigned>(p.splits));
#ifdef GENREC_CUDA_EMU  // tests/cuda_emu: the same kernel on CPU threads
  (void)stream;
  genrec_emu::launch(grid, dim3(kRows), [&] { head_topk_kernel<T>(a); });
#else
  head_topk_kernel<T><<<grid, kRows, 0, static_cast<cudaStream_t>(stream)>>>(a);
#endif
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : std::string("genrec head_topk: launch failed: ") + cudaGetErrorString(err);
}

}  // namespace

int64_t head_topk_splits(int64_t users, int64_t vocab, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) sms = 108;
  const int64_t row_tiles = std::max<int64_t>(1, (users + kRows - 1) / kRows);
  const int64_t tiles = std::max<int64_t>(1, (vocab + kTile - 1) / kTile);
  const int64_t want = (8 * static_cast<int64_t>(sms) + row_tiles - 1) / row_tiles;
  return min64(min64(want, tiles), 65535);
}

std::string head_topk_forward(const HeadTopKParams& p, void* stream) {
  std::string err = check(p);
  if (!err.empty()) return err;
  if (p.users == 0) return "";
  if (p.dtype != HeadDType::kFloat32) {
    int device = 0, major = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (major < 8) return "genrec head_topk: fp16/bf16 need compute capability 8.0 or newer (tensor-core wmma)";
  }
  switch (p.dtype) {
    case HeadDType::kFloat32: return launch<float>(p, stream);
    case HeadDType::kFloat16: return launch<__half>(p, stream);
    case HeadDType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
  }
  return "genrec head_topk: unknown dtype code " + std::to_string(static_cast<int>(p.dtype));
}

}  // namespace genrec
