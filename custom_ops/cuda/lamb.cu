// CUDA kernels of the fused LAMB update, behind the C ABI of lamb_launch.h.
//
// Legend: n = the number of elements; var, m, v, grad: float32 [n].
//
// With layer adaptation, three kernels on the caller's stream:
//   1. LambMomentsKernel: m and v in place, the update direction u, and per-block partial sums
//      of var^2 and u^2 (u is not stored: kernel 3 recomputes it from m, v and var, which saves
//      an [n] buffer for one more read of three arrays);
//   2. LambRatioKernel: one block adds the partials in block order (double) -> the trust ratio;
//   3. LambApplyKernel: var -= ratio * lr * u.
// Without it, one kernel does the whole step (the ratio is 1).
// No atomics and a grid fixed by n alone, so results are bit-identical from run to run. The
// arithmetic uses the _rn intrinsics so nvcc cannot contract it into FMAs differently in
// kernels 1 and 3: the u whose norm is taken is exactly the u that is applied.

#include "lamb_launch.h"

namespace {

constexpr int kThreads = 256;

struct Hyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, epsilon, weight_decay;
  float bias_correction1, bias_correction2;
  int apply_weight_decay;
};

// u from the updated moments, in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * var).
__device__ __forceinline__ float Direction(float m, float v, float var, const Hyper& h) {
  const float m_hat = __fdiv_rn(m, h.bias_correction1);
  const float v_hat = __fdiv_rn(v, h.bias_correction2);
  float u = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), h.epsilon));
  if (h.apply_weight_decay) u = __fadd_rn(u, __fmul_rn(h.weight_decay, var));
  return u;
}

// m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g^2, as tfa writes them.
__device__ __forceinline__ void Moments(float g, const Hyper& h, float* m, float* v) {
  *m = __fadd_rn(__fmul_rn(*m, h.beta1), __fmul_rn(g, h.one_minus_beta1));
  *v = __fadd_rn(__fmul_rn(*v, h.beta2), __fmul_rn(__fmul_rn(g, g), h.one_minus_beta2));
}

// Sums `value` over the block (a fixed tree); the result is valid in thread 0.
template <typename T>
__device__ T BlockSum(T value, T* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

__global__ void LambMomentsKernel(float* __restrict__ var, float* __restrict__ m,
                                  float* __restrict__ v, const float* __restrict__ grad,
                                  long long n, Hyper h, float* __restrict__ partials) {
  __shared__ float shared[kThreads];
  float var_sq = 0.0f, update_sq = 0.0f;
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    float m_i = m[i], v_i = v[i];
    Moments(grad[i], h, &m_i, &v_i);
    m[i] = m_i;
    v[i] = v_i;
    const float w = var[i];
    const float u = Direction(m_i, v_i, w, h);
    var_sq = __fadd_rn(var_sq, __fmul_rn(w, w));
    update_sq = __fadd_rn(update_sq, __fmul_rn(u, u));
  }
  const float block_var_sq = BlockSum(var_sq, shared);
  __syncthreads();  // shared is reused
  const float block_update_sq = BlockSum(update_sq, shared);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = block_var_sq;
    partials[2 * blockIdx.x + 1] = block_update_sq;
  }
}

// One block: ratio = ||var|| / ||u||, or 1 when either is 0 (tfa's tf.where pair).
__global__ void LambRatioKernel(const float* __restrict__ partials, int blocks,
                                float* __restrict__ ratio) {
  __shared__ double shared[kThreads];
  double var_sq = 0.0, update_sq = 0.0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    var_sq += partials[2 * b];
    update_sq += partials[2 * b + 1];
  }
  const double total_var_sq = BlockSum(var_sq, shared);
  __syncthreads();
  const double total_update_sq = BlockSum(update_sq, shared);
  if (threadIdx.x == 0) {
    const float var_norm = static_cast<float>(sqrt(total_var_sq));
    const float update_norm = static_cast<float>(sqrt(total_update_sq));
    *ratio = (var_norm > 0.0f && update_norm > 0.0f) ? var_norm / update_norm : 1.0f;
  }
}

__global__ void LambApplyKernel(float* __restrict__ var, const float* __restrict__ m,
                                const float* __restrict__ v, long long n, Hyper h,
                                const float* __restrict__ ratio) {
  const float scale = __fmul_rn(*ratio, h.lr);
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    const float w = var[i];
    var[i] = __fsub_rn(w, __fmul_rn(scale, Direction(m[i], v[i], w, h)));
  }
}

// The whole step when the ratio is 1.
__global__ void LambFusedKernel(float* __restrict__ var, float* __restrict__ m,
                                float* __restrict__ v, const float* __restrict__ grad,
                                long long n, Hyper h) {
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    float m_i = m[i], v_i = v[i];
    Moments(grad[i], h, &m_i, &v_i);
    m[i] = m_i;
    v[i] = v_i;
    const float w = var[i];
    var[i] = __fsub_rn(w, __fmul_rn(h.lr, Direction(m_i, v_i, w, h)));
  }
}

}  // namespace

extern "C" cudaError_t tfbert_lamb_update_f32(float* var, float* m, float* v, const float* grad,
                                              long long n, float lr, float beta1, float beta2,
                                              float epsilon, float weight_decay,
                                              float bias_correction1, float bias_correction2,
                                              int use_layer_adaptation, int apply_weight_decay,
                                              float* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  Hyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.one_minus_beta1 = 1.0f - beta1;
  h.beta2 = beta2;
  h.one_minus_beta2 = 1.0f - beta2;
  h.epsilon = epsilon;
  h.weight_decay = weight_decay;
  h.bias_correction1 = bias_correction1;
  h.bias_correction2 = bias_correction2;
  h.apply_weight_decay = apply_weight_decay;
  const int blocks = static_cast<int>(tfbert_lamb_blocks(n));
  if (!use_layer_adaptation) {
    LambFusedKernel<<<blocks, kThreads, 0, stream>>>(var, m, v, grad, n, h);
    return cudaGetLastError();
  }
  float* partials = workspace;
  float* ratio = workspace + 2 * blocks;
  LambMomentsKernel<<<blocks, kThreads, 0, stream>>>(var, m, v, grad, n, h, partials);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  LambRatioKernel<<<1, kThreads, 0, stream>>>(partials, blocks, ratio);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  LambApplyKernel<<<blocks, kThreads, 0, stream>>>(var, m, v, n, h, ratio);
  return cudaGetLastError();
}

extern "C" cudaError_t tfbert_lamb_copy_f32(float* dst, const float* src, long long n,
                                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                         cudaMemcpyDeviceToDevice, stream);
}
