// CUDA kernels of the fused bias + GELU and bias + GeGLU, behind the C ABI of gelu_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = x's last dimension (N for GELU,
// 2M for GeGLU, whose y and dy are [rows, M] = [rows, half_cols]).
//
// Forward: elementwise grid-stride loops over the outputs, float32 arithmetic whatever the
// storage type T, no vector loads (any N works, no alignment needed).
//
// Backward: dx and the dbias partial sums come from one pass over dy and x. Block (32, 8) of
// grid (ceil(cols / 32), row_blocks) owns 32 columns of one block of rows: each thread writes
// dx for its column on every 8th row of the block (a warp touches 32 consecutive elements of a
// row) and adds the float32 gradients; the 8 threads of a column are then summed in a fixed
// order into the block's partial. A second kernel adds the row blocks' partials of each column
// in block order. No atomics: dbias is bit-identical from run to run. GELU with an even N
// takes two adjacent columns per thread (BiasGeluBackwardPairKernel: the same sums).
// x + bias is recomputed here rather than saved by the forward pass.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half_bits.cuh"
#include "gelu_launch.h"

namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
// Blocks of the elementwise grids; larger inputs loop (grid-stride). Enough to fill any
// current GPU several times over.
constexpr long long kMaxElementwiseBlocks = 1LL << 15;
// The backward block: 32 columns by kGradRowsPerPass rows.
constexpr int kGradRowsPerPass = 8;

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;

// The same formulas as the CPU kernels (cc/kernels/gelu.h). Exact: gelu(u) = 0.5 u erfc(-u/√2)
// (erfc, not 1 + erf, which cancels for u << 0); gelu'(u) = Phi(u) + u phi(u).
// Approximate: 0.5 u (1 + tanh(k (u + c u^3))); gelu' = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3c u^2).
__device__ __forceinline__ float Gelu(float u, bool approximate) {
  if (approximate) {
    const float t = tanhf(kSqrt2OverPi * (u + kTanhCubic * u * u * u));
    return 0.5f * u * (1.0f + t);
  }
  return 0.5f * u * erfcf(-u * kSqrtHalf);
}

__device__ __forceinline__ float GeluAndDerivative(float u, bool approximate,
                                                   float* derivative) {
  if (approximate) {
    const float u2 = u * u;
    const float t = tanhf(kSqrt2OverPi * (u + kTanhCubic * u2 * u));
    *derivative = 0.5f * (1.0f + t) +
                  0.5f * u * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * u2);
    return 0.5f * u * (1.0f + t);
  }
  const float cdf = 0.5f * erfcf(-u * kSqrtHalf);
  *derivative = cdf + u * kInvSqrt2Pi * expf(-0.5f * u * u);
  return u * cdf;
}

// y[i] = gelu(x[i] + bias[i % cols]) over the rows * cols elements.
template <typename T>
__global__ void BiasGeluForwardKernel(const T* __restrict__ x, const T* __restrict__ bias,
                                      long long size, int cols, bool approximate,
                                      T* __restrict__ y) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % cols);
    y[i] = FromFloat<T>(Gelu(ToFloat(x[i]) + ToFloat(bias[col]), approximate));
  }
}

// y[i] = gelu(x[i] + bias[i % cols]) and derivative[i] = gelu'(the same), for the backward pass
// from the saved derivative.
template <typename T>
__global__ void BiasGeluSaveForwardKernel(const T* __restrict__ x, const T* __restrict__ bias,
                                          long long size, int cols, bool approximate,
                                          T* __restrict__ y, T* __restrict__ derivative) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % cols);
    float d;
    y[i] = FromFloat<T>(GeluAndDerivative(ToFloat(x[i]) + ToFloat(bias[col]), approximate, &d));
    derivative[i] = FromFloat<T>(d);
  }
}

// y[r, j] = gelu(x[r, j] + bias[j]) * (x[r, M + j] + bias[M + j]) over the rows * M outputs.
template <typename T>
__global__ void BiasGegluForwardKernel(const T* __restrict__ x, const T* __restrict__ bias,
                                       long long size, int half_cols, bool approximate,
                                       T* __restrict__ y) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / half_cols;
    const int j = static_cast<int>(i - row * half_cols);
    const T* x_row = x + row * 2 * half_cols;
    const float g = ToFloat(x_row[j]) + ToFloat(bias[j]);
    const float v = ToFloat(x_row[half_cols + j]) + ToFloat(bias[half_cols + j]);
    y[i] = FromFloat<T>(Gelu(g, approximate) * v);
  }
}

// The gradient of x[row, col] (as float32) given dy; kGated selects GeGLU (cols = 2 * half);
// kSaved reads the forward's saved derivative in place of x (and no bias): dy * derivative.
template <typename T, bool kGated, bool kSaved = false>
__device__ __forceinline__ float InputGrad(const T* __restrict__ dy, const T* __restrict__ x,
                                           const T* __restrict__ bias, long long row, int col,
                                           int cols, bool approximate) {
  if constexpr (kSaved) {
    const long long i = row * cols + col;
    return ToFloat(dy[i]) * ToFloat(x[i]);
  }
  float derivative;
  if (!kGated) {
    const long long i = row * cols + col;
    GeluAndDerivative(ToFloat(x[i]) + ToFloat(bias[col]), approximate, &derivative);
    return ToFloat(dy[i]) * derivative;
  }
  const int half_cols = cols / 2;
  const int j = col < half_cols ? col : col - half_cols;  // the column within each half
  const T* x_row = x + row * cols;
  const float g = ToFloat(x_row[j]) + ToFloat(bias[j]);
  const float dy_j = ToFloat(dy[row * half_cols + j]);
  const float gelu_g = GeluAndDerivative(g, approximate, &derivative);
  if (col < half_cols) {  // d/dgate: dy * value * gelu'(gate)
    const float v = ToFloat(x_row[half_cols + j]) + ToFloat(bias[half_cols + j]);
    return dy_j * v * derivative;
  }
  return dy_j * gelu_g;  // d/dvalue: dy * gelu(gate)
}

// Block (32, kGradRowsPerPass), grid (ceil(cols / 32), row_blocks): block (bx, by) writes dx
// for columns [32 bx, 32 bx + 32) of its rows and their column sums into row `by` of
// partial ([row_blocks, cols]).
template <typename T, bool kGated, bool kSaved = false>
__global__ void BiasGeluBackwardKernel(const T* __restrict__ dy, const T* __restrict__ x,
                                       const T* __restrict__ bias, long long rows, int cols,
                                       bool approximate, T* __restrict__ dx,
                                       float* __restrict__ partial) {
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  const RowSlice slice = BlockRowSlice(rows);
  float sum = 0.0f;
  if (col < cols) {
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kGradRowsPerPass) {
      const float grad = InputGrad<T, kGated, kSaved>(dy, x, bias, row, col, cols, approximate);
      dx[row * cols + col] = FromFloat<T>(grad);
      sum += grad;  // dbias from the float32 gradient, not the rounded dx
    }
  }
  StoreBlockColumnSum<kGradRowsPerPass>(sum, col, cols, partial);
}

// BiasGeluBackwardKernel (GELU) with two adjacent columns per thread, for an even cols and
// buffers aligned to two elements: block (32, kGradRowsPerPass) owns 64 columns, and a warp
// reads 64 consecutive elements of a row (128 bytes in 16 bits) in one load per thread. The
// same arithmetic per element and the same order of the column sums as the kernel above.
template <typename T, bool kSaved = false>
__global__ void BiasGeluBackwardPairKernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const T* __restrict__ bias, long long rows, int cols,
                                           bool approximate, T* __restrict__ dx,
                                           float* __restrict__ partial) {
  __shared__ float sums[kGradRowsPerPass][2 * kWarpSize + 1];
  const int pair = blockIdx.x * kWarpSize + threadIdx.x;  // columns 2 pair and 2 pair + 1
  const int col = 2 * pair;
  const long long half_cols = cols / 2;
  const RowSlice slice = BlockRowSlice(rows);
  const Pair<T>* dy_pairs = reinterpret_cast<const Pair<T>*>(dy);
  const Pair<T>* x_pairs = reinterpret_cast<const Pair<T>*>(x);
  Pair<T>* dx_pairs = reinterpret_cast<Pair<T>*>(dx);
  float sum0 = 0.0f, sum1 = 0.0f;
  if (col < cols) {
    float bias0 = 0.0f, bias1 = 0.0f;
    if constexpr (!kSaved) {
      const Pair<T> b = reinterpret_cast<const Pair<T>*>(bias)[pair];
      bias0 = ToFloat(b.first);
      bias1 = ToFloat(b.second);
    }
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kGradRowsPerPass) {
      const long long p = row * half_cols + pair;
      const Pair<T> dy_pair = dy_pairs[p], x_pair = x_pairs[p];
      float derivative0, derivative1;
      if constexpr (kSaved) {  // x holds the forward's saved derivative
        derivative0 = ToFloat(x_pair.first);
        derivative1 = ToFloat(x_pair.second);
      } else {
        GeluAndDerivative(ToFloat(x_pair.first) + bias0, approximate, &derivative0);
        GeluAndDerivative(ToFloat(x_pair.second) + bias1, approximate, &derivative1);
      }
      const float grad0 = ToFloat(dy_pair.first) * derivative0;
      const float grad1 = ToFloat(dy_pair.second) * derivative1;
      Pair<T> out;
      out.first = FromFloat<T>(grad0);
      out.second = FromFloat<T>(grad1);
      dx_pairs[p] = out;
      sum0 += grad0;  // dbias from the float32 gradient, not the rounded dx
      sum1 += grad1;
    }
  }
  sums[threadIdx.y][2 * threadIdx.x] = sum0;
  sums[threadIdx.y][2 * threadIdx.x + 1] = sum1;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kGradRowsPerPass; ++i) {
      sum0 += sums[i][2 * threadIdx.x];
      sum1 += sums[i][2 * threadIdx.x + 1];
    }
    partial[blockIdx.y * static_cast<long long>(cols) + col] = sum0;
    partial[blockIdx.y * static_cast<long long>(cols) + col + 1] = sum1;
  }
}

unsigned int ElementwiseGrid(long long size) {
  const long long blocks = (size + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxElementwiseBlocks ? blocks
                                                                  : kMaxElementwiseBlocks);
}

template <typename T>
cudaError_t LaunchGeluForward(const T* x, const T* bias, long long rows, int cols,
                              int approximate, T* y, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const long long size = rows * cols;
  BiasGeluForwardKernel<T><<<ElementwiseGrid(size), kThreads, 0, stream>>>(
      x, bias, size, cols, approximate != 0, y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchGegluForward(const T* x, const T* bias, long long rows, int half_cols,
                               int approximate, T* y, cudaStream_t stream) {
  if (rows <= 0 || half_cols <= 0) return cudaSuccess;
  const long long size = rows * half_cols;
  BiasGegluForwardKernel<T><<<ElementwiseGrid(size), kThreads, 0, stream>>>(
      x, bias, size, half_cols, approximate != 0, y);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchGeluSaveForward(const T* x, const T* bias, long long rows, int cols,
                                  int approximate, T* y, T* derivative, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const long long size = rows * cols;
  BiasGeluSaveForwardKernel<T><<<ElementwiseGrid(size), kThreads, 0, stream>>>(
      x, bias, size, cols, approximate != 0, y, derivative);
  return cudaGetLastError();
}

// cols = x's last dimension (2 * half_cols for GeGLU). kSaved: x is the saved derivative
// (GELU only; bias is not read).
template <typename T, bool kGated, bool kSaved = false>
cudaError_t LaunchBackward(const T* dy, const T* x, const T* bias, long long rows, int cols,
                           int approximate, T* dx, T* dbias, float* workspace,
                           cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) return cudaMemsetAsync(dbias, 0, sizeof(T) * cols, stream);  // empty sums
  const int row_blocks = static_cast<int>(tfbert_bias_gelu_grad_row_blocks(rows));
  const dim3 block(kWarpSize, kGradRowsPerPass);
  const size_t pair_bytes = sizeof(Pair<T>);
  if (!kGated && cols % 2 == 0 && IsAligned(dy, pair_bytes) && IsAligned(x, pair_bytes) &&
      (kSaved || IsAligned(bias, pair_bytes)) && IsAligned(dx, pair_bytes)) {
    const dim3 grid((cols / 2 + kWarpSize - 1) / kWarpSize, row_blocks);
    BiasGeluBackwardPairKernel<T, kSaved><<<grid, block, 0, stream>>>(
        dy, x, bias, rows, cols, approximate != 0, dx, workspace);
  } else {
    const dim3 grid((cols + kWarpSize - 1) / kWarpSize, row_blocks);
    BiasGeluBackwardKernel<T, kGated, kSaved><<<grid, block, 0, stream>>>(
        dy, x, bias, rows, cols, approximate != 0, dx, workspace);
  }
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  SumRowBlockPartialsKernel<T><<<(cols + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      workspace, row_blocks, cols, dbias);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t tfbert_bias_gelu_forward_f32(const float* x, const float* bias, long long rows,
                                         int cols, int approximate, float* y,
                                         cudaStream_t stream) {
  return LaunchGeluForward(x, bias, rows, cols, approximate, y, stream);
}
cudaError_t tfbert_bias_gelu_forward_f16(const unsigned short* x, const unsigned short* bias,
                                         long long rows, int cols, int approximate,
                                         unsigned short* y, cudaStream_t stream) {
  return LaunchGeluForward(AsHalf(x), AsHalf(bias), rows, cols, approximate, AsHalf(y), stream);
}
cudaError_t tfbert_bias_gelu_forward_bf16(const unsigned short* x, const unsigned short* bias,
                                          long long rows, int cols, int approximate,
                                          unsigned short* y, cudaStream_t stream) {
  return LaunchGeluForward(AsBf16(x), AsBf16(bias), rows, cols, approximate, AsBf16(y), stream);
}

cudaError_t tfbert_bias_gelu_backward_f32(const float* dy, const float* x, const float* bias,
                                          long long rows, int cols, int approximate, float* dx,
                                          float* dbias, float* workspace, cudaStream_t stream) {
  return LaunchBackward<float, false>(dy, x, bias, rows, cols, approximate, dx, dbias,
                                      workspace, stream);
}
cudaError_t tfbert_bias_gelu_backward_f16(const unsigned short* dy, const unsigned short* x,
                                          const unsigned short* bias, long long rows, int cols,
                                          int approximate, unsigned short* dx,
                                          unsigned short* dbias, float* workspace,
                                          cudaStream_t stream) {
  return LaunchBackward<__half, false>(AsHalf(dy), AsHalf(x), AsHalf(bias), rows, cols,
                                       approximate, AsHalf(dx), AsHalf(dbias), workspace, stream);
}
cudaError_t tfbert_bias_gelu_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                           const unsigned short* bias, long long rows, int cols,
                                           int approximate, unsigned short* dx,
                                           unsigned short* dbias, float* workspace,
                                           cudaStream_t stream) {
  return LaunchBackward<__nv_bfloat16, false>(AsBf16(dy), AsBf16(x), AsBf16(bias), rows, cols,
                                              approximate, AsBf16(dx), AsBf16(dbias), workspace,
                                              stream);
}

cudaError_t tfbert_bias_gelu_forward_save_f32(const float* x, const float* bias, long long rows,
                                              int cols, int approximate, float* y,
                                              float* derivative, cudaStream_t stream) {
  return LaunchGeluSaveForward(x, bias, rows, cols, approximate, y, derivative, stream);
}
cudaError_t tfbert_bias_gelu_forward_save_f16(const unsigned short* x, const unsigned short* bias,
                                              long long rows, int cols, int approximate,
                                              unsigned short* y, unsigned short* derivative,
                                              cudaStream_t stream) {
  return LaunchGeluSaveForward(AsHalf(x), AsHalf(bias), rows, cols, approximate, AsHalf(y),
                               AsHalf(derivative), stream);
}
cudaError_t tfbert_bias_gelu_forward_save_bf16(const unsigned short* x,
                                               const unsigned short* bias, long long rows,
                                               int cols, int approximate, unsigned short* y,
                                               unsigned short* derivative,
                                               cudaStream_t stream) {
  return LaunchGeluSaveForward(AsBf16(x), AsBf16(bias), rows, cols, approximate, AsBf16(y),
                               AsBf16(derivative), stream);
}

cudaError_t tfbert_bias_gelu_backward_saved_f32(const float* dy, const float* derivative,
                                                long long rows, int cols, float* dx,
                                                float* dbias, float* workspace,
                                                cudaStream_t stream) {
  return LaunchBackward<float, false, true>(dy, derivative, nullptr, rows, cols, 0, dx, dbias,
                                            workspace, stream);
}
cudaError_t tfbert_bias_gelu_backward_saved_f16(const unsigned short* dy,
                                                const unsigned short* derivative, long long rows,
                                                int cols, unsigned short* dx,
                                                unsigned short* dbias, float* workspace,
                                                cudaStream_t stream) {
  return LaunchBackward<__half, false, true>(AsHalf(dy), AsHalf(derivative), nullptr, rows, cols,
                                             0, AsHalf(dx), AsHalf(dbias), workspace, stream);
}
cudaError_t tfbert_bias_gelu_backward_saved_bf16(const unsigned short* dy,
                                                 const unsigned short* derivative,
                                                 long long rows, int cols, unsigned short* dx,
                                                 unsigned short* dbias, float* workspace,
                                                 cudaStream_t stream) {
  return LaunchBackward<__nv_bfloat16, false, true>(AsBf16(dy), AsBf16(derivative), nullptr,
                                                    rows, cols, 0, AsBf16(dx), AsBf16(dbias),
                                                    workspace, stream);
}

cudaError_t tfbert_bias_geglu_forward_f32(const float* x, const float* bias, long long rows,
                                          int half_cols, int approximate, float* y,
                                          cudaStream_t stream) {
  return LaunchGegluForward(x, bias, rows, half_cols, approximate, y, stream);
}
cudaError_t tfbert_bias_geglu_forward_f16(const unsigned short* x, const unsigned short* bias,
                                          long long rows, int half_cols, int approximate,
                                          unsigned short* y, cudaStream_t stream) {
  return LaunchGegluForward(AsHalf(x), AsHalf(bias), rows, half_cols, approximate, AsHalf(y),
                            stream);
}
cudaError_t tfbert_bias_geglu_forward_bf16(const unsigned short* x, const unsigned short* bias,
                                           long long rows, int half_cols, int approximate,
                                           unsigned short* y, cudaStream_t stream) {
  return LaunchGegluForward(AsBf16(x), AsBf16(bias), rows, half_cols, approximate, AsBf16(y),
                            stream);
}

cudaError_t tfbert_bias_geglu_backward_f32(const float* dy, const float* x, const float* bias,
                                           long long rows, int half_cols, int approximate,
                                           float* dx, float* dbias, float* workspace,
                                           cudaStream_t stream) {
  return LaunchBackward<float, true>(dy, x, bias, rows, 2 * half_cols, approximate, dx, dbias,
                                     workspace, stream);
}
cudaError_t tfbert_bias_geglu_backward_f16(const unsigned short* dy, const unsigned short* x,
                                           const unsigned short* bias, long long rows,
                                           int half_cols, int approximate, unsigned short* dx,
                                           unsigned short* dbias, float* workspace,
                                           cudaStream_t stream) {
  return LaunchBackward<__half, true>(AsHalf(dy), AsHalf(x), AsHalf(bias), rows, 2 * half_cols,
                                      approximate, AsHalf(dx), AsHalf(dbias), workspace, stream);
}
cudaError_t tfbert_bias_geglu_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                            const unsigned short* bias, long long rows,
                                            int half_cols, int approximate, unsigned short* dx,
                                            unsigned short* dbias, float* workspace,
                                            cudaStream_t stream) {
  return LaunchBackward<__nv_bfloat16, true>(AsBf16(dy), AsBf16(x), AsBf16(bias), rows,
                                             2 * half_cols, approximate, AsBf16(dx),
                                             AsBf16(dbias), workspace, stream);
}

}  // extern "C"
