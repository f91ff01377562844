// C ABI of the fused LayerNorm CUDA kernels (layer_norm.cu): raw device pointers, sizes and a
// stream, so nvcc never sees TensorFlow's headers and the kernels can be driven on their own.
//
// Shapes: x, y, dy, dx are [rows, cols] row-major; gamma, beta, dgamma, dbeta are float32
// [cols]; mean and rstd are float32 [rows]. The 16-bit variants take the raw bits of IEEE
// binary16 (f16) or bfloat16 (bf16) values as unsigned short, which is how Eigen::half /
// Eigen::bfloat16 and __half / __nv_bfloat16 are laid out. Each function only enqueues work on
// `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_LAYER_NORM_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_LAYER_NORM_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// dgamma/dbeta are reduced in two deterministic steps: each of `row_blocks` blocks of rows
// writes its partial sums, then one kernel adds the partials in block order. The caller
// provides the float32 workspace for the partials (tfbert_layer_norm_grad_workspace_floats).
static inline long long tfbert_layer_norm_grad_row_blocks(long long rows) {
  // About 64 rows per block, at most 512 blocks (the grid's y dimension, and a bounded
  // workspace: 512 * 2 * H floats = 4 MiB for H = 1024).
  long long blocks = (rows + 63) / 64;
  if (blocks > 512) blocks = 512;
  if (blocks < 1) blocks = 1;
  return blocks;
}

static inline long long tfbert_layer_norm_grad_workspace_floats(long long rows, long long cols) {
  return 2 * tfbert_layer_norm_grad_row_blocks(rows) * cols;
}

cudaError_t tfbert_layer_norm_forward_f32(const float* x, const float* gamma, const float* beta,
                                          long long rows, int cols, float epsilon, float* y,
                                          float* mean, float* rstd, cudaStream_t stream);
cudaError_t tfbert_layer_norm_forward_f16(const unsigned short* x, const float* gamma,
                                          const float* beta, long long rows, int cols,
                                          float epsilon, unsigned short* y, float* mean,
                                          float* rstd, cudaStream_t stream);
cudaError_t tfbert_layer_norm_forward_bf16(const unsigned short* x, const float* gamma,
                                           const float* beta, long long rows, int cols,
                                           float epsilon, unsigned short* y, float* mean,
                                           float* rstd, cudaStream_t stream);

// workspace: tfbert_layer_norm_grad_workspace_floats(rows, cols) float32 values.
cudaError_t tfbert_layer_norm_backward_f32(const float* dy, const float* x, const float* mean,
                                           const float* rstd, const float* gamma, long long rows,
                                           int cols, float* dx, float* dgamma, float* dbeta,
                                           float* workspace, cudaStream_t stream);
cudaError_t tfbert_layer_norm_backward_f16(const unsigned short* dy, const unsigned short* x,
                                           const float* mean, const float* rstd,
                                           const float* gamma, long long rows, int cols,
                                           unsigned short* dx, float* dgamma, float* dbeta,
                                           float* workspace, cudaStream_t stream);
cudaError_t tfbert_layer_norm_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                            const float* mean, const float* rstd,
                                            const float* gamma, long long rows, int cols,
                                            unsigned short* dx, float* dgamma, float* dbeta,
                                            float* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_LAYER_NORM_LAUNCH_H_
