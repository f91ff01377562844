// C ABI of the fused bias + split-heads CUDA kernels (split_heads.cu): raw device pointers,
// sizes and a stream, so nvcc never sees TensorFlow's headers.
//
// Legend: B batch, S sequence, n heads, H head size, D = n * H. x, dx: [B, S, 3, n, H] (the
// fused Q/K/V projection, [B, S, 3D] row-major); bias, dbias: [3D]; query, key, value and their
// gradients: [B, n, S, H]. Every tensor has the suffix's element type (float, or the raw bits
// of IEEE binary16 (f16) or bfloat16 (bf16) values as unsigned short); the arithmetic is
// float32, rounded once.
//
//   forward:   query[b, j, s, h] = x[b, s, 0, j, h] + bias[0, j, h]   (key: 1, value: 2)
//   backward:  dx[b, s, p, j, h] = d(part p)[b, j, s, h], dbias = dx summed over b and s
//
// dbias is reduced in two deterministic steps (no atomics): the caller provides the float32
// workspace, tfbert_split_heads_grad_workspace_floats(B * S, 3D) floats. Each function only
// enqueues work on `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_SPLIT_HEADS_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_SPLIT_HEADS_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

static inline long long tfbert_split_heads_grad_row_blocks(long long rows) {
  // About 64 rows per block, at most 512 blocks (as the GELU bias gradient).
  long long blocks = (rows + 63) / 64;
  if (blocks > 512) blocks = 512;
  if (blocks < 1) blocks = 1;
  return blocks;
}

static inline long long tfbert_split_heads_grad_workspace_floats(long long rows, long long cols) {
  return tfbert_split_heads_grad_row_blocks(rows) * cols;
}

cudaError_t tfbert_bias_split_heads_forward_f32(const float* x, const float* bias, long long batch,
                                                long long seq, int heads, int head_size,
                                                float* query, float* key, float* value,
                                                cudaStream_t stream);
cudaError_t tfbert_bias_split_heads_forward_f16(const unsigned short* x,
                                                const unsigned short* bias, long long batch,
                                                long long seq, int heads, int head_size,
                                                unsigned short* query, unsigned short* key,
                                                unsigned short* value, cudaStream_t stream);
cudaError_t tfbert_bias_split_heads_forward_bf16(const unsigned short* x,
                                                 const unsigned short* bias, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 unsigned short* query, unsigned short* key,
                                                 unsigned short* value, cudaStream_t stream);

// workspace: tfbert_split_heads_grad_workspace_floats(batch * seq, 3 * heads * head_size).
cudaError_t tfbert_bias_split_heads_backward_f32(const float* dquery, const float* dkey,
                                                 const float* dvalue, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 float* dx, float* dbias, float* workspace,
                                                 cudaStream_t stream);
cudaError_t tfbert_bias_split_heads_backward_f16(const unsigned short* dquery,
                                                 const unsigned short* dkey,
                                                 const unsigned short* dvalue, long long batch,
                                                 long long seq, int heads, int head_size,
                                                 unsigned short* dx, unsigned short* dbias,
                                                 float* workspace, cudaStream_t stream);
cudaError_t tfbert_bias_split_heads_backward_bf16(const unsigned short* dquery,
                                                  const unsigned short* dkey,
                                                  const unsigned short* dvalue, long long batch,
                                                  long long seq, int heads, int head_size,
                                                  unsigned short* dx, unsigned short* dbias,
                                                  float* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_SPLIT_HEADS_LAUNCH_H_
