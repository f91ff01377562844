// C ABI of the fused LAMB CUDA kernels (lamb.cu): raw device pointers, sizes, host scalars and a
// stream, so nvcc never sees TensorFlow's headers and the kernels can be driven on their own.
//
// var, m, v: float32 [n] device arrays updated in place; grad: float32 [n]. Each function only
// enqueues work on `stream` and returns the launch error (cudaSuccess if none).

#ifndef TFBERT_CUSTOM_OPS_CUDA_LAMB_LAUNCH_H_
#define TFBERT_CUSTOM_OPS_CUDA_LAMB_LAUNCH_H_

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// The norms are reduced in two deterministic steps: each of the
// tfbert_lamb_blocks(n) blocks writes its partial sums of var^2 and update^2 (a fixed grid,
// independent of the GPU), then one block adds them in block order and writes the trust ratio.
static inline long long tfbert_lamb_blocks(long long n) {
  // 256 threads x 4 elements per block and pass, at most 1024 blocks (grid-stride beyond).
  long long blocks = (n + 1023) / 1024;
  if (blocks > 1024) blocks = 1024;
  if (blocks < 1) blocks = 1;
  return blocks;
}

// The float32 workspace the caller provides: 2 partials per block plus the trust ratio.
static inline long long tfbert_lamb_workspace_floats(long long n) {
  return 2 * tfbert_lamb_blocks(n) + 1;
}

// One LAMB step (tensorflow_addons' numerics, see cc/ops/lamb_ops.cc).
// bias_correction1/2: 1 - beta1^t and 1 - beta2^t. workspace: tfbert_lamb_workspace_floats(n)
// floats, used only when use_layer_adaptation != 0.
cudaError_t tfbert_lamb_update_f32(float* var, float* m, float* v, const float* grad,
                                   long long n, float lr, float beta1, float beta2,
                                   float epsilon, float weight_decay, float bias_correction1,
                                   float bias_correction2, int use_layer_adaptation,
                                   int apply_weight_decay, float* workspace,
                                   cudaStream_t stream);

// dst = src, device to device (copy-on-write of a variable buffer that a read still holds).
cudaError_t tfbert_lamb_copy_f32(float* dst, const float* src, long long n,
                                 cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_LAMB_LAUNCH_H_
