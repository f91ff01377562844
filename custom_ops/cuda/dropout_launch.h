// C ABI of the fused dropout CUDA kernel (dropout.cu): raw device pointers, the size, the seed's
// values and a stream, so nvcc never sees TensorFlow's headers.
//
//   y[i] = x[i] * keep(i) / (1 - rate)        i the flat (row-major) index, 0 <= i < size
//
// keep(i) is the generator of dropout_rng.h for the int64 [2] seed (seed0, seed1), the mask of
// TfBert>DropoutKeepMask for that tensor's shape. The same call with the same seed is the
// gradient (dy -> dx): no mask is stored. The product is rounded once from float32 to the
// storage type, as on the CPU. The 16-bit variants take the raw bits of IEEE binary16 (f16) or
// bfloat16 (bf16) values as unsigned short. x and y must not overlap. Each function only
// enqueues work on `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_DROPOUT_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_DROPOUT_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t tfbert_dropout_f32(const float* x, long long size, float rate, long long seed0,
                               long long seed1, float* y, cudaStream_t stream);
cudaError_t tfbert_dropout_f16(const unsigned short* x, long long size, float rate,
                               long long seed0, long long seed1, unsigned short* y,
                               cudaStream_t stream);
cudaError_t tfbert_dropout_bf16(const unsigned short* x, long long size, float rate,
                                long long seed0, long long seed1, unsigned short* y,
                                cudaStream_t stream);

// y[i] = dropout(x[i] + bias[i % cols]) + residual[i], the end of a transformer sublayer before
// its LayerNorm: float32 arithmetic rounded once to the storage type, the mask of
// tfbert_dropout_<suffix> for the same seed and size. size is a multiple of cols; bias [cols];
// y must not overlap the inputs.
cudaError_t tfbert_bias_dropout_add_f32(const float* x, const float* bias, const float* residual,
                                        long long size, long long cols, float rate,
                                        long long seed0, long long seed1, float* y,
                                        cudaStream_t stream);
cudaError_t tfbert_bias_dropout_add_f16(const unsigned short* x, const unsigned short* bias,
                                        const unsigned short* residual, long long size,
                                        long long cols, float rate, long long seed0,
                                        long long seed1, unsigned short* y,
                                        cudaStream_t stream);
cudaError_t tfbert_bias_dropout_add_bf16(const unsigned short* x, const unsigned short* bias,
                                         const unsigned short* residual, long long size,
                                         long long cols, float rate, long long seed0,
                                         long long seed1, unsigned short* y,
                                         cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_DROPOUT_LAUNCH_H_
