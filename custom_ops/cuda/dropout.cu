// The fused dropout CUDA kernels (dropout, and bias + dropout + residual), behind the C ABI of
// dropout_launch.h.
//
// The keep decision of element i is tfbert_dropout_keep(key, i, rate) (dropout_rng.h, the CPU
// kernel's function), so the op needs neither a random-number state nor a stored mask, and its
// backward pass is the same kernel on the upstream gradient. float32 arithmetic whatever the
// storage type.
//
// The hash (two 64-bit multiplies per element) costs about as much as the memory traffic, so
// each thread takes 16 bytes at a time (8 16-bit or 4 float32 elements: one vector load and
// store, the hashes independent of each other) and steps the hash's counter by additions:
// bits(i) = mix64(key + (i + 1) * G), and (i + 1) * G for the next element is G more. A
// grid-stride loop over the 16-byte vectors, then the last size % 16-byte elements; buffers
// not 16-byte aligned take the element-wise loop alone.

#include <stdint.h>

#include "dropout_launch.h"
#include "dropout_rng.h"
#include "half_bits.cuh"

namespace {

constexpr int kThreads = 256;
// Blocks of the grid; larger inputs loop (grid-stride). Enough to fill any current GPU.
constexpr long long kMaxBlocks = 1LL << 15;

// Element i from counter = key + (i + 1) * G, with dropout_rng.h's integer keep decision.
template <typename T>
__device__ __forceinline__ T Drop(T x, uint64_t counter, uint64_t threshold, float keep_scale) {
  const bool keep = (tfbert_dropout_mix64(counter) >> 40) >= threshold;
  return FromFloat<T>(keep ? __fmul_rn(ToFloat(x), keep_scale) : 0.0f);
}

template <typename T>
__global__ void DropoutKernel(const T* __restrict__ x, long long size, bool vectorised,
                              uint64_t threshold, uint64_t key, float keep_scale,
                              T* __restrict__ y) {
  constexpr int kSize = Vector16<T>::kSize;
  const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long threads = (long long)gridDim.x * blockDim.x;
  const long long vectors = vectorised ? size / kSize : 0;
  const Vector16<T>* x_vectors = reinterpret_cast<const Vector16<T>*>(x);
  Vector16<T>* y_vectors = reinterpret_cast<Vector16<T>*>(y);
  for (long long v = thread; v < vectors; v += threads) {
    const Vector16<T> in = x_vectors[v];
    Vector16<T> out;
    uint64_t counter = key + ((uint64_t)v * kSize + 1) * TFBERT_DROPOUT_RNG_GAMMA;
#pragma unroll
    for (int e = 0; e < kSize; ++e) {
      out.values[e] = Drop(in.values[e], counter, threshold, keep_scale);
      counter += TFBERT_DROPOUT_RNG_GAMMA;
    }
    y_vectors[v] = out;
  }
  for (long long i = vectors * kSize + thread; i < size; i += threads) {
    y[i] = Drop(x[i], key + ((uint64_t)i + 1) * TFBERT_DROPOUT_RNG_GAMMA, threshold, keep_scale);
  }
}

template <typename T>
cudaError_t Launch(const T* x, long long size, float rate, long long seed0, long long seed1,
                   T* y, cudaStream_t stream) {
  if (size <= 0) return cudaSuccess;
  const bool vectorised = IsAligned(x, 16) && IsAligned(y, 16);
  const long long work = vectorised ? (size + Vector16<T>::kSize - 1) / Vector16<T>::kSize : size;
  long long blocks = (work + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const float keep_scale = 1.0f / (1.0f - rate);  // inverted dropout, as the CPU kernel
  DropoutKernel<T><<<(unsigned int)blocks, kThreads, 0, stream>>>(
      x, size, vectorised, tfbert_dropout_keep_threshold(rate), tfbert_dropout_key(seed0, seed1),
      keep_scale, y);
  return cudaGetLastError();
}

// y = dropout(x + bias) + residual, rows of `cols` elements: blocks take rows (grid-stride),
// the block's threads a row's columns, so the bias needs no division of the flat index. The
// same float32 operations as the CPU kernel; element-wise loads.
template <typename T>
__global__ void BiasDropoutAddKernel(const T* __restrict__ x, const T* __restrict__ bias,
                                     const T* __restrict__ residual, long long rows,
                                     long long cols, uint64_t threshold, uint64_t key,
                                     float keep_scale, T* __restrict__ y) {
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = row * cols;
    for (long long col = threadIdx.x; col < cols; col += blockDim.x) {
      const long long i = base + col;
      const float biased = __fadd_rn(ToFloat(x[i]), ToFloat(bias[col]));
      const uint64_t counter = key + ((uint64_t)i + 1) * TFBERT_DROPOUT_RNG_GAMMA;
      const bool keep = (tfbert_dropout_mix64(counter) >> 40) >= threshold;
      const float dropped = keep ? __fmul_rn(biased, keep_scale) : 0.0f;
      y[i] = FromFloat<T>(__fadd_rn(dropped, ToFloat(residual[i])));
    }
  }
}

template <typename T>
cudaError_t LaunchBiasDropoutAdd(const T* x, const T* bias, const T* residual, long long size,
                                 long long cols, float rate, long long seed0, long long seed1,
                                 T* y, cudaStream_t stream) {
  if (size <= 0 || cols <= 0) return cudaSuccess;
  const long long rows = size / cols;
  const long long blocks = rows < kMaxBlocks ? rows : kMaxBlocks;
  const float keep_scale = 1.0f / (1.0f - rate);  // as the dropout kernel
  BiasDropoutAddKernel<T><<<(unsigned int)blocks, kThreads, 0, stream>>>(
      x, bias, residual, rows, cols, tfbert_dropout_keep_threshold(rate),
      tfbert_dropout_key(seed0, seed1), keep_scale, y);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t tfbert_dropout_f32(const float* x, long long size, float rate, long long seed0,
                               long long seed1, float* y, cudaStream_t stream) {
  return Launch(x, size, rate, seed0, seed1, y, stream);
}

cudaError_t tfbert_dropout_f16(const unsigned short* x, long long size, float rate,
                               long long seed0, long long seed1, unsigned short* y,
                               cudaStream_t stream) {
  return Launch(AsHalf(x), size, rate, seed0, seed1, AsHalf(y), stream);
}

cudaError_t tfbert_dropout_bf16(const unsigned short* x, long long size, float rate,
                                long long seed0, long long seed1, unsigned short* y,
                                cudaStream_t stream) {
  return Launch(AsBf16(x), size, rate, seed0, seed1, AsBf16(y), stream);
}

cudaError_t tfbert_bias_dropout_add_f32(const float* x, const float* bias, const float* residual,
                                        long long size, long long cols, float rate,
                                        long long seed0, long long seed1, float* y,
                                        cudaStream_t stream) {
  return LaunchBiasDropoutAdd(x, bias, residual, size, cols, rate, seed0, seed1, y, stream);
}

cudaError_t tfbert_bias_dropout_add_f16(const unsigned short* x, const unsigned short* bias,
                                        const unsigned short* residual, long long size,
                                        long long cols, float rate, long long seed0,
                                        long long seed1, unsigned short* y,
                                        cudaStream_t stream) {
  return LaunchBiasDropoutAdd(AsHalf(x), AsHalf(bias), AsHalf(residual), size, cols, rate, seed0,
                              seed1, AsHalf(y), stream);
}

cudaError_t tfbert_bias_dropout_add_bf16(const unsigned short* x, const unsigned short* bias,
                                         const unsigned short* residual, long long size,
                                         long long cols, float rate, long long seed0,
                                         long long seed1, unsigned short* y,
                                         cudaStream_t stream) {
  return LaunchBiasDropoutAdd(AsBf16(x), AsBf16(bias), AsBf16(residual), size, cols, rate, seed0,
                              seed1, AsBf16(y), stream);
}

}  // extern "C"
