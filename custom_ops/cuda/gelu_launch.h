// C ABI of the fused bias + GELU / GeGLU CUDA kernels (gelu.cu): raw device pointers, sizes and
// a stream, so nvcc never sees TensorFlow's headers and the kernels can be driven on their own.
//
// Shapes (row-major):
//   GELU:  x, y, dy, dx: [rows, cols]; bias, dbias: [cols].
//   GeGLU: x, dx: [rows, 2 * half_cols] = [gate | value]; y, dy: [rows, half_cols];
//          bias, dbias: [2 * half_cols].
// Every tensor has the element type of the suffix: float (f32), or the raw bits of IEEE
// binary16 (f16) or bfloat16 (bf16) values as unsigned short, which is how Eigen::half /
// Eigen::bfloat16 and __half / __nv_bfloat16 are laid out. `approximate` != 0 selects the tanh
// GELU. The arithmetic is float32. Each function only enqueues work on `stream` and returns
// the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_GELU_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_GELU_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// dbias is reduced in two deterministic steps: each of `row_blocks` blocks of rows writes its
// float32 partial sums, then one kernel adds the partials in block order (no atomics). The
// caller provides the float32 workspace for the partials: row_blocks * cols floats, where cols
// is x's last dimension (2 * half_cols for GeGLU).
static inline long long tfbert_bias_gelu_grad_row_blocks(long long rows) {
  // About 64 rows per block, at most 512 blocks (the grid's y dimension, and a bounded
  // workspace: 512 * 4096 floats = 8 MiB for BERT-large's intermediate size).
  long long blocks = (rows + 63) / 64;
  if (blocks > 512) blocks = 512;
  if (blocks < 1) blocks = 1;
  return blocks;
}

static inline long long tfbert_bias_gelu_grad_workspace_floats(long long rows, long long cols) {
  return tfbert_bias_gelu_grad_row_blocks(rows) * cols;
}

cudaError_t tfbert_bias_gelu_forward_f32(const float* x, const float* bias, long long rows,
                                         int cols, int approximate, float* y,
                                         cudaStream_t stream);
cudaError_t tfbert_bias_gelu_forward_f16(const unsigned short* x, const unsigned short* bias,
                                         long long rows, int cols, int approximate,
                                         unsigned short* y, cudaStream_t stream);
cudaError_t tfbert_bias_gelu_forward_bf16(const unsigned short* x, const unsigned short* bias,
                                          long long rows, int cols, int approximate,
                                          unsigned short* y, cudaStream_t stream);

// workspace: tfbert_bias_gelu_grad_workspace_floats(rows, cols) float32 values.
cudaError_t tfbert_bias_gelu_backward_f32(const float* dy, const float* x, const float* bias,
                                          long long rows, int cols, int approximate, float* dx,
                                          float* dbias, float* workspace, cudaStream_t stream);
cudaError_t tfbert_bias_gelu_backward_f16(const unsigned short* dy, const unsigned short* x,
                                          const unsigned short* bias, long long rows, int cols,
                                          int approximate, unsigned short* dx,
                                          unsigned short* dbias, float* workspace,
                                          cudaStream_t stream);
cudaError_t tfbert_bias_gelu_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                           const unsigned short* bias, long long rows, int cols,
                                           int approximate, unsigned short* dx,
                                           unsigned short* dbias, float* workspace,
                                           cudaStream_t stream);

// --gelu_save_derivative: the forward also writes derivative = gelu'(x + bias) ([rows, cols]),
// and the backward reads it in place of x and bias: dx = dy * derivative, dbias its column sum
// (the same two-step reduction and workspace as tfbert_bias_gelu_backward_*).
cudaError_t tfbert_bias_gelu_forward_save_f32(const float* x, const float* bias, long long rows,
                                              int cols, int approximate, float* y,
                                              float* derivative, cudaStream_t stream);
cudaError_t tfbert_bias_gelu_forward_save_f16(const unsigned short* x, const unsigned short* bias,
                                              long long rows, int cols, int approximate,
                                              unsigned short* y, unsigned short* derivative,
                                              cudaStream_t stream);
cudaError_t tfbert_bias_gelu_forward_save_bf16(const unsigned short* x,
                                               const unsigned short* bias, long long rows,
                                               int cols, int approximate, unsigned short* y,
                                               unsigned short* derivative,
                                               cudaStream_t stream);

// workspace: tfbert_bias_gelu_grad_workspace_floats(rows, cols) float32 values.
cudaError_t tfbert_bias_gelu_backward_saved_f32(const float* dy, const float* derivative,
                                                long long rows, int cols, float* dx,
                                                float* dbias, float* workspace,
                                                cudaStream_t stream);
cudaError_t tfbert_bias_gelu_backward_saved_f16(const unsigned short* dy,
                                                const unsigned short* derivative, long long rows,
                                                int cols, unsigned short* dx,
                                                unsigned short* dbias, float* workspace,
                                                cudaStream_t stream);
cudaError_t tfbert_bias_gelu_backward_saved_bf16(const unsigned short* dy,
                                                 const unsigned short* derivative,
                                                 long long rows, int cols, unsigned short* dx,
                                                 unsigned short* dbias, float* workspace,
                                                 cudaStream_t stream);

// 2 * half_cols must fit in an int.
cudaError_t tfbert_bias_geglu_forward_f32(const float* x, const float* bias, long long rows,
                                          int half_cols, int approximate, float* y,
                                          cudaStream_t stream);
cudaError_t tfbert_bias_geglu_forward_f16(const unsigned short* x, const unsigned short* bias,
                                          long long rows, int half_cols, int approximate,
                                          unsigned short* y, cudaStream_t stream);
cudaError_t tfbert_bias_geglu_forward_bf16(const unsigned short* x, const unsigned short* bias,
                                           long long rows, int half_cols, int approximate,
                                           unsigned short* y, cudaStream_t stream);

// workspace: tfbert_bias_gelu_grad_workspace_floats(rows, 2 * half_cols) float32 values.
cudaError_t tfbert_bias_geglu_backward_f32(const float* dy, const float* x, const float* bias,
                                           long long rows, int half_cols, int approximate,
                                           float* dx, float* dbias, float* workspace,
                                           cudaStream_t stream);
cudaError_t tfbert_bias_geglu_backward_f16(const unsigned short* dy, const unsigned short* x,
                                           const unsigned short* bias, long long rows,
                                           int half_cols, int approximate, unsigned short* dx,
                                           unsigned short* dbias, float* workspace,
                                           cudaStream_t stream);
cudaError_t tfbert_bias_geglu_backward_bf16(const unsigned short* dy, const unsigned short* x,
                                            const unsigned short* bias, long long rows,
                                            int half_cols, int approximate, unsigned short* dx,
                                            unsigned short* dbias, float* workspace,
                                            cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_GELU_LAUNCH_H_
