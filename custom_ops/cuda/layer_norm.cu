// CUDA kernels of the fused LayerNorm, behind the C ABI of layer_norm_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = H. x, y, dy, dx: [rows, cols];
// gamma, beta, dgamma, dbeta: float32 [cols]; mean, rstd: float32 [rows].
//
// Forward and dx, rows of up to 2048 elements whose width is a multiple of a 16-byte vector
// (8 16-bit or 4 float32 elements) in 16-byte aligned buffers: one warp per row, the row read
// once with 16-byte loads into the lanes' registers, the statistics reduced with shuffles
// (no shared memory, no barriers), several rows per block. Any other H: one block per row (a
// grid-stride loop over rows), up to 256 threads striding over the columns; each row is read
// from global memory two or three times (after the first read it is in L1/L2).
// All arithmetic and all statistics are float32 whatever the storage type T: a float16
// variance overflows (x^2 > 65504 once |x| > 256) or underflows, and bfloat16 sums of hundreds
// of elements lose everything below the 8th bit.
//
// dgamma and dbeta: a partial-sum kernel (32 columns x one block of rows per CUDA block; 64,
// two per thread, for an even H) then a kernel that adds the partials of each column in block
// order: no atomics, so the sums are bit-identical from run to run.

#include <initializer_list>

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

// ---- The warp-per-row kernels ----

// 16-byte vectors each lane holds: 64 elements, so a row of up to 32 * 64 = 2048 elements.
template <typename T>
constexpr int kLaneVectors = 64 / Vector16<T>::kSize;
constexpr int kWarpMaxCols = kWarpSize * 64;
constexpr int kRowsPerWarpBlock = 4;  // warps (rows) per block

// Loads lane `lane`'s vectors of one row (vectors lane, lane + 32, ...; `vectors` in the row).
template <typename T>
__device__ __forceinline__ void LoadRow(const T* row, int vectors, int lane,
                                        Vector16<T> (&values)[kLaneVectors<T>]) {
  const Vector16<T>* row_vectors = reinterpret_cast<const Vector16<T>*>(row);
#pragma unroll
  for (int i = 0; i < kLaneVectors<T>; ++i) {
    const int v = lane + i * kWarpSize;
    if (v < vectors) values[i] = row_vectors[v];
  }
}

// params[j .. j + kSize) (gamma or beta, float32) with 16-byte loads: j is a multiple of kSize
// (4 or 8) and params is 16-byte aligned (WarpPerRow), so every load is aligned.
template <int kSize>
__device__ __forceinline__ void LoadParams(const float* params, int j, float (&out)[kSize]) {
  const float4* vectors = reinterpret_cast<const float4*>(params + j);
#pragma unroll
  for (int q = 0; q < kSize / 4; ++q) {
    const float4 value = vectors[q];
    out[4 * q] = value.x;
    out[4 * q + 1] = value.y;
    out[4 * q + 2] = value.z;
    out[4 * q + 3] = value.w;
  }
}

// The block kernel's arithmetic (shifted mean, centred second pass, the same expression for y)
// with the row in registers.
template <typename T>
__global__ void LayerNormForwardWarpKernel(const T* __restrict__ x,
                                           const float* __restrict__ gamma,
                                           const float* __restrict__ beta, long long rows,
                                           int cols, float epsilon, T* __restrict__ y,
                                           float* __restrict__ mean, float* __restrict__ rstd) {
  constexpr int kSize = Vector16<T>::kSize;
  const int lane = threadIdx.x % kWarpSize;
  const int vectors = cols / kSize;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (long long row = static_cast<long long>(blockIdx.x) * kRowsPerWarpBlock +
                       threadIdx.x / kWarpSize;
       row < rows; row += static_cast<long long>(gridDim.x) * kRowsPerWarpBlock) {
    Vector16<T> values[kLaneVectors<T>];
    LoadRow(x + row * cols, vectors, lane, values);
    const float shift = ToFloat(x[row * cols]);
    float shifted_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneVectors<T>; ++i) {
      if (lane + i * kWarpSize < vectors) {
#pragma unroll
        for (int e = 0; e < kSize; ++e) shifted_sum += ToFloat(values[i].values[e]) - shift;
      }
    }
    const float row_mean = shift + WarpSum(shifted_sum) * inv_cols;
    float centred_squares = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneVectors<T>; ++i) {
      if (lane + i * kWarpSize < vectors) {
#pragma unroll
        for (int e = 0; e < kSize; ++e) {
          const float d = ToFloat(values[i].values[e]) - row_mean;
          centred_squares += d * d;
        }
      }
    }
    const float row_rstd = rsqrtf(WarpSum(centred_squares) * inv_cols + epsilon);
    Vector16<T>* y_row = reinterpret_cast<Vector16<T>*>(y + row * cols);
#pragma unroll
    for (int i = 0; i < kLaneVectors<T>; ++i) {
      const int v = lane + i * kWarpSize;
      if (v < vectors) {
        float gamma_values[kSize], beta_values[kSize];
        LoadParams(gamma, v * kSize, gamma_values);
        LoadParams(beta, v * kSize, beta_values);
        Vector16<T> out;
#pragma unroll
        for (int e = 0; e < kSize; ++e) {
          out.values[e] = FromFloat<T>((ToFloat(values[i].values[e]) - row_mean) * row_rstd *
                                       gamma_values[e] + beta_values[e]);
        }
        y_row[v] = out;
      }
    }
    if (lane == 0) {
      mean[row] = row_mean;
      rstd[row] = row_rstd;
    }
  }
}

// LayerNormBackwardDxKernel's arithmetic with dy and x in registers.
template <typename T>
__global__ void LayerNormBackwardDxWarpKernel(const T* __restrict__ dy, const T* __restrict__ x,
                                              const float* __restrict__ mean,
                                              const float* __restrict__ rstd,
                                              const float* __restrict__ gamma, long long rows,
                                              int cols, T* __restrict__ dx) {
  constexpr int kSize = Vector16<T>::kSize;
  const int lane = threadIdx.x % kWarpSize;
  const int vectors = cols / kSize;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (long long row = static_cast<long long>(blockIdx.x) * kRowsPerWarpBlock +
                       threadIdx.x / kWarpSize;
       row < rows; row += static_cast<long long>(gridDim.x) * kRowsPerWarpBlock) {
    Vector16<T> dy_values[kLaneVectors<T>], x_values[kLaneVectors<T>];
    LoadRow(dy + row * cols, vectors, lane, dy_values);
    LoadRow(x + row * cols, vectors, lane, x_values);
    const float row_mean = mean[row];
    const float row_rstd = rstd[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneVectors<T>; ++i) {
      const int v = lane + i * kWarpSize;
      if (v < vectors) {
        float gamma_values[kSize];
        LoadParams(gamma, v * kSize, gamma_values);
#pragma unroll
        for (int e = 0; e < kSize; ++e) {
          const float xhat = (ToFloat(x_values[i].values[e]) - row_mean) * row_rstd;
          const float g = __fmul_rn(gamma_values[e], ToFloat(dy_values[i].values[e]));
          sum_g += g;
          sum_g_xhat += g * xhat;
        }
      }
    }
    const float mean_g = WarpSum(sum_g) * inv_cols;
    const float mean_g_xhat = WarpSum(sum_g_xhat) * inv_cols;
    Vector16<T>* dx_row = reinterpret_cast<Vector16<T>*>(dx + row * cols);
#pragma unroll
    for (int i = 0; i < kLaneVectors<T>; ++i) {
      const int v = lane + i * kWarpSize;
      if (v < vectors) {
        float gamma_values[kSize];
        LoadParams(gamma, v * kSize, gamma_values);
        Vector16<T> out;
#pragma unroll
        for (int e = 0; e < kSize; ++e) {
          const float xhat = (ToFloat(x_values[i].values[e]) - row_mean) * row_rstd;
          const float g = __fmul_rn(gamma_values[e], ToFloat(dy_values[i].values[e]));
          out.values[e] = FromFloat<T>(row_rstd * (g - mean_g - xhat * mean_g_xhat));
        }
        dx_row[v] = out;
      }
    }
  }
}

// Whether rows of `cols` elements take the warp-per-row kernels: whole 16-byte vectors, at most
// kWarpMaxCols, every buffer the kernel reads or writes with vector loads 16-byte aligned.
template <typename T>
bool WarpPerRow(int cols, std::initializer_list<const void*> buffers) {
  if (cols % Vector16<T>::kSize != 0 || cols > kWarpMaxCols) return false;
  for (const void* buffer : buffers) {
    if (!IsAligned(buffer, 16)) return false;
  }
  return true;
}

unsigned int WarpRowGrid(long long rows) {
  const long long blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
  return static_cast<unsigned int>(blocks < kMaxRowBlocks ? blocks : kMaxRowBlocks);
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
  const RowSlice slice = BlockRowSlice(rows);
  float dgamma_sum = 0.0f, dbeta_sum = 0.0f;
  if (col < cols) {
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kParamRowsPerPass) {
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

// LayerNormParamGradPartialKernel with two adjacent columns per thread, for an even cols and
// buffers aligned to two elements: block (32, kParamRowsPerPass) owns 64 columns and a warp
// reads 64 consecutive elements of a row (128 bytes in 16 bits). The same arithmetic per
// element and the same order of the sums.
template <typename T>
__global__ void LayerNormParamGradPartialPairKernel(const T* __restrict__ dy,
                                                    const T* __restrict__ x,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd,
                                                    long long rows, int cols,
                                                    float* __restrict__ partial_dgamma,
                                                    float* __restrict__ partial_dbeta) {
  __shared__ float dgamma_sums[kParamRowsPerPass][2 * kWarpSize + 1];
  __shared__ float dbeta_sums[kParamRowsPerPass][2 * kWarpSize + 1];
  const int pair = blockIdx.x * kWarpSize + threadIdx.x;  // columns 2 pair and 2 pair + 1
  const int col = 2 * pair;
  const long long half_cols = cols / 2;
  const RowSlice slice = BlockRowSlice(rows);
  const Pair<T>* dy_pairs = reinterpret_cast<const Pair<T>*>(dy);
  const Pair<T>* x_pairs = reinterpret_cast<const Pair<T>*>(x);
  float dgamma0 = 0.0f, dgamma1 = 0.0f, dbeta0 = 0.0f, dbeta1 = 0.0f;
  if (col < cols) {
    for (long long row = slice.begin + threadIdx.y; row < slice.end; row += kParamRowsPerPass) {
      const long long p = row * half_cols + pair;
      const Pair<T> dy_pair = dy_pairs[p], x_pair = x_pairs[p];
      const float dy0 = ToFloat(dy_pair.first), dy1 = ToFloat(dy_pair.second);
      dgamma0 += dy0 * (ToFloat(x_pair.first) - mean[row]) * rstd[row];
      dgamma1 += dy1 * (ToFloat(x_pair.second) - mean[row]) * rstd[row];
      dbeta0 += dy0;
      dbeta1 += dy1;
    }
  }
  const int c = 2 * threadIdx.x;
  dgamma_sums[threadIdx.y][c] = dgamma0;
  dgamma_sums[threadIdx.y][c + 1] = dgamma1;
  dbeta_sums[threadIdx.y][c] = dbeta0;
  dbeta_sums[threadIdx.y][c + 1] = dbeta1;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kParamRowsPerPass; ++i) {
      dgamma0 += dgamma_sums[i][c];
      dgamma1 += dgamma_sums[i][c + 1];
      dbeta0 += dbeta_sums[i][c];
      dbeta1 += dbeta_sums[i][c + 1];
    }
    const long long base = blockIdx.y * static_cast<long long>(cols) + col;
    partial_dgamma[base] = dgamma0;
    partial_dgamma[base + 1] = dgamma1;
    partial_dbeta[base] = dbeta0;
    partial_dbeta[base + 1] = dbeta1;
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
  if (WarpPerRow<T>(cols, {x, y, gamma, beta})) {
    LayerNormForwardWarpKernel<T><<<WarpRowGrid(rows), kRowsPerWarpBlock * kWarpSize, 0,
                                    stream>>>(x, gamma, beta, rows, cols, epsilon, y, mean,
                                              rstd);
  } else {
    LayerNormForwardKernel<T><<<RowGrid(rows), ThreadsPerRow(cols), 0, stream>>>(
        x, gamma, beta, rows, cols, epsilon, y, mean, rstd);
  }
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
  if (WarpPerRow<T>(cols, {dy, x, dx, gamma})) {
    LayerNormBackwardDxWarpKernel<T><<<WarpRowGrid(rows), kRowsPerWarpBlock * kWarpSize, 0,
                                       stream>>>(dy, x, mean, rstd, gamma, rows, cols, dx);
  } else {
    LayerNormBackwardDxKernel<T><<<RowGrid(rows), ThreadsPerRow(cols), 0, stream>>>(
        dy, x, mean, rstd, gamma, rows, cols, dx);
  }
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  const int row_blocks = static_cast<int>(tfbert_layer_norm_grad_row_blocks(rows));
  float* partial_dgamma = workspace;
  float* partial_dbeta = workspace + static_cast<long long>(row_blocks) * cols;
  const dim3 partial_block(kWarpSize, kParamRowsPerPass);
  if (cols % 2 == 0 && IsAligned(dy, sizeof(Pair<T>)) && IsAligned(x, sizeof(Pair<T>))) {
    const dim3 partial_grid((cols / 2 + kWarpSize - 1) / kWarpSize, row_blocks);
    LayerNormParamGradPartialPairKernel<T><<<partial_grid, partial_block, 0, stream>>>(
        dy, x, mean, rstd, rows, cols, partial_dgamma, partial_dbeta);
  } else {
    const dim3 partial_grid((cols + kWarpSize - 1) / kWarpSize, row_blocks);
    LayerNormParamGradPartialKernel<T><<<partial_grid, partial_block, 0, stream>>>(
        dy, x, mean, rstd, rows, cols, partial_dgamma, partial_dbeta);
  }
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
