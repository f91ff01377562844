// Functors of the fused attention softmax (ops in cc/ops/attention_softmax_ops.cc): one
// specialisation per device in attention_softmax_kernels.cc; the GPU one calls the CUDA kernels
// through cuda/attention_softmax_launch.h.
//
// Legend: rows = B * N * Sq, cols = Sk, the softmax axis. scores, probs, softmax, dprobs,
// dscores: [rows, cols] in T. mask_bias: [B, mask_rows, cols] with mask_rows 1 or Sq, so row r
// (= (b * N + n) * Sq + q) reads mask row b * mask_rows + (mask_rows == 1 ? 0 : q). All
// arithmetic is in float32 whatever T is. The dropout keep decision of element (r, k) is
// tfbert_dropout_keep(key, r * cols + k, dropout_rate) (cuda/dropout_rng.h).

#ifndef TFBERT_CUSTOM_OPS_CC_KERNELS_ATTENTION_SOFTMAX_H_
#define TFBERT_CUSTOM_OPS_CC_KERNELS_ATTENTION_SOFTMAX_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tfbert {
namespace functor {

struct AttentionSoftmaxDims {
  int64_t rows;           // B * N * Sq
  int64_t cols;           // Sk
  int64_t heads_queries;  // N * Sq: rows per batch element
  int64_t queries;        // Sq
  int64_t mask_rows;      // 1 or Sq
};

template <typename Device, typename T>
struct FusedAttentionSoftmaxForward {
  // Writes probs and, unless softmax == probs (dropout_rate = 0), softmax.
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* scores,
                                  const T* mask_bias, const AttentionSoftmaxDims& dims,
                                  float scale, float dropout_rate, int64_t seed0, int64_t seed1,
                                  T* probs, T* softmax);
};

template <typename Device, typename T>
struct FusedAttentionSoftmaxBackward {
  ::tensorflow::Status operator()(::tensorflow::OpKernelContext* context, const T* dprobs,
                                  const T* softmax, int64_t rows, int64_t cols, float scale,
                                  float dropout_rate, int64_t seed0, int64_t seed1, T* dscores);
};

}  // namespace functor
}  // namespace tfbert

#endif  // TFBERT_CUSTOM_OPS_CC_KERNELS_ATTENTION_SOFTMAX_H_
