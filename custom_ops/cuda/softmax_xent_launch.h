// C ABI of the fused softmax cross-entropy CUDA kernels (softmax_xent.cu): raw device pointers,
// sizes and a stream, so nvcc never sees TensorFlow's headers.
//
// Legend: rows = the predictions, cols = the classes (the vocabulary for the masked-LM head).
// logits, dlogits: [rows, cols] in the suffix's type (float, or the raw bits of IEEE binary16
// (f16) or bfloat16 (bf16) values as unsigned short); bias, dbias: float32 [cols]; labels,
// predicted: int32 [rows]; loss, log_sum_exp, dloss: float32 [rows]. All arithmetic is in
// float32 on z = logits + bias:
//
//   forward:   loss = log(sum_k exp(z_k - max z)) - (z_label - max z)
//              log_sum_exp = max z + log(sum_k exp(z_k - max z))
//              predicted = the lowest k with z_k = max z (tf.argmax's choice)
//   backward:  g_k = dloss * (exp(z_k - log_sum_exp) - [k == label])
//              dlogits = g rounded to the storage type, dbias = sum over rows of g in float32
//
// A label outside [0, cols) gives a NaN loss (the CPU op raises an error instead). Each function
// only enqueues work on `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_SOFTMAX_XENT_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_SOFTMAX_XENT_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// dbias is reduced in two deterministic steps: each of `row_blocks` blocks of rows writes its
// float32 partial column sums, then one kernel adds them in block order (no atomics). The
// caller provides the float32 workspace: row_blocks * cols floats.
static inline long long tfbert_softmax_xent_grad_row_blocks(long long rows) {
  // About 64 rows per block, at most 64 blocks: the workspace of a 250k vocabulary stays at
  // 64 MiB, and column tiles x 64 row blocks fill any current GPU.
  long long blocks = (rows + 63) / 64;
  if (blocks > 64) blocks = 64;
  if (blocks < 1) blocks = 1;
  return blocks;
}

static inline long long tfbert_softmax_xent_grad_workspace_floats(long long rows,
                                                                  long long cols) {
  return tfbert_softmax_xent_grad_row_blocks(rows) * cols;
}

cudaError_t tfbert_softmax_xent_forward_f32(const float* logits, const float* bias,
                                            const int* labels, long long rows, int cols,
                                            float* loss, float* log_sum_exp, int* predicted,
                                            cudaStream_t stream);
cudaError_t tfbert_softmax_xent_forward_f16(const unsigned short* logits, const float* bias,
                                            const int* labels, long long rows, int cols,
                                            float* loss, float* log_sum_exp, int* predicted,
                                            cudaStream_t stream);
cudaError_t tfbert_softmax_xent_forward_bf16(const unsigned short* logits, const float* bias,
                                             const int* labels, long long rows, int cols,
                                             float* loss, float* log_sum_exp, int* predicted,
                                             cudaStream_t stream);

// workspace: tfbert_softmax_xent_grad_workspace_floats(rows, cols) float32 values.
cudaError_t tfbert_softmax_xent_backward_f32(const float* dloss, const float* logits,
                                             const float* bias, const int* labels,
                                             const float* log_sum_exp, long long rows, int cols,
                                             float* dlogits, float* dbias, float* workspace,
                                             cudaStream_t stream);
cudaError_t tfbert_softmax_xent_backward_f16(const float* dloss, const unsigned short* logits,
                                             const float* bias, const int* labels,
                                             const float* log_sum_exp, long long rows, int cols,
                                             unsigned short* dlogits, float* dbias,
                                             float* workspace, cudaStream_t stream);
cudaError_t tfbert_softmax_xent_backward_bf16(const float* dloss, const unsigned short* logits,
                                              const float* bias, const int* labels,
                                              const float* log_sum_exp, long long rows, int cols,
                                              unsigned short* dlogits, float* dbias,
                                              float* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_SOFTMAX_XENT_LAUNCH_H_
