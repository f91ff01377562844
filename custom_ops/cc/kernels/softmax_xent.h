// Functors of the fused softmax cross-entropy (ops in cc/ops/softmax_xent_ops.cc): one
// specialisation per device in softmax_xent_kernels.cc; the GPU one calls the CUDA kernels
// through cuda/softmax_xent_launch.h.
//
// Legend: rows = the predictions, cols = the classes. logits, dlogits: [rows, cols] in T;
// bias, dbias: float32 [cols]; labels, predicted: int32 [rows]; loss, log_sum_exp, dloss:
// float32 [rows]. All arithmetic is in float32 whatever T is.

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_SOFTMAX_XENT_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_SOFTMAX_XENT_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

template <typename Device, typename T>
struct SoftmaxXentForward {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* logits,
                                  const float* bias, const int32_t* labels, int64_t rows,
                                  int64_t cols, float* loss, float* log_sum_exp,
                                  int32_t* predicted);
};

template <typename Device, typename T>
struct SoftmaxXentBackward {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const float* dloss,
                                  const T* logits, const float* bias, const int32_t* labels,
                                  const float* log_sum_exp, int64_t rows, int64_t cols,
                                  T* dlogits, float* dbias);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_SOFTMAX_XENT_H_
