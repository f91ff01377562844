// C ABI of the fused attention softmax CUDA kernels (attention_softmax.cu): raw device
// pointers, sizes, seed values and a stream, so nvcc never sees TensorFlow's headers.
//
// Shapes: scores, probs, softmax, dprobs, dscores are [rows, cols] row-major with
// rows = B * N * Sq and cols = Sk; mask_bias is [B, mask_rows, cols] with mask_rows 1 or Sq, and
// row r uses mask row (r / heads_queries) * mask_rows + (mask_rows == 1 ? 0 : r % queries),
// heads_queries = N * Sq. The 16-bit variants take the raw bits of IEEE binary16 (f16) or
// bfloat16 (bf16) values as unsigned short. seed0 and seed1 are the int64 [2] seed's values;
// the keep mask is the generator of dropout_rng.h over the flat index r * cols + k.
// softmax may equal probs (dropout_rate = 0: one buffer for both). Each function only
// enqueues work on `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_ATTENTION_SOFTMAX_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_ATTENTION_SOFTMAX_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t tfbert_attention_softmax_forward_f32(
    const float* scores, const float* mask_bias, long long rows, long long cols,
    long long heads_queries, long long queries, long long mask_rows, float scale,
    float dropout_rate, long long seed0, long long seed1, float* probs, float* softmax,
    cudaStream_t stream);
cudaError_t tfbert_attention_softmax_forward_f16(
    const unsigned short* scores, const unsigned short* mask_bias, long long rows,
    long long cols, long long heads_queries, long long queries, long long mask_rows,
    float scale, float dropout_rate, long long seed0, long long seed1, unsigned short* probs,
    unsigned short* softmax, cudaStream_t stream);
cudaError_t tfbert_attention_softmax_forward_bf16(
    const unsigned short* scores, const unsigned short* mask_bias, long long rows,
    long long cols, long long heads_queries, long long queries, long long mask_rows,
    float scale, float dropout_rate, long long seed0, long long seed1, unsigned short* probs,
    unsigned short* softmax, cudaStream_t stream);

cudaError_t tfbert_attention_softmax_backward_f32(
    const float* dprobs, const float* softmax, long long rows, long long cols, float scale,
    float dropout_rate, long long seed0, long long seed1, float* dscores, cudaStream_t stream);
cudaError_t tfbert_attention_softmax_backward_f16(
    const unsigned short* dprobs, const unsigned short* softmax, long long rows, long long cols,
    float scale, float dropout_rate, long long seed0, long long seed1, unsigned short* dscores,
    cudaStream_t stream);
cudaError_t tfbert_attention_softmax_backward_bf16(
    const unsigned short* dprobs, const unsigned short* softmax, long long rows, long long cols,
    float scale, float dropout_rate, long long seed0, long long seed1, unsigned short* dscores,
    cudaStream_t stream);

// keep[i] = 1 if element i is kept, else 0 (bool's layout), for i < size.
cudaError_t tfbert_dropout_keep_mask(long long size, float rate, long long seed0, long long seed1,
                                     unsigned char* keep, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_ATTENTION_SOFTMAX_LAUNCH_H_
