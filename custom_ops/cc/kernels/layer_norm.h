// Functors of the fused LayerNorm (ops in cc/ops/layer_norm_ops.cc): one specialisation per
// device in layer_norm_kernels.cc; the GPU one calls the CUDA kernels through
// cuda/layer_norm_launch.h.
//
// Legend: rows = the product of x's leading dimensions, cols = H, the normalised last axis.
// x, y, dy, dx: [rows, cols] in T; gamma, beta, dgamma, dbeta: float32 [cols];
// mean, rstd: float32 [rows]. All arithmetic is in float32 whatever T is.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_LAYER_NORM_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_LAYER_NORM_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

template <typename Device, typename T>
struct FusedLayerNormForward {
  // Writes y, mean and rstd. rows >= 1, cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* x,
                                  const float* gamma, const float* beta, int64_t rows,
                                  int64_t cols, float epsilon, T* y, float* mean, float* rstd);
};

template <typename Device, typename T>
struct FusedLayerNormBackward {
  // Writes dx, and dgamma and dbeta summed over all rows (deterministically: the same inputs
  // give bit-identical sums on every run). rows >= 0 (no rows: zero dgamma and dbeta),
  // cols >= 1.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* dy,
                                  const T* x, const float* mean, const float* rstd,
                                  const float* gamma, int64_t rows, int64_t cols, T* dx,
                                  float* dgamma, float* dbeta);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_LAYER_NORM_H_
