// The fused dropout's functor (op in cc/ops/dropout_ops.cc, kernels in dropout_kernels.cc) and
// what every kernel that drops elements shares: the seed's values and the keep decision of
// cuda/dropout_rng.h as an integer comparison that vectorises. Include kernel_common.h first.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_DROPOUT_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_DROPOUT_H_

#include <cstdint>

#include "dropout_rng.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tfbert {

// The int64 [2] seed's values (the seed is in host memory on every device).
inline ::tensorflow::Status ReadDropoutSeed(const ::tensorflow::Tensor& seed, int64_t* seed0,
                                            int64_t* seed1) {
  if (!::tensorflow::TensorShapeUtils::IsVector(seed.shape()) || seed.NumElements() != 2) {
    return ::tensorflow::errors::InvalidArgument(
        "seed must be an int64 vector of 2 elements, got shape ", seed.shape().DebugString());
  }
  auto values = seed.flat<int64_t>();
  *seed0 = values(0);
  *seed1 = values(1);
  return ::tensorflow::OkStatus();
}

// The ops' "rate" attribute, which must be in [0, 1).
inline ::tensorflow::Status ReadDropoutRate(::tensorflow::OpKernelConstruction* context,
                                            float* rate) {
  TF_RETURN_IF_ERROR(context->GetAttr("rate", rate));
  if (!(*rate >= 0.0f && *rate < 1.0f)) {
    return ::tensorflow::errors::InvalidArgument("rate must be in [0, 1), got ", *rate);
  }
  return ::tensorflow::OkStatus();
}

// tfbert_dropout_keep(key, index, rate) with threshold = tfbert_dropout_keep_threshold(rate):
// the integer comparison of dropout_rng.h, which vectorises. The same bits, the same decisions,
// on the CPU and the GPU, forward and backward.
TFBERT_INLINE bool DropoutKeep(uint64_t key, uint64_t index, uint64_t threshold) {
  return (tfbert_dropout_mix64(key + (index + 1) * TFBERT_DROPOUT_RNG_GAMMA) >> 40) >= threshold;
}

namespace functor {

// y[i] = x[i] * keep(i) / (1 - rate) over `size` elements in T, float32 arithmetic; keep(i) =
// tfbert_dropout_keep(tfbert_dropout_key(seed0, seed1), i, rate).
template <typename Device, typename T>
struct FusedDropout {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  int64_t size, float rate, int64_t seed0, int64_t seed1, T* y);
};

// y[i] = dropout(x[i] + bias[i % cols]) + residual[i] over `size` elements (rows of `cols`) in
// T, float32 arithmetic rounded once; the mask is FusedDropout's for the same seed and size.
template <typename Device, typename T>
struct FusedBiasDropoutAdd {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  const T* bias, const T* residual, int64_t size, int64_t cols,
                                  float rate, int64_t seed0, int64_t seed1, T* y);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_DROPOUT_H_
