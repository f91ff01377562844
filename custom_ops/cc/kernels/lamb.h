// Functor of the fused LAMB update (ops in cc/ops/lamb_ops.cc): one specialisation per device in
// lamb_kernels.cc; the GPU one calls the CUDA kernels through cuda/lamb_launch.h.
//
// Legend: n = the number of elements of a parameter. var, m, v: float32 [n], updated in
// place; grad: float32 [n]. Scalars are host values.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "lamb_variables.h"  // LambStepHyperparams
#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

// The step's scalars: LambStepHyperparams (bias corrections taken on the host), the learning
// rate and the factor every gradient is multiplied by as it is read (the clip by global norm).
struct LambHyperparams : LambStepHyperparams {
  float lr;
  float grad_scale;
};

// The trust ratio ||var|| / ||update||, or 1 when either norm is 0 (tfa's tf.where pair).
inline float LambTrustRatio(double var_norm_squared, double update_norm_squared) {
  const float var_norm = static_cast<float>(std::sqrt(var_norm_squared));
  const float update_norm = static_cast<float>(std::sqrt(update_norm_squared));
  return (var_norm > 0.0f && update_norm > 0.0f) ? var_norm / update_norm : 1.0f;
}

// One tensor of a multi-tensor step: its buffers, size and flags.
struct LambTensor {
  const float* grad;
  int64_t n;
  float* var;
  float* m;
  float* v;
  bool use_layer_adaptation;
  bool apply_weight_decay;
};

// One LAMB step over any number of tensors (TfBert>FusedLambMultiUpdate; TfBert>FusedLambUpdate
// is the case of one), each with its own flags. Each tensor's result is bit-identical to a step
// of that tensor alone, and deterministic. Tensors with n == 0 are allowed (nothing to do).
template <typename Device>
struct FusedLambMultiUpdate {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context,
                                  const std::vector<LambTensor>& tensors,
                                  const LambHyperparams& hp);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_
