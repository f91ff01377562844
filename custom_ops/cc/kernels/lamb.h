// Functor of the fused LAMB update (op in cc/ops/lamb_ops.cc): one specialisation per device in
// lamb_kernels.cc; the GPU one calls the CUDA kernels through cuda/lamb_launch.h.
//
// Legend: n = the number of elements of the parameter. var, m, v: float32 [n], updated in
// place; grad: float32 [n]. Scalars are host values.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_

#include <cmath>
#include <cstdint>

#include "lamb_variables.h"  // LambStepHyperparams
#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

// The step's scalars: LambStepHyperparams (bias corrections taken on the host), the learning rate
// and the op's attributes.
struct LambHyperparams : LambStepHyperparams {
  float lr;
  bool use_layer_adaptation;
  bool apply_weight_decay;
};

// The trust ratio ||var|| / ||update||, or 1 when either norm is 0 (tfa's tf.where pair).
inline float LambTrustRatio(double var_norm_squared, double update_norm_squared) {
  const float var_norm = static_cast<float>(std::sqrt(var_norm_squared));
  const float update_norm = static_cast<float>(std::sqrt(update_norm_squared));
  return (var_norm > 0.0f && update_norm > 0.0f) ? var_norm / update_norm : 1.0f;
}

template <typename Device>
struct FusedLambUpdate {
  // n >= 1. Deterministic: the same inputs give bit-identical results on every run.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const float* grad,
                                  int64_t n, const LambHyperparams& hp, float* var, float* m,
                                  float* v);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_LAMB_H_
