// CUDA kernels of the fused bias + split-heads op, behind the C ABI of split_heads_launch.h.
//
// Forward: a grid-stride loop over x's elements; each adds its bias and writes the element to
// its place in query, key or value (consecutive threads read consecutive x and write runs of H
// consecutive elements of one head).
// Backward: one pass gathers the gradients back into dx's layout and sums dbias as gelu.cu
// does: block (32, 8) of grid (ceil(3D / 32), row_blocks) adds its rows' columns in a fixed
// order into a partial, and a second kernel adds the partials in block order.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half_bits.cuh"
#include "split_heads_launch.h"

namespace {

constexpr int kThreads = 256;
constexpr long long kMaxBlocks = 1LL << 15;
constexpr int kWarpSize = 32;
constexpr int kGradRowsPerPass = 8;

unsigned int Grid(long long size) {
  const long long blocks = (size + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Element i of x ([B, S, 3, n, H]) -> its part p and its index in that part's [B, n, S, H].
struct Place {
  int part;
  long long index;
};

__device__ __forceinline__ Place PlaceOf(long long i, long long seq, int heads, int head_size) {
  const long long width = static_cast<long long>(heads) * head_size;  // D
  const long long row = i / (3 * width);                               // b * S + s
  const long long col = i - row * 3 * width;                           // p * D + j * H + h
  const int part = static_cast<int>(col / width);
  const long long within = col - part * width;
  const long long head = within / head_size, h = within - head * head_size;
  const long long b = row / seq, s = row - b * seq;
  return Place{part, ((b * heads + head) * seq + s) * head_size + h};
}

template <typename T>
__global__ void ForwardKernel(const T* __restrict__ x, const T* __restrict__ bias,
                              long long size, long long seq, int heads, int head_size,
                              T* __restrict__ query, T* __restrict__ key, T* __restrict__ value) {
  const long long cols = 3LL * heads * head_size;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const Place place = PlaceOf(i, seq, heads, head_size);
    T* out = place.part == 0 ? query : (place.part == 1 ? key : value);
    out[place.index] = FromFloat<T>(ToFloat(x[i]) + ToFloat(bias[i % cols]));
  }
}

// Block (32, kGradRowsPerPass), grid (ceil(3D / 32), row_blocks): block (bx, by) gathers
// dx's columns [32 bx, 32 bx + 32) of its rows from the three gradients (a warp reads runs of
// consecutive h of one head) and stores their column sums as row `by` of partial
// ([row_blocks, 3D]).
template <typename T>
__global__ void BackwardKernel(const T* __restrict__ dquery, const T* __restrict__ dkey,
                               const T* __restrict__ dvalue, long long rows, long long seq,
                               int heads, int head_size, T* __restrict__ dx,
                               float* __restrict__ partial) {
  const int cols = 3 * heads * head_size;
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  const RowSlice slice = BlockRowSlice(rows);
  float sum = 0.0f;
  if (col < cols) {
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kGradRowsPerPass) {
      const long long i = row * cols + col;
      const Place place = PlaceOf(i, seq, heads, head_size);
      const T* in = place.part == 0 ? dquery : (place.part == 1 ? dkey : dvalue);
      const T value = in[place.index];
      dx[i] = value;
      sum += ToFloat(value);
    }
  }
  StoreBlockColumnSum<kGradRowsPerPass>(sum, col, cols, partial);
}

template <typename T>
cudaError_t LaunchForward(const T* x, const T* bias, long long batch, long long seq, int heads,
                          int head_size, T* query, T* key, T* value, cudaStream_t stream) {
  const long long size = batch * seq * 3 * heads * head_size;
  if (size <= 0) return cudaSuccess;
  ForwardKernel<T><<<Grid(size), kThreads, 0, stream>>>(x, bias, size, seq, heads, head_size,
                                                        query, key, value);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchBackward(const T* dquery, const T* dkey, const T* dvalue, long long batch,
                           long long seq, int heads, int head_size, T* dx, T* dbias,
                           float* workspace, cudaStream_t stream) {
  const int cols = 3 * heads * head_size;
  const long long rows = batch * seq;
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) return cudaMemsetAsync(dbias, 0, sizeof(T) * cols, stream);  // empty sums
  const int row_blocks = static_cast<int>(tfbert_split_heads_grad_row_blocks(rows));
  const dim3 grid((cols + kWarpSize - 1) / kWarpSize, row_blocks);
  BackwardKernel<T><<<grid, dim3(kWarpSize, kGradRowsPerPass), 0, stream>>>(
      dquery, dkey, dvalue, rows, seq, heads, head_size, dx, workspace);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  SumRowBlockPartialsKernel<T><<<(cols + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      workspace, row_blocks, cols, dbias);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t tfbert_bias_split_heads_forward_f32(const float* x, const float* bias, long long batch,
                                                long long seq, int heads, int head_size,
                                                float* query, float* key, float* value,
                                                cudaStream_t stream) {
  return LaunchForward(x, bias, batch, seq, heads, head_size, query, key, value, stream);
}
cudaError_t tfbert_bias_split_heads_forward_f16(const unsigned short* x,
                                                const unsigned short* bias, long long batch,
                                                long long seq, int heads, int head_size,
                                                unsigned short* query, unsigned short* key,
                                                unsigned short* value, cudaStream_t stream) {
  return LaunchForward(AsHalf(x), AsHalf(bias), batch, seq, heads, head_size, AsHalf(query),
                       AsHalf(key), AsHalf(value), stream);
}
cudaError_t tfbert_bias_split_heads_forward_bf16(const unsigned short* x,
                                                 const unsigned short* bias, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 unsigned short* query, unsigned short* key,
                                                 unsigned short* value, cudaStream_t stream) {
  return LaunchForward(AsBf16(x), AsBf16(bias), batch, seq, heads, head_size, AsBf16(query),
                       AsBf16(key), AsBf16(value), stream);
}

cudaError_t tfbert_bias_split_heads_backward_f32(const float* dquery, const float* dkey,
                                                 const float* dvalue, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 float* dx, float* dbias, float* workspace,
                                                 cudaStream_t stream) {
  return LaunchBackward(dquery, dkey, dvalue, batch, seq, heads, head_size, dx, dbias,
                        workspace, stream);
}
cudaError_t tfbert_bias_split_heads_backward_f16(const unsigned short* dquery,
                                                 const unsigned short* dkey,
                                                 const unsigned short* dvalue, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 unsigned short* dx, unsigned short* dbias,
                                                 float* workspace, cudaStream_t stream) {
  return LaunchBackward(AsHalf(dquery), AsHalf(dkey), AsHalf(dvalue), batch, seq, heads,
                        head_size, AsHalf(dx), AsHalf(dbias), workspace, stream);
}
cudaError_t tfbert_bias_split_heads_backward_bf16(const unsigned short* dquery,
                                                  const unsigned short* dkey,
                                                  const unsigned short* dvalue, long long batch,
                                                  long long seq, int heads, int head_size,
                                                  unsigned short* dx, unsigned short* dbias,
                                                  float* workspace, cudaStream_t stream) {
  return LaunchBackward(AsBf16(dquery), AsBf16(dkey), AsBf16(dvalue), batch, seq, heads,
                        head_size, AsBf16(dx), AsBf16(dbias), workspace, stream);
}

}  // extern "C"
