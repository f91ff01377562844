// The C ABIs pass float16 and bfloat16 buffers as unsigned short (the raw bits), so that no
// caller needs CUDA's half types; these views turn them back into __half / __nv_bfloat16.
// Also the conversions to and from float32, the vector types and the row partition of the
// column-sum kernels, which the kernels share.

#ifndef TFBERT_CUDA_HALF_BITS_CUH_
#define TFBERT_CUDA_HALF_BITS_CUH_

#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

static_assert(sizeof(__half) == sizeof(unsigned short), "__half is 16 bits");
static_assert(sizeof(__nv_bfloat16) == sizeof(unsigned short), "__nv_bfloat16 is 16 bits");

inline const __half* AsHalf(const unsigned short* p) { return reinterpret_cast<const __half*>(p); }
inline __half* AsHalf(unsigned short* p) { return reinterpret_cast<__half*>(p); }
inline const __nv_bfloat16* AsBf16(const unsigned short* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}
inline __nv_bfloat16* AsBf16(unsigned short* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// float32 <-> the kernels' storage types, rounding to nearest even: the kernels compute in
// float32 whatever they read or write.
__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// kSize elements loaded or stored as one 16-byte access (8 16-bit or 4 float32 elements).
template <typename T>
struct alignas(16) Vector16 {
  static constexpr int kSize = 16 / sizeof(T);
  T values[kSize];
};

// Two adjacent elements loaded or stored as one access (4 bytes in 16 bits, 8 in float32).
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T first, second;
};

// Whether p may be read or written as a `bytes`-aligned vector (a Vector16 or a Pair).
inline bool IsAligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The rows [begin, end) of this block in the column-sum kernels (bias, gamma and beta
// gradients): gridDim.y blocks take equal slices of `rows` in order, the last one shorter.
struct RowSlice {
  long long begin, end;
};

__device__ __forceinline__ RowSlice BlockRowSlice(long long rows) {
  const long long rows_per_block = (rows + gridDim.y - 1) / gridDim.y;
  const long long begin = blockIdx.y * rows_per_block;
  return RowSlice{begin, min(rows, begin + rows_per_block)};
}

// The end of a column-sum block of 32 columns by kRowsPerPass rows (threadIdx.x the column,
// threadIdx.y the row within each pass): each thread has summed its rows of column `col`; the
// kRowsPerPass sums of a column are added in row order and stored as the block's partial, row
// blockIdx.y of partial ([row_blocks, cols]). Every thread of the block must call it.
template <int kRowsPerPass>
__device__ __forceinline__ void StoreBlockColumnSum(float sum, int col, int cols,
                                                    float* __restrict__ partial) {
  __shared__ float sums[kRowsPerPass][32 + 1];  // +1: no bank conflicts
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kRowsPerPass; ++i) sum += sums[i][threadIdx.x];
    partial[blockIdx.y * static_cast<long long>(cols) + col] = sum;
  }
}

// The second step of the column-sum kernels' deterministic reductions (bias gradients): one
// thread per column adds the row blocks' float32 partials ([row_blocks, cols]) in block order
// and stores the sum in the output's type. No atomics, so the sums are bit-identical from run
// to run.
template <typename T>
__global__ void SumRowBlockPartialsKernel(const float* __restrict__ partial, int row_blocks,
                                          int cols, T* __restrict__ out) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.0f;
  for (int b = 0; b < row_blocks; ++b) sum += partial[static_cast<long long>(b) * cols + col];
  out[col] = FromFloat<T>(sum);
}

#endif  // TFBERT_CUDA_HALF_BITS_CUH_
