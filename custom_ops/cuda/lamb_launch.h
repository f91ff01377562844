// C ABI of the fused LAMB CUDA kernels (lamb.cu): raw device pointers, sizes, host scalars and a
// stream, so nvcc never sees TensorFlow's headers and the kernels can be driven on their own.
//
// var, m, v: float32 [n] device arrays updated in place; grad: float32 [n]. Each function only
// enqueues work on `stream` and returns the launch error (cudaSuccess if none).
//
// tfbert_lamb_update_f32 steps one tensor; tfbert_lamb_multi_update_f32 steps a list of them in a
// few launches (up to TFBERT_LAMB_TENSORS_PER_LAUNCH tensors per launch, their pointers passed as
// kernel arguments: no host-to-device copy), each tensor's result bit-identical to a step of it
// alone.

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

// One tensor of a multi-tensor step: device pointers, size and its two flags (0 or 1).
typedef struct TfbertLambTensor {
  float* var;
  float* m;
  float* v;
  const float* grad;
  long long n;
  int use_layer_adaptation;
  int apply_weight_decay;
} TfbertLambTensor;

#define TFBERT_LAMB_TENSORS_PER_LAUNCH 32

// The float32 workspace of a multi-tensor step: tfbert_lamb_workspace_floats(n) per tensor with
// layer adaptation and n > 0, laid out in list order.
static inline long long tfbert_lamb_multi_workspace_floats(const TfbertLambTensor* tensors,
                                                           int count) {
  long long floats = 0;
  for (int i = 0; i < count; ++i) {
    if (tensors[i].use_layer_adaptation && tensors[i].n > 0) {
      floats += tfbert_lamb_workspace_floats(tensors[i].n);
    }
  }
  return floats;
}

// One LAMB step (tensorflow_addons' numerics, see cc/ops/lamb_ops.cc).
// bias_correction1/2: 1 - beta1^t and 1 - beta2^t. grad_scale: every gradient element is
// multiplied by it as it is read (the clip by global norm; 1 for grad as given). workspace:
// tfbert_lamb_workspace_floats(n) floats, used only when use_layer_adaptation != 0.
cudaError_t tfbert_lamb_update_f32(float* var, float* m, float* v, const float* grad,
                                   long long n, float lr, float beta1, float beta2,
                                   float epsilon, float weight_decay, float bias_correction1,
                                   float bias_correction2, float grad_scale,
                                   int use_layer_adaptation, int apply_weight_decay,
                                   float* workspace, cudaStream_t stream);

// One LAMB step of `count` tensors; tensors: a host array (read before the function returns).
// workspace: tfbert_lamb_multi_workspace_floats(tensors, count) floats (may be null when 0).
cudaError_t tfbert_lamb_multi_update_f32(const TfbertLambTensor* tensors, int count, float lr,
                                         float beta1, float beta2, float epsilon,
                                         float weight_decay, float bias_correction1,
                                         float bias_correction2, float grad_scale,
                                         float* workspace, cudaStream_t stream);

// dst = src, device to device (copy-on-write of a variable buffer that a read still holds).
cudaError_t tfbert_lamb_copy_f32(float* dst, const float* src, long long n,
                                 cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TFBERT_CUSTOM_OPS_CUDA_LAMB_LAUNCH_H_
