// CUDA kernels of the fused LayerNorm, behind the C ABI of layer_norm_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = H. x, y, dy, dx: [rows, cols];
// gamma, beta, dgamma, dbeta: float32 [cols]; mean, rstd: float32 [rows].
//
// Forward and dx: one block per row (a grid-stride loop over rows), up to 256 threads striding
// over the columns, so any H works (no vector loads that would need H % 2, 4 or 8 == 0). Each
// row is read from global memory two or three times; after the first read it is in L1/L2.
// All arithmetic and all statistics are float32 whatever the storage type T: a float16
// variance overflows (x^2 > 65504 once |x| > 256) or underflows, and bfloat16 sums of hundreds
// of elements lose everything below the 8th bit.
//
// dgamma and dbeta: a partial-sum kernel (32 columns x one block of rows per CUDA block) then a
// kernel that adds the partials of each column in block order: no atomics, so the sums are
// bit-identical from run to run.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half_bits.cuh"
#include "layer_norm_launch.h"

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerRow = 256;
// Rows per grid of the row kernels; larger inputs loop (grid-stride), which keeps gridDim.x far
// below its limit.
constexpr long long kMaxRowBlocks = 1LL << 20;
// The partial-sum kernel's block: 32 columns (a warp reads 32 consecutive floats of a row) by
// kParamRowsPerPass rows.
constexpr int kParamRowsPerPass = 8;

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The sum of v over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ float BlockSum(float v) {
  __shared__ float warp_sums[kMaxThreadsPerRow / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = WarpSum(v);
  __syncthreads();  // the previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  return WarpSum(lane < warps ? warp_sums[lane] : 0.0f);
}

template <typename T>
__global__ void LayerNormForwardKernel(const T* __restrict__ x, const float* __restrict__ gamma,
                                       const float* __restrict__ beta, long long rows, int cols,
                                       float epsilon, T* __restrict__ y, float* __restrict__ mean,
                                       float* __restrict__ rstd) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x_row = x + row * cols;
    T* y_row = y + row * cols;
    // Mean of (x - x[0]) plus x[0]: keeps the low bits of rows with a large mean (x + 1000).
    const float shift = ToFloat(x_row[0]);
    float shifted_sum = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) shifted_sum += ToFloat(x_row[j]) - shift;
    const float row_mean = shift + BlockSum(shifted_sum) * inv_cols;
    // Centred second pass, not E[x^2] - mean^2, which cancels catastrophically in float32.
    float centred_squares = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      const float d = ToFloat(x_row[j]) - row_mean;
      centred_squares += d * d;
    }
    const float row_rstd = rsqrtf(BlockSum(centred_squares) * inv_cols + epsilon);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      y_row[j] = FromFloat<T>((ToFloat(x_row[j]) - row_mean) * row_rstd * gamma[j] + beta[j]);
    }
    if (threadIdx.x == 0) {
      mean[row] = row_mean;
      rstd[row] = row_rstd;
    }
  }
}

// dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)), xhat = (x - mean) * rstd, g = gamma * dy.
// g is rounded the same way in both passes (__fmul_rn is never contracted into an FMA). Were
// one pass to fuse gamma * dy into an FMA, a row of equal values (xhat = 0, rstd = 1/sqrt(eps),
// 1e6 with BERT's 1e-12) would get dx = rstd * (rounding error of g), about 1e-2, not 0.
template <typename T>
__global__ void LayerNormBackwardDxKernel(const T* __restrict__ dy, const T* __restrict__ x,
                                          const float* __restrict__ mean,
                                          const float* __restrict__ rstd,
                                          const float* __restrict__ gamma, long long rows,
                                          int cols, T* __restrict__ dx) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x_row = x + row * cols;
    const T* dy_row = dy + row * cols;
    const float row_mean = mean[row];
    const float row_rstd = rstd[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      const float xhat = (ToFloat(x_row[j]) - row_mean) * row_rstd;
      const float g = __fmul_rn(gamma[j], ToFloat(dy_row[j]));
      sum_g += g;
      sum_g_xhat += g * xhat;
    }
    const float mean_g = BlockSum(sum_g) * inv_cols;
    const float mean_g_xhat = BlockSum(sum_g_xhat) * inv_cols;
    T* dx_row = dx + row * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      const float xhat = (ToFloat(x_row[j]) - row_mean) * row_rstd;
      const float g = __fmul_rn(gamma[j], ToFloat(dy_row[j]));
      dx_row[j] = FromFloat<T>(row_rstd * (g - mean_g - xhat * mean_g_xhat));
    }
  }
}

// Block (32, kParamRowsPerPass), grid (ceil(cols / 32), row_blocks): block (bx, by) sums
// dy * xhat and dy over its rows for columns [32 bx, 32 bx + 32) into row `by` of the partials
// ([row_blocks, cols] each). The sums over threadIdx.y are added in a fixed order.
template <typename T>
__global__ void LayerNormParamGradPartialKernel(const T* __restrict__ dy,
                                                const T* __restrict__ x,
                                                const float* __restrict__ mean,
                                                const float* __restrict__ rstd, long long rows,
                                                int cols, float* __restrict__ partial_dgamma,
                                                float* __restrict__ partial_dbeta) {
  __shared__ float dgamma_sums[kParamRowsPerPass][kWarpSize + 1];  // +1: no bank conflicts
  __shared__ float dbeta_sums[kParamRowsPerPass][kWarpSize + 1];
  const int col = blockIdx.x * kWarpSize + threadIdx.x;
  const long long rows_per_block = (rows + gridDim.y - 1) / gridDim.y;
  const long long row_begin = blockIdx.y * rows_per_block;
  const long long row_end = min(rows, row_begin + rows_per_block);
  float dgamma_sum = 0.0f, dbeta_sum = 0.0f;
  if (col < cols) {
    for (long long row = row_begin + threadIdx.y; row < row_end; row += kParamRowsPerPass) {
      const float dy_value = ToFloat(dy[row * cols + col]);
      dgamma_sum += dy_value * (ToFloat(x[row * cols + col]) - mean[row]) * rstd[row];
      dbeta_sum += dy_value;
    }
  }
  dgamma_sums[threadIdx.y][threadIdx.x] = dgamma_sum;
  dbeta_sums[threadIdx.y][threadIdx.x] = dbeta_sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kParamRowsPerPass; ++i) {
      dgamma_sum += dgamma_sums[i][threadIdx.x];
      dbeta_sum += dbeta_sums[i][threadIdx.x];
    }
    partial_dgamma[blockIdx.y * static_cast<long long>(cols) + col] = dgamma_sum;
    partial_dbeta[blockIdx.y * static_cast<long long>(cols) + col] = dbeta_sum;
  }
}

// One thread per column adds the row blocks' partials in block order.
__global__ void LayerNormParamGradReduceKernel(const float* __restrict__ partial_dgamma,
                                               const float* __restrict__ partial_dbeta,
                                               int row_blocks, int cols,
                                               float* __restrict__ dgamma,
                                               float* __restrict__ dbeta) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float dgamma_sum = 0.0f, dbeta_sum = 0.0f;
  for (int b = 0; b < row_blocks; ++b) {
    dgamma_sum += partial_dgamma[static_cast<long long>(b) * cols + col];
    dbeta_sum += partial_dbeta[static_cast<long long>(b) * cols + col];
  }
  dgamma[col] = dgamma_sum;
  dbeta[col] = dbeta_sum;
}

// Threads per row: H rounded up to a warp, at most kMaxThreadsPerRow.
int ThreadsPerRow(int cols) {
  const int warps = (cols + kWarpSize - 1) / kWarpSize;
  const int threads = warps * kWarpSize;
  return threads < kMaxThreadsPerRow ? threads : kMaxThreadsPerRow;
}

unsigned int RowGrid(long long rows) {
  return static_cast<unsigned int>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks);
}

template <typename T>
cudaError_t LaunchForward(const T* x, const float* gamma, const float* beta, long long rows,
                          int cols, float epsilon, T* y, float* mean, float* rstd,
                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  LayerNormForwardKernel<T><<<RowGrid(rows), ThreadsPerRow(cols), 0, stream>>>(
      x, gamma, beta, rows, cols, epsilon, y, mean, rstd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchBackward(const T* dy, const T* x, const float* mean, const float* rstd,
                           const float* gamma, long long rows, int cols, T* dx, float* dgamma,
                           float* dbeta, float* workspace, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) {  // empty sums
    cudaError_t error = cudaMemsetAsync(dgamma, 0, sizeof(float) * cols, stream);
    if (error != cudaSuccess) return error;
    return cudaMemsetAsync(dbeta, 0, sizeof(float) * cols, stream);
  }
  LayerNormBackwardDxKernel<T><<<RowGrid(rows), ThreadsPerRow(cols), 0, stream>>>(
      dy, x, mean, rstd, gamma, rows, cols, dx);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  const int row_blocks = static_cast<int>(tfbert_layer_norm_grad_row_blocks(rows));
  float* partial_dgamma = workspace;
  float* partial_dbeta = workspace + static_cast<long long>(row_blocks) * cols;
  const dim3 partial_grid((cols + kWarpSize - 1) / kWarpSize, row_blocks);
  const dim3 partial_block(kWarpSize, kParamRowsPerPass);
  LayerNormParamGradPartialKernel<T><<<partial_grid, partial_block, 0, stream>>>(
      dy, x, mean, rstd, rows, cols, partial_dgamma, partial_dbeta);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  const int reduce_threads = 256;
  LayerNormParamGradReduceKernel<<<(cols + reduce_threads - 1) / reduce_threads, reduce_threads,
                                   0, stream>>>(partial_dgamma, partial_dbeta, row_blocks, cols,
                                                dgamma, dbeta);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t tfbert_layer_norm_forward_f32(const float* x, const float* gamma, const float* beta,
                                          long long rows, int cols, float epsilon, float* y,
                                          float* mean, float* rstd, cudaStream_t stream) {
  return LaunchForward(x, gamma, beta, rows, cols, epsilon, y, mean, rstd, stream);
}

cudaError_t tfbert_layer_norm_forward_f16(const unsigned short* x, const float* gamma,
                                          const float* beta, long long rows, int cols,
                                          float epsilon, unsigned short* y, float* mean,
                                          float* rstd, cudaStream_t stream) {
  return LaunchForward(AsHalf(x), gamma, beta, rows, cols, epsilon, AsHalf(y), mean, rstd,
                       stream);
}

cudaError_t tfbert_layer_norm_forward_bf16(const unsigned short* x, const float* gamma,
                                           const float* beta, long long rows, int cols,
                                           float epsilon, unsigned short* y, float* mean,
                                           float* rstd, cudaStream_t stream) {
  return LaunchForward(AsBf16(x), gamma, beta, rows, cols, epsilon, AsBf16(y), mean, rstd,
                       stream);
}

cudaError_t tfbert_layer_norm_backward_f32(const float* dy, const float* x, const float* mean,
                                           const float* rstd, const float* gamma, long long rows,
                                           int cols, float* dx, float* dgamma, float* dbeta,
                                           float* workspace, cudaStream_t stream) {
  return LaunchBackward(dy, x, mean, rstd, gamma, rows, cols, dx, dgamma, dbeta, workspace,
                        stream);
}

cudaError_t tfbert_layer_norm_backward_f16(const unsigned short* dy, const unsigned short* x,
                                           const float* mean, const float* rstd,
                                           const float* gamma, long long rows, int cols,
                                           unsigned short* dx, float* dgamma, float* dbeta,
                                           float* workspace, cudaStream_t stream) {
  return LaunchBackward(AsHalf(dy), AsHalf(x), mean, rstd, gamma, rows, cols, AsHalf(dx), dgamma,
                        dbeta, workspace, stream);
}

cudaError_t tfbert_layer_norm_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                            const float* mean, const float* rstd,
                                            const float* gamma, long long rows, int cols,
                                            unsigned short* dx, float* dgamma, float* dbeta,
                                            float* workspace, cudaStream_t stream) {
  return LaunchBackward(AsBf16(dy), AsBf16(x), mean, rstd, gamma, rows, cols, AsBf16(dx), dgamma,
                        dbeta, workspace, stream);
}

}  // extern "C"
