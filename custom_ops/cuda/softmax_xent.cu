// CUDA kernels of the fused softmax cross-entropy, behind the C ABI of softmax_xent_launch.h.
//
// Forward: one block per row. Each thread strides over the row keeping its largest
// z = logits + bias and the first column where it saw it; a block reduction (warp shuffles,
// then the warps' results in order) takes the largest value and, among equal ones, the lowest
// column. A second pass sums exp(z - max) the same way. The row is read twice instead of being
// cached: for a 30k vocabulary in 16 bits it is 60 KiB, which L2 keeps between the passes.
//
// Backward: block (32, 8) of grid (ceil(cols / 32), row_blocks) owns 32 columns of one block
// of rows, as gelu.cu's bias gradient: each thread writes dlogits for its column on every 8th
// row and adds the float32 gradients; the 8 threads of a column are summed in a fixed order into
// the block's partial, and a second kernel adds the row blocks' partials in block order. No
// atomics: dbias is bit-identical from run to run. The softmax is recomputed from the logits
// and log_sum_exp rather than stored by the forward pass.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>

#include "half_bits.cuh"
#include "softmax_xent_launch.h"

namespace {

constexpr int kWarpSize = 32;
constexpr int kForwardThreads = 256;
constexpr int kWarps = kForwardThreads / kWarpSize;
constexpr int kGradRowsPerPass = 8;
constexpr int kReduceThreads = 256;
constexpr int kNoColumn = 0x7fffffff;

// (value, column) pairs: the larger value wins; of equal values, the lower column.
__device__ __forceinline__ void TakeLarger(float* value, int* column, float other_value,
                                           int other_column) {
  if (other_value > *value || (other_value == *value && other_column < *column)) {
    *value = other_value;
    *column = other_column;
  }
}

// The block's largest value and its lowest column, on every thread. `shared_*` hold one entry
// per warp.
__device__ void BlockMaxAndArgmax(float* value, int* column, float* shared_values,
                                  int* shared_columns) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    TakeLarger(value, column, __shfl_xor_sync(0xffffffffu, *value, offset),
               __shfl_xor_sync(0xffffffffu, *column, offset));
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    shared_values[warp] = *value;
    shared_columns[warp] = *column;
  }
  __syncthreads();
  *value = shared_values[0];
  *column = shared_columns[0];
  for (int w = 1; w < kWarps; ++w) TakeLarger(value, column, shared_values[w], shared_columns[w]);
  __syncthreads();  // the shared entries may be reused
}

// The block's sum, on every thread: warp sums, then the warps' sums in warp order.
__device__ float BlockSum(float value, float* shared_values) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) shared_values[warp] = value;
  __syncthreads();
  float sum = shared_values[0];
  for (int w = 1; w < kWarps; ++w) sum += shared_values[w];
  __syncthreads();
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kForwardThreads)
    SoftmaxXentForwardKernel(const T* __restrict__ logits, const float* __restrict__ bias,
                             const int* __restrict__ labels, int cols,
                             float* __restrict__ loss, float* __restrict__ log_sum_exp,
                             int* __restrict__ predicted) {
  __shared__ float shared_values[kWarps];
  __shared__ int shared_columns[kWarps];
  const long long row = blockIdx.x;
  const T* x = logits + row * cols;

  float row_max = -INFINITY;
  int argmax = kNoColumn;
  for (int c = threadIdx.x; c < cols; c += kForwardThreads) {
    const float z = ToFloat(x[c]) + bias[c];
    if (z > row_max) {  // strict: a thread's columns rise, so it keeps the first; NaN never wins
      row_max = z;
      argmax = c;
    }
  }
  BlockMaxAndArgmax(&row_max, &argmax, shared_values, shared_columns);

  float sum = 0.0f;
  for (int c = threadIdx.x; c < cols; c += kForwardThreads) {
    sum += expf(ToFloat(x[c]) + bias[c] - row_max);
  }
  sum = BlockSum(sum, shared_values);

  if (threadIdx.x == 0) {
    const int label = labels[row];
    const float log_sum = logf(sum);
    const float target = (label >= 0 && label < cols) ? ToFloat(x[label]) + bias[label] : NAN;
    loss[row] = log_sum - (target - row_max);
    log_sum_exp[row] = row_max + log_sum;
    predicted[row] = argmax == kNoColumn ? 0 : argmax;
  }
}

// Block (32, kGradRowsPerPass), grid (ceil(cols / 32), row_blocks): block (bx, by) writes
// dlogits for columns [32 bx, 32 bx + 32) of its rows and their column sums into row `by` of
// partial ([row_blocks, cols]).
template <typename T>
__global__ void SoftmaxXentBackwardKernel(const float* __restrict__ dloss,
                                          const T* __restrict__ logits,
                                          const float* __restrict__ bias,
                                          const int* __restrict__ labels,
                                          const float* __restrict__ log_sum_exp, long long rows,
                                          int cols, T* __restrict__ dlogits,
                                          float* __restrict__ partial) {
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  const RowSlice slice = BlockRowSlice(rows);
  float sum = 0.0f;
  if (col < cols) {
    const float b = bias[col];
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kGradRowsPerPass) {
      const long long i = row * cols + col;
      const float p = expf(ToFloat(logits[i]) + b - log_sum_exp[row]);
      const float grad = dloss[row] * (p - (col == labels[row] ? 1.0f : 0.0f));
      dlogits[i] = FromFloat<T>(grad);
      sum += grad;  // dbias from the float32 gradient, not the rounded dlogits
    }
  }
  StoreBlockColumnSum<kGradRowsPerPass>(sum, col, cols, partial);
}

template <typename T>
cudaError_t LaunchForward(const T* logits, const float* bias, const int* labels, long long rows,
                          int cols, float* loss, float* log_sum_exp, int* predicted,
                          cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidValue;  // one block per row
  SoftmaxXentForwardKernel<T><<<static_cast<unsigned int>(rows), kForwardThreads, 0, stream>>>(
      logits, bias, labels, cols, loss, log_sum_exp, predicted);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchBackward(const float* dloss, const T* logits, const float* bias,
                           const int* labels, const float* log_sum_exp, long long rows, int cols,
                           T* dlogits, float* dbias, float* workspace, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) return cudaMemsetAsync(dbias, 0, sizeof(float) * cols, stream);  // empty sums
  const int row_blocks = static_cast<int>(tfbert_softmax_xent_grad_row_blocks(rows));
  const dim3 block(kWarpSize, kGradRowsPerPass);
  const dim3 grid((cols + kWarpSize - 1) / kWarpSize, row_blocks);
  SoftmaxXentBackwardKernel<T><<<grid, block, 0, stream>>>(dloss, logits, bias, labels,
                                                           log_sum_exp, rows, cols, dlogits,
                                                           workspace);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const int reduce_blocks = (cols + kReduceThreads - 1) / kReduceThreads;
  SumRowBlockPartialsKernel<float><<<reduce_blocks, kReduceThreads, 0, stream>>>(
      workspace, row_blocks, cols, dbias);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t tfbert_softmax_xent_forward_f32(const float* logits, const float* bias,
                                            const int* labels, long long rows, int cols,
                                            float* loss, float* log_sum_exp, int* predicted,
                                            cudaStream_t stream) {
  return LaunchForward(logits, bias, labels, rows, cols, loss, log_sum_exp, predicted, stream);
}
cudaError_t tfbert_softmax_xent_forward_f16(const unsigned short* logits, const float* bias,
                                            const int* labels, long long rows, int cols,
                                            float* loss, float* log_sum_exp, int* predicted,
                                            cudaStream_t stream) {
  return LaunchForward(AsHalf(logits), bias, labels, rows, cols, loss, log_sum_exp, predicted,
                       stream);
}
cudaError_t tfbert_softmax_xent_forward_bf16(const unsigned short* logits, const float* bias,
                                             const int* labels, long long rows, int cols,
                                             float* loss, float* log_sum_exp, int* predicted,
                                             cudaStream_t stream) {
  return LaunchForward(AsBf16(logits), bias, labels, rows, cols, loss, log_sum_exp, predicted,
                       stream);
}

cudaError_t tfbert_softmax_xent_backward_f32(const float* dloss, const float* logits,
                                             const float* bias, const int* labels,
                                             const float* log_sum_exp, long long rows, int cols,
                                             float* dlogits, float* dbias, float* workspace,
                                             cudaStream_t stream) {
  return LaunchBackward(dloss, logits, bias, labels, log_sum_exp, rows, cols, dlogits, dbias,
                        workspace, stream);
}
cudaError_t tfbert_softmax_xent_backward_f16(const float* dloss, const unsigned short* logits,
                                             const float* bias, const int* labels,
                                             const float* log_sum_exp, long long rows, int cols,
                                             unsigned short* dlogits, float* dbias,
                                             float* workspace, cudaStream_t stream) {
  return LaunchBackward(dloss, AsHalf(logits), bias, labels, log_sum_exp, rows, cols,
                        AsHalf(dlogits), dbias, workspace, stream);
}
cudaError_t tfbert_softmax_xent_backward_bf16(const float* dloss, const unsigned short* logits,
                                              const float* bias, const int* labels,
                                              const float* log_sum_exp, long long rows, int cols,
                                              unsigned short* dlogits, float* dbias,
                                              float* workspace, cudaStream_t stream) {
  return LaunchBackward(dloss, AsBf16(logits), bias, labels, log_sum_exp, rows, cols,
                        AsBf16(dlogits), dbias, workspace, stream);
}

}  // extern "C"
