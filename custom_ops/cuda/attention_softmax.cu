// CUDA kernels of the fused attention softmax, behind the C ABI of attention_softmax_launch.h.
//
// One warp per row (a row is one query's Sk scores): each lane strides over the row, and the
// row's maximum and sums are warp-shuffle reductions, so no shared memory or block barriers.
// The forward reads the row three times (maximum, sum of exponentials, output) instead of
// caching it in registers: it is simple, works for any Sk, and for BERT's Sk <= 512 the row
// (<= 2 KiB) stays in L1 between the passes. All arithmetic is in float32. The dropout mask is
// tfbert_dropout_keep of dropout_rng.h over the flat index, the same function as the CPU kernel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "attention_softmax_launch.h"
#include "dropout_rng.h"

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // 128 threads: 4 rows per block

// float32 <-> storage type. The 16-bit types travel as their raw bits (unsigned short).
struct F32 {
  using Storage = float;
  static __device__ __forceinline__ float Load(const float* p) { return *p; }
  static __device__ __forceinline__ void Store(float* p, float v) { *p = v; }
};
struct F16 {
  using Storage = unsigned short;
  static __device__ __forceinline__ float Load(const unsigned short* p) {
    return __half2float(__ushort_as_half(*p));
  }
  static __device__ __forceinline__ void Store(unsigned short* p, float v) {
    *p = __half_as_ushort(__float2half_rn(v));
  }
};
struct BF16 {
  using Storage = unsigned short;
  static __device__ __forceinline__ float Load(const unsigned short* p) {
    return __bfloat162float(__ushort_as_bfloat16(*p));
  }
  static __device__ __forceinline__ void Store(unsigned short* p, float v) {
    *p = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

__device__ __forceinline__ float WarpMax(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename Type>
__global__ void ForwardKernel(const typename Type::Storage* __restrict__ scores,
                              const typename Type::Storage* __restrict__ mask_bias,
                              long long rows, long long cols, long long heads_queries,
                              long long queries, long long mask_rows, float scale,
                              float dropout_rate, uint64_t key,
                              typename Type::Storage* probs,
                              typename Type::Storage* softmax) {
  const long long row = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // the whole warp leaves together: the shuffles stay full-warp
  const typename Type::Storage* s = scores + row * cols;
  const long long mask_row =
      (row / heads_queries) * mask_rows + (mask_rows == 1 ? 0 : row % queries);
  const typename Type::Storage* m = mask_bias + mask_row * cols;

  // The reference's order: float32(score) * scale, then + float32(mask).
  float row_max = -INFINITY;
  for (long long k = lane; k < cols; k += kWarp) {
    row_max = fmaxf(row_max, Type::Load(s + k) * scale + Type::Load(m + k));
  }
  row_max = WarpMax(row_max);
  // Every key masked with -inf: a uniform row instead of 0/0 = NaN (as the CPU kernel).
  const bool all_masked = row_max == -INFINITY;

  float sum = 0.0f;
  if (!all_masked) {
    for (long long k = lane; k < cols; k += kWarp) {
      sum += expf(Type::Load(s + k) * scale + Type::Load(m + k) - row_max);
    }
    sum = WarpSum(sum);
  }
  const float inv_sum = all_masked ? 1.0f / (float)cols : 1.0f / sum;
  const float keep_scale = 1.0f / (1.0f - dropout_rate);

  typename Type::Storage* out = probs + row * cols;
  typename Type::Storage* out_softmax = softmax + row * cols;
  for (long long k = lane; k < cols; k += kWarp) {
    const float e =
        all_masked ? 1.0f : expf(Type::Load(s + k) * scale + Type::Load(m + k) - row_max);
    const float p = e * inv_sum;
    if (dropout_rate > 0.0f) {
      Type::Store(out_softmax + k, p);
      const bool keep = tfbert_dropout_keep(key, (uint64_t)(row * cols + k), dropout_rate);
      Type::Store(out + k, keep ? p * keep_scale : 0.0f);
    } else {
      Type::Store(out + k, p);  // softmax is probs
    }
  }
}

// dscores = scale * p * (d - sum_k(d * p)), d = dprobs * keep / (1 - rate).
template <typename Type>
__global__ void BackwardKernel(const typename Type::Storage* __restrict__ dprobs,
                               const typename Type::Storage* __restrict__ softmax,
                               long long rows, long long cols, float scale, float dropout_rate,
                               uint64_t key, typename Type::Storage* __restrict__ dscores) {
  const long long row = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const typename Type::Storage* dp = dprobs + row * cols;
  const typename Type::Storage* p = softmax + row * cols;
  const float keep_scale = 1.0f / (1.0f - dropout_rate);
  const uint64_t base = (uint64_t)(row * cols);

  float dot = 0.0f;
  for (long long k = lane; k < cols; k += kWarp) {
    float g = Type::Load(dp + k);
    if (dropout_rate > 0.0f) {
      g = tfbert_dropout_keep(key, base + k, dropout_rate) ? g * keep_scale : 0.0f;
    }
    dot += g * Type::Load(p + k);
  }
  dot = WarpSum(dot);

  typename Type::Storage* out = dscores + row * cols;
  for (long long k = lane; k < cols; k += kWarp) {
    float g = Type::Load(dp + k);
    if (dropout_rate > 0.0f) {
      g = tfbert_dropout_keep(key, base + k, dropout_rate) ? g * keep_scale : 0.0f;
    }
    Type::Store(out + k, scale * Type::Load(p + k) * (g - dot));
  }
}

__global__ void KeepMaskKernel(long long size, float rate, uint64_t key, unsigned char* keep) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < size;
       i += (long long)gridDim.x * blockDim.x) {
    keep[i] = tfbert_dropout_keep(key, (uint64_t)i, rate) ? 1 : 0;
  }
}

inline unsigned int RowBlocks(long long rows) {
  return (unsigned int)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

template <typename Type>
cudaError_t LaunchForward(const typename Type::Storage* scores,
                          const typename Type::Storage* mask_bias, long long rows,
                          long long cols, long long heads_queries, long long queries,
                          long long mask_rows, float scale, float dropout_rate, long long seed0,
                          long long seed1, typename Type::Storage* probs,
                          typename Type::Storage* softmax, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  ForwardKernel<Type><<<RowBlocks(rows), kWarpsPerBlock * kWarp, 0, stream>>>(
      scores, mask_bias, rows, cols, heads_queries, queries, mask_rows, scale, dropout_rate,
      tfbert_dropout_key(seed0, seed1), probs, softmax);
  return cudaGetLastError();
}

template <typename Type>
cudaError_t LaunchBackward(const typename Type::Storage* dprobs,
                           const typename Type::Storage* softmax, long long rows,
                           long long cols, float scale, float dropout_rate, long long seed0,
                           long long seed1, typename Type::Storage* dscores,
                           cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  BackwardKernel<Type><<<RowBlocks(rows), kWarpsPerBlock * kWarp, 0, stream>>>(
      dprobs, softmax, rows, cols, scale, dropout_rate, tfbert_dropout_key(seed0, seed1),
      dscores);
  return cudaGetLastError();
}

}  // namespace

#define TFBERT_ATTENTION_SOFTMAX_LAUNCHERS(SUFFIX, TYPE, STORAGE)                              \
  extern "C" cudaError_t tfbert_attention_softmax_forward_##SUFFIX(                            \
      const STORAGE* scores, const STORAGE* mask_bias, long long rows, long long cols,         \
      long long heads_queries, long long queries, long long mask_rows, float scale,            \
      float dropout_rate, long long seed0, long long seed1, STORAGE* probs, STORAGE* softmax,  \
      cudaStream_t stream) {                                                                   \
    return LaunchForward<TYPE>(scores, mask_bias, rows, cols, heads_queries, queries,          \
                               mask_rows, scale, dropout_rate, seed0, seed1, probs, softmax,   \
                               stream);                                                        \
  }                                                                                            \
  extern "C" cudaError_t tfbert_attention_softmax_backward_##SUFFIX(                           \
      const STORAGE* dprobs, const STORAGE* softmax, long long rows, long long cols,           \
      float scale, float dropout_rate, long long seed0, long long seed1, STORAGE* dscores,     \
      cudaStream_t stream) {                                                                   \
    return LaunchBackward<TYPE>(dprobs, softmax, rows, cols, scale, dropout_rate, seed0,       \
                                seed1, dscores, stream);                                       \
  }

TFBERT_ATTENTION_SOFTMAX_LAUNCHERS(f32, F32, float)
TFBERT_ATTENTION_SOFTMAX_LAUNCHERS(f16, F16, unsigned short)
TFBERT_ATTENTION_SOFTMAX_LAUNCHERS(bf16, BF16, unsigned short)
#undef TFBERT_ATTENTION_SOFTMAX_LAUNCHERS

extern "C" cudaError_t tfbert_dropout_keep_mask(long long size, float rate, long long seed0,
                                                long long seed1, unsigned char* keep,
                                                cudaStream_t stream) {
  if (size <= 0) return cudaSuccess;
  const int threads = 256;
  long long blocks = (size + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop beyond
  KeepMaskKernel<<<(unsigned int)blocks, threads, 0, stream>>>(
      size, rate, tfbert_dropout_key(seed0, seed1), keep);
  return cudaGetLastError();
}
