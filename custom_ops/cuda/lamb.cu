// CUDA kernels of the fused LAMB update, behind the C ABI of lamb_launch.h.
//
// Legend: n = the number of elements of a tensor; var, m, v, grad: float32 [n].
//
// A step of a list of tensors, in batches of up to TFBERT_LAMB_TENSORS_PER_LAUNCH tensors, three
// kernels per batch on the caller's stream:
//   1. LambMomentsKernel: m and v in place, the update direction u, and per-block partial sums
//      of var^2 and u^2 (u is not stored: kernel 3 recomputes it from m, v and var, which saves
//      an [n] buffer for one more read of three arrays). A tensor without layer adaptation
//      (ratio 1) gets its whole step here;
//   2. LambRatioKernel: one block per tensor adds its partials in block order (double) -> the
//      trust ratio;
//   3. LambApplyKernel: var -= ratio * lr * u.
// A one-tensor step (tfbert_lamb_update_f32) is a list of one.
// No atomics and a grid fixed by n alone, so results are bit-identical from run to run. The
// arithmetic uses the _rn intrinsics so nvcc cannot contract it into FMAs differently in
// kernels 1 and 3: the u whose norm is taken is exactly the u that is applied.

#include "lamb_launch.h"

namespace {

constexpr int kThreads = 256;

struct Hyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, epsilon, weight_decay;
  float bias_correction1, bias_correction2;
  float grad_scale;        // every gradient element is multiplied by it as it is read
  int apply_weight_decay;  // the current tensor's
};

// u from the updated moments, in tfa's order: (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * var).
__device__ __forceinline__ float Direction(float m, float v, float var, const Hyper& h) {
  const float m_hat = __fdiv_rn(m, h.bias_correction1);
  const float v_hat = __fdiv_rn(v, h.bias_correction2);
  float u = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), h.epsilon));
  if (h.apply_weight_decay) u = __fadd_rn(u, __fmul_rn(h.weight_decay, var));
  return u;
}

// Element i's moments in place, as tfa writes them: m = beta1 * m + (1 - beta1) * g;
// v = beta2 * v + (1 - beta2) * g^2, with g = grad * grad_scale. Returns the update direction u.
__device__ __forceinline__ float StepMoments(long long i, const float* __restrict__ grad,
                                             float* __restrict__ m, float* __restrict__ v,
                                             float var, const Hyper& h) {
  const float g = __fmul_rn(grad[i], h.grad_scale);
  const float m_i = __fadd_rn(__fmul_rn(m[i], h.beta1), __fmul_rn(g, h.one_minus_beta1));
  const float v_i =
      __fadd_rn(__fmul_rn(v[i], h.beta2), __fmul_rn(__fmul_rn(g, g), h.one_minus_beta2));
  m[i] = m_i;
  v[i] = v_i;
  return Direction(m_i, v_i, var, h);
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

// One launch's tensors (at most TFBERT_LAMB_TENSORS_PER_LAUNCH), passed by value as a kernel
// argument (about 2 KB, under the 4 KB limit). Tensor t owns the CUDA blocks
// [first_block[t], first_block[t + 1]): blocks[t] = tfbert_lamb_blocks(n[t]), the grid a step of
// that tensor alone would have, so its partial sums (and so its result) are the same.
struct Batch {
  float* var[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  float* m[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  float* v[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  const float* grad[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  long long n[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  // With layer adaptation: 2 * blocks partials, then the trust ratio; null without.
  float* workspace[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  int blocks[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  int apply_weight_decay[TFBERT_LAMB_TENSORS_PER_LAUNCH];
  int first_block[TFBERT_LAMB_TENSORS_PER_LAUNCH + 1];
  int count;
};

// The tensor whose blocks include blockIdx.x (the same for every thread of the block).
__device__ __forceinline__ int TensorOfBlock(const Batch& batch) {
  int t = 0;
  while (blockIdx.x >= batch.first_block[t + 1]) ++t;
  return t;
}

// Kernel 1: per tensor, the moments and either the partial sums of var^2 and u^2 (layer
// adaptation: workspace non-null) or the whole step (ratio 1).
__global__ void LambMomentsKernel(Batch batch, Hyper h) {
  __shared__ float shared[kThreads];
  const int t = TensorOfBlock(batch);
  float* __restrict__ var = batch.var[t];
  float* __restrict__ m = batch.m[t];
  float* __restrict__ v = batch.v[t];
  const float* __restrict__ grad = batch.grad[t];
  const long long n = batch.n[t];
  h.apply_weight_decay = batch.apply_weight_decay[t];
  const int block = blockIdx.x - batch.first_block[t];
  const long long stride = static_cast<long long>(batch.blocks[t]) * kThreads;
  const long long first = static_cast<long long>(block) * kThreads + threadIdx.x;
  float* partials = batch.workspace[t];

  if (partials == nullptr) {
    for (long long i = first; i < n; i += stride) {
      const float w = var[i];
      var[i] = __fsub_rn(w, __fmul_rn(h.lr, StepMoments(i, grad, m, v, w, h)));
    }
    return;
  }
  float var_sq = 0.0f, update_sq = 0.0f;
  for (long long i = first; i < n; i += stride) {
    const float w = var[i];
    const float u = StepMoments(i, grad, m, v, w, h);
    var_sq = __fadd_rn(var_sq, __fmul_rn(w, w));
    update_sq = __fadd_rn(update_sq, __fmul_rn(u, u));
  }
  const float block_var_sq = BlockSum(var_sq, shared);
  __syncthreads();  // shared is reused
  const float block_update_sq = BlockSum(update_sq, shared);
  if (threadIdx.x == 0) {
    partials[2 * block] = block_var_sq;
    partials[2 * block + 1] = block_update_sq;
  }
}

// Kernel 2, block t: tensor t's ratio = ||var|| / ||u||, or 1 when either is 0 (tfa's tf.where
// pair), from its partials added in block order (double).
__global__ void LambRatioKernel(Batch batch) {
  __shared__ double shared[kThreads];
  const int t = blockIdx.x;
  float* workspace = batch.workspace[t];
  if (workspace == nullptr) return;
  const int blocks = batch.blocks[t];
  double var_sq = 0.0, update_sq = 0.0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    var_sq += workspace[2 * b];
    update_sq += workspace[2 * b + 1];
  }
  const double total_var_sq = BlockSum(var_sq, shared);
  __syncthreads();
  const double total_update_sq = BlockSum(update_sq, shared);
  if (threadIdx.x == 0) {
    const float var_norm = static_cast<float>(sqrt(total_var_sq));
    const float update_norm = static_cast<float>(sqrt(total_update_sq));
    workspace[2 * blocks] =
        (var_norm > 0.0f && update_norm > 0.0f) ? var_norm / update_norm : 1.0f;
  }
}

// Kernel 3: var -= ratio * lr * u, for the tensors with layer adaptation.
__global__ void LambApplyKernel(Batch batch, Hyper h) {
  const int t = TensorOfBlock(batch);
  const float* workspace = batch.workspace[t];
  if (workspace == nullptr) return;
  float* __restrict__ var = batch.var[t];
  const float* __restrict__ m = batch.m[t];
  const float* __restrict__ v = batch.v[t];
  const long long n = batch.n[t];
  h.apply_weight_decay = batch.apply_weight_decay[t];
  const int blocks = batch.blocks[t];
  const float scale = __fmul_rn(workspace[2 * blocks], h.lr);
  const long long stride = static_cast<long long>(blocks) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x - batch.first_block[t]) * kThreads +
                     threadIdx.x;
       i < n; i += stride) {
    const float w = var[i];
    var[i] = __fsub_rn(w, __fmul_rn(scale, Direction(m[i], v[i], w, h)));
  }
}

// The three kernels over one batch.
cudaError_t LaunchBatch(const Batch& batch, bool any_adapted, const Hyper& h,
                        cudaStream_t stream) {
  const int total_blocks = batch.first_block[batch.count];
  LambMomentsKernel<<<total_blocks, kThreads, 0, stream>>>(batch, h);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || !any_adapted) return error;
  LambRatioKernel<<<batch.count, kThreads, 0, stream>>>(batch);
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  LambApplyKernel<<<total_blocks, kThreads, 0, stream>>>(batch, h);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t tfbert_lamb_multi_update_f32(const TfbertLambTensor* tensors, int count,
                                                    float lr, float beta1, float beta2,
                                                    float epsilon, float weight_decay,
                                                    float bias_correction1,
                                                    float bias_correction2, float grad_scale,
                                                    float* workspace, cudaStream_t stream) {
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
  h.grad_scale = grad_scale;
  h.apply_weight_decay = 0;  // per tensor, set in the kernels

  Batch batch;
  batch.count = 0;
  batch.first_block[0] = 0;
  bool any_adapted = false;
  for (int i = 0; i < count; ++i) {
    const TfbertLambTensor& tensor = tensors[i];
    if (tensor.n <= 0) continue;
    const int t = batch.count;
    const int blocks = static_cast<int>(tfbert_lamb_blocks(tensor.n));
    batch.var[t] = tensor.var;
    batch.m[t] = tensor.m;
    batch.v[t] = tensor.v;
    batch.grad[t] = tensor.grad;
    batch.n[t] = tensor.n;
    batch.blocks[t] = blocks;
    batch.apply_weight_decay[t] = tensor.apply_weight_decay;
    batch.workspace[t] = nullptr;
    if (tensor.use_layer_adaptation) {
      batch.workspace[t] = workspace;
      workspace += tfbert_lamb_workspace_floats(tensor.n);
      any_adapted = true;
    }
    batch.first_block[t + 1] = batch.first_block[t] + blocks;
    batch.count = t + 1;
    if (batch.count == TFBERT_LAMB_TENSORS_PER_LAUNCH) {
      const cudaError_t error = LaunchBatch(batch, any_adapted, h, stream);
      if (error != cudaSuccess) return error;
      batch.count = 0;
      any_adapted = false;
    }
  }
  if (batch.count > 0) return LaunchBatch(batch, any_adapted, h, stream);
  return cudaSuccess;
}

extern "C" cudaError_t tfbert_lamb_update_f32(float* var, float* m, float* v, const float* grad,
                                              long long n, float lr, float beta1, float beta2,
                                              float epsilon, float weight_decay,
                                              float bias_correction1, float bias_correction2,
                                              float grad_scale, int use_layer_adaptation,
                                              int apply_weight_decay, float* workspace,
                                              cudaStream_t stream) {
  const TfbertLambTensor tensor{var, m, v, grad, n, use_layer_adaptation, apply_weight_decay};
  return tfbert_lamb_multi_update_f32(&tensor, 1, lr, beta1, beta2, epsilon, weight_decay,
                                      bias_correction1, bias_correction2, grad_scale, workspace,
                                      stream);
}

extern "C" cudaError_t tfbert_lamb_copy_f32(float* dst, const float* src, long long n,
                                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                         cudaMemcpyDeviceToDevice, stream);
}
